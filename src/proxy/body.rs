//! Bodies that stream through the proxy without being held: the worker's request body on its
//! way up, and the upstream's answer on its way back, each cut at `proxy.max_body_bytes`. The
//! answer also holds the call's slots, so a call counts until its body ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::{ProxyError, Slots};
use crate::config::{ProxyConfig, Upstream};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than proxy.max_body_bytes")]
    TooLarge,
    #[error("the worker's request body broke off: {0}")]
    Worker(hyper::Error),
    #[error("the upstream's answer broke off")]
    Upstream,
}

/// Bytes seen against a limit.
struct Counted {
    seen: u64,
    limit: u64,
}

impl Counted {
    /// Counts `frame`'s data; `false` once past the limit.
    fn admits(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            self.seen += data.len() as u64;
        }
        self.seen <= self.limit
    }
}

/// How a streamed request body ended, when it did not end well: read after a failed send, to
/// answer the worker for its own body rather than blame the upstream.
#[derive(Clone, Default)]
pub(super) struct UploadState(Arc<AtomicU8>);

const TOO_LARGE: u8 = 1;
const BROKE_OFF: u8 = 2;

impl UploadState {
    fn set(&self, state: u8) {
        self.0.store(state, Ordering::Release);
    }

    /// The worker's part in a failed send, if it had one.
    pub(super) fn error(&self) -> Option<ProxyError> {
        match self.0.load(Ordering::Acquire) {
            TOO_LARGE => Some(ProxyError::TooLarge),
            BROKE_OFF => Some(ProxyError::WorkerBody("it broke off".into())),
            _ => None,
        }
    }
}

