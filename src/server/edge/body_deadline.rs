//! The request body's deadline: [`BODY_TIMEOUT`] to arrive whole after the headers, and at most
//! [`MAX_WAITING_BODIES`] calls waiting for the rest of their body past [`BODY_GRACE`] (more
//! are refused). Stalled streams cannot take the open-call slots real calls need, while a body
//! that follows its headers by a moment, as every real client's does, never needs a slot.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tower::{Layer, Service};

use super::{BODY_GRACE, BODY_TIMEOUT, MAX_WAITING_BODIES};
use crate::error::Error;

/// Builds [`BodyDeadline`] services, all sharing the waiting slots.
#[derive(Clone)]
pub struct BodyDeadlineLayer {
    waiting: Arc<Semaphore>,
}

impl Default for BodyDeadlineLayer {
    fn default() -> Self {
        Self {
            waiting: Arc::new(Semaphore::new(MAX_WAITING_BODIES)),
        }
    }
}

impl<S> Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> BodyDeadline<S> {
        BodyDeadline {
            inner,
            waiting: Arc::clone(&self.waiting),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct BodyDeadline<S> {
    inner: S,
    waiting: Arc<Semaphore>,
}

impl<S> Service<Request<Body>> for BodyDeadline<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    // Only the body changes: the call itself goes straight through.
    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let waiting = Arc::clone(&self.waiting);
        self.inner.call(request.map(|body| {
            Body::new(DeadlineBody {
                inner: body,
                started: Instant::now(),
                deadline: None,
                waiting,
                slot: None,
            })
        }))
    }
}

/// A request body with a deadline.
struct DeadlineBody {
    inner: Body,
    started: Instant,
    /// Made only if the body is not all there at the first read (never, for the apiserver).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The slots for calls waiting on their body, and this call's while it waits.
    waiting: Arc<Semaphore>,
    slot: Option<OwnedSemaphorePermit>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.slot = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                if this.inner.is_end_stream() {
                    this.slot = None;
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
