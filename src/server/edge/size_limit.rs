//! A request over the size limit: tonic answers `OutOfRange`, while the gRPC spec's code for a
//! message over the receive limit is `ResourceExhausted`; this layer answers
//! [`Error::TooLarge`] instead, through the one error mapping.

use std::task::{Context, Poll};

use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

use super::{BoxFuture, grpc_status, take_ready};
use crate::error::Error;

/// Builds [`SizeLimit`] services for requests of at most `max_request_bytes`.
#[derive(Clone)]
pub struct SizeLimitLayer {
    max_request_bytes: usize,
}

impl SizeLimitLayer {
    pub fn new(max_request_bytes: usize) -> Self {
        Self { max_request_bytes }
    }
}

impl<S> Layer<S> for SizeLimitLayer {
    type Service = SizeLimit<S>;

    fn layer(&self, inner: S) -> SizeLimit<S> {
        SizeLimit {
            inner,
            max_request_bytes: self.max_request_bytes,
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct SizeLimit<S> {
    inner: S,
    max_request_bytes: usize,
}

impl<S> Service<Request<Body>> for SizeLimit<S>
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
        let mut inner = take_ready(&mut self.inner);
        let max_request_bytes = self.max_request_bytes;
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            if grpc_status(&response) == Some(Code::OutOfRange) {
                Error::TooLarge(max_request_bytes).restate(&mut response);
            }
            Ok(response)
        })
    }
}
