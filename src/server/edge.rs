//! The tower layer at the edge of the gRPC server, around every call before it is routed:
//!
//! - admits at most [`MAX_OPEN_CALLS`] calls at once across all connections, whatever their
//!   state, and at most [`MAX_OPEN_CALLS_PER_UID`] of one peer uid; more are refused at once
//!   with `ResourceExhausted`. This is the hard bound on what peers can make the process hold
//!   (about 14 KiB per open call, measured), and one uid's flood leaves the rest to the others.
//!   The call carries its [`Peer`] on to the handlers, whose waiting has its own shares;
//! - gives the request body [`BODY_TIMEOUT`] to arrive whole, and lets at most
//!   [`MAX_WAITING_BODIES`] calls wait for the rest of their body past a short
//!   [`BODY_GRACE`] (more are refused): stalled streams cannot take the open-call slots that
//!   real calls need, while a request whose body follows its headers by a moment, as every
//!   real client's does, never needs a slot;
//! - marks the call in progress on its connection once its request is complete, until its
//!   response is ready (the connection table never evicts a connection with a call being
//!   served, while a connection holding only stalled requests can be evicted);
//! - turns tonic's `OutOfRange` for a request over the size limit into `ResourceExhausted`, the
//!   code the gRPC spec gives a message over the receive limit;
//! - counts every call refused before it reached a handler (size, protobuf decoding, unknown
//!   method), which the handlers cannot see, and logs them at a bounded rate.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;

use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::warn;

use super::connections::{CallGuard, Conn, ConnInfo};
use crate::error::Error;
use crate::service::{CallCounter, Handled, code_label};
use crate::shares::{Peer, Shares};

/// How long a request's body may take to arrive after its headers. The apiserver sends both
/// at once.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Calls that may wait for the rest of their request body at once, across all connections.
pub const MAX_WAITING_BODIES: usize = 256;
/// How long a body may lag its headers before its call needs one of those slots.
pub const BODY_GRACE: Duration = Duration::from_millis(100);
/// Calls open at once, across all connections.
pub const MAX_OPEN_CALLS: usize = 1536;
/// Calls open at once from one peer uid: a third of the total, so it takes three uids (and
/// root, or the socket's permissions, lets in only a few) to fill the server.
pub const MAX_OPEN_CALLS_PER_UID: usize = MAX_OPEN_CALLS / 3;
/// Calls open at once on one connection: above the server's stream limit, so never binding.
const MAX_OPEN_CALLS_PER_CONNECTION: usize = 128;
/// The peer of a call that came with no connection record (not served on the socket).
const UNKNOWN_PEER: Peer = Peer {
    uid: None,
    conn: u64::MAX,
};

/// Builds [`Edge`] services.
#[derive(Clone)]
pub struct EdgeLayer {
    counter: CallCounter,
    max_request_bytes: usize,
    waiting_bodies: Arc<tokio::sync::Semaphore>,
    open_calls: Arc<Shares>,
    log_budget: Arc<LogBudget>,
}

/// At most [`LOG_LINES_PER_SECOND`] lines a second for refused calls, so a flood of bad
/// requests cannot flood the log; every call is still counted in the metrics.
pub const LOG_LINES_PER_SECOND: u64 = 20;

