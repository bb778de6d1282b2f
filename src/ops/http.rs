//! The loopback HTTP endpoint: `/metrics` (Prometheus text), `/livez`, `/readyz`, `/healthz`.
//!
//! - `/livez`: the process and its runtime answer (this handler ran).
//! - `/readyz` and `/healthz`: a usable current local KEK (what Status reports) and a backend
//!   probe that succeeded within the last three probe intervals.
//!
//! Plain HTTP/1 on a loopback address: it carries no secrets and must not be exposed.

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
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    if !address.ip().is_loopback() {
        warn!(%address, "metrics/health endpoint is not on a loopback address");
    }
    TcpListener::bind(address).await
}

/// Most concurrent HTTP connections; more are closed at once, so scrapers (or anyone local)
/// cannot use up the file descriptors the gRPC socket needs.
const MAX_CONNECTIONS: usize = 32;

/// Serves the endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, endpoint: Arc<Endpoint>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "metrics endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "metrics endpoint busy; connection closed");
            continue;
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = respond(&endpoint, req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}
