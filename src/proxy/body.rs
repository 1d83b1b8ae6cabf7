//! Bodies that stream through the proxy without being held: the worker's request body on its
//! way up, and the upstream's answer on its way back, each cut at `proxy.max_body_bytes`. The
//! answer also holds the call's concurrency slots, so a call counts until its body ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::Slots;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than proxy.max_body_bytes")]
    TooLarge,
    #[error("the worker's request body broke off: {0}")]
    Worker(hyper::Error),
    #[error("the upstream's answer broke off")]
    Upstream,
}

/// The worker's request body, streamed upstream. Going past `limit` fails the body (the
/// upstream sees a broken request, never a truncated one that looks whole) and sets `exceeded`
/// so the call is answered `413`.
pub struct Upload {
    inner: Incoming,
    seen: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl Upload {
    pub fn new(inner: Incoming, limit: u64, exceeded: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            seen: 0,
            limit,
            exceeded,
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.exceeded.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Worker(e)))),
            other => other.map(|_| None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's answer body, streamed to the worker.
pub struct Answer {
    inner: reqwest::Body,
    seen: u64,
    limit: u64,
    /// The call's slots and its metric handles; released when the body ends or is dropped.
    slots: Option<Slots>,
}

impl Answer {
    pub fn new(inner: reqwest::Body, limit: u64, slots: Slots) -> Self {
        Self {
            inner,
            seen: 0,
            limit,
            slots: Some(slots),
        }
    }

    fn failed(&mut self, kind: &str) {
        if let Some(slots) = self.slots.take() {
            slots.failed(kind);
        }
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.failed("body");
                        return Poll::Ready(Some(Err(BodyError::TooLarge)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let kind = if e.is_timeout() { "timeout" } else { "body" };
                // Without the URL: it may carry the credential (the `query` kind).
                tracing::info!(error = %e.without_url(), "an upstream's answer broke off");
                this.failed(kind);
                Poll::Ready(Some(Err(BodyError::Upstream)))
            }
            Poll::Ready(None) => {
                this.slots = None;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
