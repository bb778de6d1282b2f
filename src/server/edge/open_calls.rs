//! The bound on open calls: at most [`MAX_OPEN_CALLS`] at once, [`MAX_OPEN_CALLS_PER_UID`] of
//! one peer uid; more are refused at once (`ResourceExhausted`), counted and logged here, before
//! anything else is spent on them. An admitted call carries its [`Peer`] to the handlers and
//! holds its share until its response is ready.

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};
use tracing::warn;

use super::super::connections::ConnInfo;
use super::{BoxFuture, LogBudget, MAX_OPEN_CALLS, MAX_OPEN_CALLS_PER_UID, method_name, take_ready};
use crate::error::Error;
use crate::service::CallCounter;
use crate::shares::{Peer, Shares};

/// Calls open at once on one connection: above the server's stream limit, so never binding.
const MAX_OPEN_CALLS_PER_CONNECTION: usize = 128;
/// The peer of a call that came with no connection record (not served on the socket).
const UNKNOWN_PEER: Peer = Peer {
    uid: None,
    conn: u64::MAX,
};

/// Builds [`OpenCalls`] services, all sharing one set of shares.
#[derive(Clone)]
pub struct OpenCallsLayer {
    counter: CallCounter,
    log_budget: Arc<LogBudget>,
    open_calls: Arc<Shares>,
}

impl OpenCallsLayer {
    pub fn new(counter: CallCounter, log_budget: Arc<LogBudget>) -> Self {
        Self {
            counter,
            log_budget,
            open_calls: Shares::new(MAX_OPEN_CALLS, MAX_OPEN_CALLS_PER_UID, MAX_OPEN_CALLS_PER_CONNECTION),
        }
    }
}

impl<S> Layer<S> for OpenCallsLayer {
    type Service = OpenCalls<S>;

    fn layer(&self, inner: S) -> OpenCalls<S> {
        OpenCalls {
            inner,
            layer: self.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct OpenCalls<S> {
    inner: S,
    layer: OpenCallsLayer,
}

impl<S> Service<Request<Body>> for OpenCalls<S>
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let mut inner = take_ready(&mut self.inner);
        let layer = self.layer.clone();
        Box::pin(async move {
            let method = method_name(request.uri().path());
            let peer = request
                .extensions()
                .get::<ConnInfo>()
                .map_or(UNKNOWN_PEER, |c| c.0.peer());
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
                    return Ok(Error::PeerShare(limit).to_http());
                }
            };
            request.extensions_mut().insert(peer);
            inner.call(request).await
        })
    }
}
