//! The tower layers at the edge of the gRPC server, around every call before it is routed, one
//! concern each (composed, in order, in `server::serve`):
//!
//! - [`open_calls`]: admits at most [`MAX_OPEN_CALLS`] calls at once across all connections,
//!   whatever their state, and at most [`MAX_OPEN_CALLS_PER_UID`] of one peer uid; more are
//!   refused at once with `ResourceExhausted`. This is the hard bound on what peers can make the
//!   process hold (about 14 KiB per open call, measured), and one uid's flood leaves the rest to
//!   the others. The call carries its [`Peer`] on to the handlers, whose waiting has its own
//!   shares;
//! - [`refusals`]: counts every call refused before it reached a handler (size, protobuf
//!   decoding, unknown method, a late body), which the handlers cannot see, and logs them at a
//!   bounded rate;
//! - [`size_limit`]: turns tonic's `OutOfRange` for a request over the size limit into
//!   `ResourceExhausted`, the code the gRPC spec gives a message over the receive limit;
//! - [`in_progress`]: marks the call in progress on its connection once its request is
//!   complete, until its response is ready (the connection table never evicts a connection with
//!   a call being served, while a connection holding only stalled requests can be evicted);
//! - [`body_deadline`]: gives the request body [`BODY_TIMEOUT`] to arrive whole, and lets at
//!   most [`MAX_WAITING_BODIES`] calls wait for the rest of their body past a short
//!   [`BODY_GRACE`] (more are refused): stalled streams cannot take the open-call slots that
//!   real calls need, while a request whose body follows its headers by a moment, as every
//!   real client's does, never needs a slot.
//!
//! Every refusal is an [`crate::error::Error`], answered through its one mapping to a status.
//!
//! [`Peer`]: crate::shares::Peer

pub mod body_deadline;
pub mod in_progress;
pub mod open_calls;
pub mod refusals;
pub mod size_limit;

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http::Response;

pub use body_deadline::BodyDeadlineLayer;
pub use in_progress::InProgressLayer;
pub use open_calls::OpenCallsLayer;
pub use refusals::RefusalsLayer;
pub use size_limit::SizeLimitLayer;

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

/// At most [`LOG_LINES_PER_SECOND`] lines a second for refused calls, so a flood of bad
/// requests cannot flood the log; every call is still counted in the metrics. One budget is
/// shared by every layer that logs refusals.
pub const LOG_LINES_PER_SECOND: u64 = 20;

#[derive(Default)]
pub struct LogBudget {
    /// (second since start, lines logged in it) packed as second << 16 | lines.
    window: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl LogBudget {
    /// Whether a line may be written now; if so, how many were suppressed before it.
    pub fn take(&self) -> Option<u64> {
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

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

/// The inner service made ready by `poll_ready`, for this call; a clone (not yet ready) stays
/// for the next one.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
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
