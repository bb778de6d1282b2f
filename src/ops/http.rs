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
//! serves one request and gets [`CONNECTION_DEADLINE`] for all of it, and when
//! [`MAX_CONNECTIONS`] are open the oldest is closed to admit the new one, so slow or silent
//! clients cannot lock the kubelet's probe out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, warn};

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

fn respond(endpoint: &Endpoint, path: &str) -> Response<Full<Bytes>> {
    let (code, body, content_type) = match path {
        "/livez" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
        "/readyz" | "/healthz" => match not_ready(&endpoint.keys) {
            None => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"), "text/plain"),
        },
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &endpoint.registry) {
                Ok(()) => (
                    StatusCode::OK,
                    text,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                    "text/plain",
                ),
            }
        }
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
    let listener = tokio::net::TcpListener::bind(address).await?.into_std()?;
    Ok(listener)
}

/// Most concurrent HTTP connections; at the limit the oldest is closed for the new one.
pub const MAX_CONNECTIONS: usize = 64;
/// The whole life of one connection: headers in, one response out.
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
                    tokio::select! {
                        _ = serve(listener, endpoint) => {}
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

async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let mut open: std::collections::VecDeque<tokio::task::AbortHandle> = Default::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "metrics endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        open.retain(|task| !task.is_finished());
        if open.len() >= MAX_CONNECTIONS
            && let Some(oldest) = open.pop_front()
        {
            oldest.abort();
            debug!("metrics endpoint full; closed the oldest connection");
        }
        let endpoint = Arc::clone(&endpoint);
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(&endpoint, req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(CONNECTION_DEADLINE)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics connection ended with an error"),
                Err(_) => debug!(%peer, "metrics connection took too long; closed"),
                Ok(Ok(())) => {}
            }
        });
        open.push_back(task.abort_handle());
        // Let the new connection's task read its request before the next accept: a burst of
        // connections must not evict it before it was ever polled.
        tokio::task::yield_now().await;
    }
}
