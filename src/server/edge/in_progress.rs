//! Marks a call in progress on its connection from the moment its request is complete until
//! its response is ready: the connection table never evicts a connection with a call being
//! served, while one holding only stalled requests can be evicted.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

use super::super::connections::{CallGuard, Conn, ConnInfo};
use super::{BoxFuture, take_ready};

/// Builds [`InProgress`] services.
#[derive(Clone, Default)]
pub struct InProgressLayer;

impl<S> Layer<S> for InProgressLayer {
    type Service = InProgress<S>;

    fn layer(&self, inner: S) -> InProgress<S> {
        InProgress { inner }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct InProgress<S> {
    inner: S,
}

impl<S> Service<Request<Body>> for InProgress<S>
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
        Box::pin(async move {
            let conn = request.extensions().get::<ConnInfo>().map(|c| Arc::clone(&c.0));
            // Held until the response is ready; set when the request body is complete.
            let in_progress = Arc::new(OnceLock::new());
            let request = request.map(|body| {
                Body::new(MarkingBody {
                    inner: body,
                    conn,
                    in_progress: Arc::clone(&in_progress),
                })
            });
            let response = inner.call(request).await;
            drop(in_progress);
            response
        })
    }
}

/// A request body that marks its call in progress once it is complete.
struct MarkingBody {
    inner: Body,
    conn: Option<Arc<Conn>>,
    in_progress: Arc<OnceLock<CallGuard>>,
}

impl MarkingBody {
    fn complete(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = self.in_progress.set(conn.begin_call());
        }
    }
}

impl HttpBody for MarkingBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.complete(),
            Poll::Ready(Some(_)) if this.inner.is_end_stream() => this.complete(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
