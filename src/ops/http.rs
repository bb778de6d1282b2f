//! The loopback HTTP endpoint: `/metrics` (Prometheus text), `/livez`, `/readyz`, `/healthz`.
//!
//! - `/livez`: the process and its runtime answer (this handler ran).
//! - `/readyz` and `/healthz`: a usable current local KEK (what Status reports) and a backend
//!   probe that succeeded within the last three probe intervals.
//!
//! Plain HTTP/1 on a loopback address: it carries no secrets and must not be exposed.
//!
//! Any local process can connect to a loopback port, so the endpoint must not be starvable:
//! it runs on its own thread (a `/metrics` flood cannot slow the gRPC calls), every connection
//! serves one request and gets [`CONNECTION_DEADLINE`] for all of it, and at most
//! [`MAX_CONNECTIONS`] are open, admitted as [`super::admission`] explains: a connection whose
//! request has begun, or that is younger than a short grace, is never closed to make room.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::admission::{self, Counters, HEAD_DEADLINE, Sent, Table, Ticket};
use crate::keys::Keys;

/// State the endpoint reads.
pub struct Endpoint {
    pub registry: Registry,
    pub keys: Arc<Keys>,
}

/// Why the plugin is not ready, or None when it is.
fn not_ready(keys: &Keys) -> Option<String> {
    if let Err(e) = keys.healthy_current() {
        // The gRPC code and kind only: backend details (ARNs, labels) stay in the log.
        let kind = match &e {
            crate::error::Error::Backend(b) => format!("{:?}", b.kind),
            crate::error::Error::KekExhausted => "local KEK exhausted, rotation failing".to_string(),
            _ => "no local KEK".to_string(),
        };
        return Some(format!("status would fail: {:?} ({kind})", e.code()));
    }
    let fresh = keys.probe_interval() * 3 + Duration::from_secs(5);
    match keys.since_last_probe_ok() {
        None => Some("no successful backend probe yet".into()),
        Some(age) if age > fresh => Some(format!("last successful backend probe {} s ago", age.as_secs())),
        Some(_) => None,
    }
}

/// The endpoint and the registry of its own connection counters.
struct Served {
    endpoint: Arc<Endpoint>,
    connections: Registry,
}

/// All metrics: the plugin's, then the endpoint's own.
fn encode_metrics(served: &Served) -> Result<String, std::fmt::Error> {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let mut text = String::new();
    encode_registry(&mut text, &served.endpoint.registry)?;
    encode_registry(&mut text, &served.connections)?;
    encode_eof(&mut text)?;
    Ok(text)
}

fn respond(served: &Served, path: &str) -> Response<Full<Bytes>> {
    let (code, body, content_type) = match path {
        "/livez" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/readyz" | "/healthz" => match not_ready(&served.endpoint.keys) {
            None => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"), "text/plain"),
        },
        "/metrics" => match encode_metrics(served) {
            Ok(text) => (
                StatusCode::OK,
                text,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding failed\n".into(),
                "text/plain",
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Binds `address` (before the gRPC socket, so a taken port fails start-up).
pub async fn bind(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    if !address.ip().is_loopback() {
        warn!(%address, "metrics/health endpoint is not on a loopback address");
    }
    let socket = match address {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// Connections the kernel queues for the accept loop (capped by `net.core.somaxconn`). While
/// every slot is protected the loop waits and newcomers queue here, so it must hold what a
/// flood sends during one grace: the default 128 would drop SYNs (a 1 s retry for the probe).
const LISTEN_BACKLOG: u32 = 4096;

pub use super::admission::MAX_CONNECTIONS;
/// The whole life of one connection: silence, headers in, one response out.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(1);

/// The endpoint's thread; stopped (and joined) by [`HttpServer::stop`].
pub struct HttpServer {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl HttpServer {
    /// Serves `listener` on a thread of its own with a single-threaded runtime.
    pub fn start(listener: std::net::TcpListener, endpoint: Arc<Endpoint>) -> std::io::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new()
            .name("kms-plugin-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return warn!(error = %e, "metrics endpoint could not start"),
                    };
                    let counters = Counters::default();
                    let mut connections = Registry::with_prefix("kms_plugin");
                    counters.register(&mut connections);
                    let served = Arc::new(Served { endpoint, connections });
                    tokio::select! {
                        _ = serve(listener, served, counters) => {}
                        _ = stopped => {}
                    }
                })
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops serving and waits for the thread (which holds key state) to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

async fn serve(listener: TcpListener, served: Arc<Served>, counters: Counters) {
    let mut table = Table::new(counters.clone());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "metrics endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if admission::sent(&stream) == Sent::Closed {
            continue;
        }
        // With every slot protected, this connection waits here, and those behind it in the
        // kernel's queue: none is closed, and none whose request began is evicted.
        table.make_room().await;
        let began = admission::sent(&stream) == Sent::Request;
        table.admit(began, |ticket| {
            let connection = connection(stream, peer, ticket, Arc::clone(&served), counters.clone());
            tokio::spawn(connection).abort_handle()
        });
        // Let the new connection's task run before the next accept.
        tokio::task::yield_now().await;
    }
}

/// Serves one connection, within its deadlines.
async fn connection(stream: TcpStream, peer: SocketAddr, ticket: Ticket, served: Arc<Served>, counters: Counters) {
    let serve = async {
        // Hyper's head deadline starts once the request begins; until then the connection is
        // silent, and only the table may close it.
        if stream.peek(&mut [0u8; 1]).await.unwrap_or(0) == 0 {
            return Ok(());
        }
        ticket.request_began();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let resp = respond(&served, req.uri().path());
            async move { Ok::<_, std::convert::Infallible>(resp) }
        });
        hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEAD_DEADLINE)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service)
            .await
    };
    match tokio::time::timeout(CONNECTION_DEADLINE, serve).await {
        Ok(Err(e)) if e.is_timeout() => {
            counters.closed("deadline");
            debug!(%peer, "metrics connection sent no whole request in time; closed")
        }
        Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection ended with an error"),
        Err(_) => {
            counters.closed("deadline");
            debug!(%peer, "metrics connection took too long; closed")
        }
        Ok(Ok(())) => {}
    }
}