#[derive(Default)]
pub(super) struct LogBudget {
    /// (second since start, lines logged in it) packed as second << 16 | lines.
    window: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl LogBudget {
    /// Whether a line may be written now; if so, how many were suppressed before it.
    pub(super) fn take(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let second = self.started.get_or_init(Instant::now).elapsed().as_secs();
        let window = self.window.load(Relaxed);
        let (at, lines) = (window >> 16, window & 0xffff);
        let next = if at == second { lines + 1 } else { 1 };
        if next > LOG_LINES_PER_SECOND {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        // A lost race only lets a line or two more through.
        self.window.store((second << 16) | next, Relaxed);
        Some(self.suppressed.swap(0, Relaxed))
    }
}

impl EdgeLayer {
    pub fn new(counter: CallCounter, max_request_bytes: usize) -> Self {
        Self {
            counter,
            max_request_bytes,
            waiting_bodies: Arc::new(tokio::sync::Semaphore::new(MAX_WAITING_BODIES)),
            open_calls: Shares::new(MAX_OPEN_CALLS, MAX_OPEN_CALLS_PER_UID, MAX_OPEN_CALLS_PER_CONNECTION),
            log_budget: Arc::new(LogBudget::default()),
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            layer: self.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    layer: EdgeLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<Body>> for Edge<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone is ready only after poll_ready; keep the ready one for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let method = method_name(request.uri().path());
            let conn = request.extensions().get::<ConnInfo>().map(|c| Arc::clone(&c.0));
            let peer = conn.as_ref().map_or(UNKNOWN_PEER, |c| c.peer());
            let _open = match layer.open_calls.try_take(peer) {
                Ok(share) => share,
                Err(limit) => {
                    layer.counter.count(method, Code::ResourceExhausted);
                    if let Some(suppressed) = layer.log_budget.take() {
                        warn!(
                            method,
                            uid = ?peer.uid,
                            limit = limit.as_str(),
                            suppressed,
                            "too many calls open; call refused"
                        );
                    }
                    return Ok(Error::PeerShare(limit).to_status().into_http());
                }
            };
            // Held until the response is ready; set when the request body is complete.
            let in_progress = Arc::new(OnceLock::new());
            let request = request.map(|body| {
                Body::new(RequestBody {
                    inner: body,
                    started: Instant::now(),
                    deadline: None,
                    waiting: Arc::clone(&layer.waiting_bodies),
                    slot: None,
                    conn,
                    in_progress: Arc::clone(&in_progress),
                })
            });
            let mut request = request;
            let handled = Handled::default();
            request.extensions_mut().insert(handled.clone());
            request.extensions_mut().insert(peer);
            let mut response = inner.call(request).await?;
            drop(in_progress);
            let code = grpc_status(&response);
            if code == Some(Code::OutOfRange) {
                let status = Error::TooLarge(layer.max_request_bytes).to_status();
                let headers = response.headers_mut();
                headers.insert("grpc-status", HeaderValue::from(status.code() as i32));
                headers.insert("grpc-message", HeaderValue::try_from(status.message()).expect("ASCII"));
            }
            if !handled.ran()
                && let Some(code) = grpc_status(&response).filter(|c| *c != Code::Ok)
            {
                layer.counter.count(method, code);
                let message = response
                    .headers()
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect::<String>();
                if let Some(suppressed) = layer.log_budget.take() {
                    warn!(
                        method,
                        code = code_label(code),
                        message,
                        suppressed,
                        "request refused before reaching a handler"
                    );
                }
            }
            Ok(response)
        })
    }
}

/// The method's name as a bounded label.
fn method_name(path: &str) -> &'static str {
    match path.strip_prefix("/v2.KeyManagementService/") {
        Some("Status") => "Status",
        Some("Encrypt") => "Encrypt",
        Some("Decrypt") => "Decrypt",
        _ => "other",
    }
}

/// The grpc-status of a trailers-only response (how tonic answers a call it refuses early);
/// None when the status will come in the trailers.
fn grpc_status(response: &Response<Body>) -> Option<Code> {
    let value = response
        .headers()
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(Code::from_i32(value))
}

/// A request body with a deadline, that marks its call in progress once it is complete.
struct RequestBody {
    inner: Body,
    started: Instant,
    /// Made only if the body is not all there at the first read (never, for the apiserver).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The slots for calls waiting on their body, and this call's while it waits.
    waiting: Arc<tokio::sync::Semaphore>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    conn: Option<Arc<Conn>>,
    in_progress: Arc<OnceLock<CallGuard>>,
}

impl RequestBody {
    fn complete(&mut self) {
        self.slot = None;
        if let Some(conn) = self.conn.take() {
            let _ = self.in_progress.set(conn.begin_call());
        }
    }
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.complete();
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                if this.inner.is_end_stream() {
                    this.complete();
                }
                Poll::Ready(Some(frame))
            }
            Poll::Pending => {
                let started = this.started;
                // First the grace, then (holding a waiting slot) the rest of the deadline.
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until((started + BODY_GRACE).into())));
                if deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if this.slot.is_some() {
                    return Poll::Ready(Some(Err(Error::BodyTimeout(BODY_TIMEOUT).to_status())));
                }
                match Arc::clone(&this.waiting).try_acquire_owned() {
                    Ok(slot) => this.slot = Some(slot),
                    Err(_) => return Poll::Ready(Some(Err(Error::BodiesWaiting.to_status()))),
                }
                deadline.as_mut().reset((started + BODY_TIMEOUT).into());
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Error::BodyTimeout(BODY_TIMEOUT).to_status()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_call_logs_are_rate_limited() {
        let budget = LogBudget::default();
        let allowed = (0..1000).filter(|_| budget.take().is_some()).count() as u64;
        // All in one second (or at most straddling two).
        assert!(
            (LOG_LINES_PER_SECOND..=2 * LOG_LINES_PER_SECOND).contains(&allowed),
            "{allowed}"
        );
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            budget.take(),
            Some(1000 - allowed),
            "the next line says how many were dropped"
        );
    }
}