/// The worker's request body, streamed upstream. Going past the limit fails the body (the
/// upstream sees a broken request, never a truncated one that looks whole).
pub struct Upload {
    inner: Incoming,
    counted: Counted,
    state: UploadState,
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
            Poll::Ready(Some(Ok(frame))) if !this.counted.admits(&frame) => {
                this.state.set(TOO_LARGE);
                Poll::Ready(Some(Err(BodyError::TooLarge)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.set(BROKE_OFF);
                Poll::Ready(Some(Err(BodyError::Worker(e))))
            }
            other => other.map(|f| f.map(|f| f.map_err(BodyError::Worker))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body, as far as a retry is concerned.
pub(super) enum Outgoing {
    /// None at all (`None`), or read whole (at most `proxy.replay_buffer_bytes`, perhaps
    /// empty: `Content-Length: 0`): can be sent again.
    Replayable(Option<Bytes>),
    /// Streamed as it arrives: sent once.
    Streamed(Option<Upload>, UploadState),
}

impl Outgoing {
    /// The worker's request body: none; read whole when small enough to send twice;
    /// otherwise streamed. `declared`: the request had a `Content-Length`.
    pub(super) async fn read(
        config: &ProxyConfig,
        upstream: &Upstream,
        incoming: Incoming,
        declared: bool,
    ) -> Result<Outgoing, ProxyError> {
        let length = incoming.size_hint().exact();
        if incoming.is_end_stream() {
            return Ok(Outgoing::Replayable(declared.then(Bytes::new)));
        }
        if length.is_some_and(|n| n > config.max_body_bytes) {
            return Err(ProxyError::TooLarge);
        }
        if length.is_some_and(|n| n <= config.replay_buffer_bytes as u64) {
            let read = tokio::time::timeout(upstream.timeout, incoming.collect()).await;
            return match read {
                Ok(Ok(collected)) => Ok(Outgoing::Replayable(Some(collected.to_bytes()))),
                Ok(Err(e)) => Err(ProxyError::WorkerBody(e.to_string())),
                Err(_) => Err(ProxyError::WorkerBody("it did not arrive in time".into())),
            };
        }
        let state = UploadState::default();
        let upload = Upload {
            inner: incoming,
            counted: Counted {
                seen: 0,
                limit: config.max_body_bytes,
            },
            state: state.clone(),
        };
        Ok(Outgoing::Streamed(Some(upload), state))
    }

    /// Adds the body to `builder` (the first time only, for a streamed one); whether it can be
    /// sent again.
    pub(super) fn attach(
        &mut self,
        mut builder: reqwest::RequestBuilder,
    ) -> (reqwest::RequestBuilder, bool) {
        match self {
            Outgoing::Replayable(Some(bytes)) => {
                // An empty body is sent with its `Content-Length: 0`: some servers refuse a
                // POST without one (411).
                builder = builder
                    .header(http::header::CONTENT_LENGTH, bytes.len())
                    .body(bytes.clone());
                (builder, true)
            }
            Outgoing::Replayable(None) => (builder, true),
            Outgoing::Streamed(upload, _) => {
                if let Some(upload) = upload.take() {
                    builder = builder.body(reqwest::Body::wrap(upload));
                }
                (builder, false)
            }
        }
    }

    /// What the worker's body had to do with a failed send.
    pub(super) fn error(&self) -> Option<ProxyError> {
        match self {
            Outgoing::Streamed(_, state) => state.error(),
            Outgoing::Replayable(_) => None,
        }
    }
}

/// The upstream's answer body, streamed to the worker. Its part that holds anything (the
/// upstream's body and the call's slots) is shared with a watchdog that empties it at the
/// call's deadline: a worker that stops reading is no longer polled by the server, so a
/// deadline inside the body alone would never fire, and the slots would be held for as long
/// as the worker keeps its connection open.
pub struct Answer {
    held: Arc<std::sync::Mutex<Held>>,
    watchdog: tokio::task::AbortHandle,
}

struct Held {
    inner: Option<reqwest::Body>,
    counted: Counted,
    slots: Option<Slots>,
    /// The body ended cleanly (`inner` is gone without a failure).
    ended: bool,
    /// Whoever last found nothing to read: woken when the watchdog cuts the body, which drops
    /// the upstream's body and the wake-up it would have sent.
    waker: Option<std::task::Waker>,
}

impl Held {
    fn failed(&mut self, kind: &str) {
        self.inner = None;
        if let Some(slots) = self.slots.take() {
            slots.failed(kind);
        }
    }
}

impl Answer {
    pub(super) fn new(
        inner: reqwest::Body,
        limit: u64,
        slots: Slots,
        deadline: tokio::time::Instant,
    ) -> Self {
        let held = Arc::new(std::sync::Mutex::new(Held {
            inner: Some(inner),
            counted: Counted { seen: 0, limit },
            slots: Some(slots),
            ended: false,
            waker: None,
        }));
        let watched = Arc::downgrade(&held);
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(held) = watched.upgrade() {
                let mut held = held.lock().unwrap_or_else(|p| p.into_inner());
                if held.inner.is_some() {
                    tracing::info!(
                        "a proxied answer was still streaming at its upstream's timeout; cut"
                    );
                    held.failed("timeout");
                    if let Some(waker) = held.waker.take() {
                        waker.wake();
                    }
                }
            }
        })
        .abort_handle();
        Self { held, watchdog }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut held = self.held();
        let held = &mut *held;
        let Some(inner) = held.inner.as_mut() else {
            // Ended, or cut (by the limit, the watchdog or a failure): never a silent end.
            return if held.ended {
                Poll::Ready(None)
            } else {
                Poll::Ready(Some(Err(BodyError::Upstream)))
            };
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if !held.counted.admits(&frame) => {
                held.failed("body");
                Poll::Ready(Some(Err(BodyError::TooLarge)))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                let kind = if e.is_timeout() { "timeout" } else { "body" };
                // Without the URL: it may carry the credential (the `query` kind).
                tracing::info!(error = %e.without_url(), "an upstream's answer broke off");
                held.failed(kind);
                Poll::Ready(Some(Err(BodyError::Upstream)))
            }
            Poll::Ready(None) => {
                held.inner = None;
                held.slots = None;
                held.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                held.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A cut body is not at its end: the next poll reports the failure, so the worker sees
        // a broken answer, never a short one that looks whole.
        let held = self.held();
        held.ended || held.inner.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.held()
            .inner
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}
