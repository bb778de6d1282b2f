//! Calls refused before they reached a handler (a request over the size limit, one that is not
//! protobuf, an unknown method, a body that came too late): the handlers cannot count them, so
//! this layer does, by method and code, and logs them within the shared [`LogBudget`].

use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};
use tracing::warn;

use super::{BoxFuture, LogBudget, grpc_status, method_name, take_ready};
use crate::service::{CallCounter, Handled, code_label};

/// Builds [`Refusals`] services.
#[derive(Clone)]
pub struct RefusalsLayer {
    counter: CallCounter,
    log_budget: Arc<LogBudget>,
}

impl RefusalsLayer {
    pub fn new(counter: CallCounter, log_budget: Arc<LogBudget>) -> Self {
        Self { counter, log_budget }
    }
}

impl<S> Layer<S> for RefusalsLayer {
    type Service = Refusals<S>;

    fn layer(&self, inner: S) -> Refusals<S> {
        Refusals {
            inner,
            layer: self.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Refusals<S> {
    inner: S,
    layer: RefusalsLayer,
}

impl<S> Service<Request<Body>> for Refusals<S>
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
            // A handler marks it: a non-OK status without the mark was answered before one ran.
            let handled = Handled::default();
            request.extensions_mut().insert(handled.clone());
            let response = inner.call(request).await?;
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
