//! Delivering queued events to their webhooks. Every instance sharing the metadata database
//! runs a [`Deliverer`]. An instance claims an event before posting it with a compare-and-swap
//! on the event's row that moves its due time past the attempt, so other instances neither
//! list nor post it meanwhile; the outcome is recorded over that claim. An instance that dies
//! mid-attempt leaves the claim to run out and the event to be posted again: delivery is at
//! least once, and receivers deduplicate by the event id. Attempts back off from a second to
//! `events.retry_max` (longer if the receiver's `Retry-After` asks) until
//! `events.give_up_after`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::{signature, Document, EVENT_ID_HEADER, SIGNATURE_HEADER};
use crate::config::{EventsConfig, Webhook};
use crate::metadata::{Delivery, EventRecord, MetadataError};
use crate::service::Service;

/// Events read per pass, and attempts run at once.
pub const BATCH: usize = 32;
const CONCURRENCY: usize = 4;
const RETRY_MIN: Duration = Duration::from_secs(1);
/// How much longer than one attempt its claim lasts.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);
/// How often events past their retention are removed (and, with no webhook configured,
/// pending ones past `events.give_up_after` given up).
const TIDY_EVERY: Duration = Duration::from_secs(600);
/// When no webhook takes an event's workspace on this instance, how long until it is looked
/// at again.
const UNROUTED_RETRY: Duration = Duration::from_secs(60);
/// The most of a receiver's answer that is read (and thrown away).
const MAX_ANSWER: usize = 64 * 1024;

pub struct Deliverer {
    service: Arc<Service>,
    /// `None` only if the TLS stack could not be set up; every attempt then fails clearly.
    http: Option<reqwest::Client>,
    /// When old events were last removed and long-failing ones given up.
    tidied: Mutex<Option<Instant>>,
}

/// Milliseconds of `d`, saturating: configured durations are bounded, but arithmetic on
/// times must not wrap whatever they are.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Deliverer {
    pub fn new(service: Arc<Service>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Redirects are not followed: the receiver is configured, not discovered.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credproxy/", env!("CARGO_PKG_VERSION")))
            .build();
        if let Err(e) = &http {
            tracing::error!(error = %e, "cannot build the HTTP client for webhooks; deliveries will fail");
        }
        Self {
            service,
            http: http.ok(),
            tidied: Mutex::new(None),
        }
    }

    /// Attempts every due delivery this instance can claim. `true` when it found a full batch
    /// and claimed some of it: there may be more due at once.
    /// One pass. Answers whether it claimed part of a full batch (more may be due at once),
    /// and when the next pending delivery is due, if within `events.poll_interval`.
    pub async fn pass(&self) -> Result<(bool, Option<i64>), MetadataError> {
        let runtime = self.service.runtime();
        let config = &runtime.config.events;
        let tidy = self.tidy_due();
        if tidy {
            self.prune(config).await;
        }
        if config.webhooks.is_empty() && !tidy {
            // Nothing to deliver to. What is pending waits for a webhook; it is looked at
            // only when tidying, to give up what waited too long.
            return Ok((false, None));
        }
        let metadata = self.service.metadata();
        let due = metadata
            .events_due(crate::time::now_unix_ms(), BATCH)
            .await?;
        let full = due.len() >= BATCH;
        let claimed = AtomicUsize::new(0);
        futures::stream::iter(due)
            .for_each_concurrent(CONCURRENCY, |event| {
                let claimed = &claimed;
                async move {
                    match self.attempt(config, event).await {
                        Ok(true) => {
                            claimed.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "could not record a delivery attempt; it is retried")
                        }
                    }
                }
            })
            .await;
        let pending = metadata.events_pending().await?;
        self.service.metrics().events_queued.set(pending as i64);
        // Retries waiting out their back-off: looked for when due, not at every poll, so a
        // fleet of idle instances asks rarely.
        let next_due = if pending > 0 && !config.webhooks.is_empty() {
            let horizon = crate::time::now_unix_ms() + millis(config.poll_interval);
            metadata
                .events_due(horizon, 1)
                .await?
                .first()
                .map(|e| e.next_at_ms)
        } else {
            None
        };
        Ok((full && claimed.into_inner() > 0, next_due))
    }

    fn tidy_due(&self) -> bool {
        let mut last = self.tidied.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < TIDY_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    async fn prune(&self, config: &EventsConfig) {
        let before = crate::time::now_unix_ms().saturating_sub(millis(config.retention));
        match self.service.metadata().events_prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "removed events past their retention"),
            Err(e) => tracing::debug!(error = %e, "could not remove old events; retried later"),
        }
    }

    /// One look at a due event: give it up, put it off, or claim and attempt it. `Ok(true)`
    /// when this instance worked it, `Ok(false)` when another instance had it first.
    async fn attempt(
        &self,
        config: &EventsConfig,
        event: EventRecord,
    ) -> Result<bool, MetadataError> {
        let metadata = self.service.metadata();
        let now = crate::time::now_unix_ms();
        let seen = (event.attempts, event.next_at_ms);
        if now.saturating_sub(event.at_ms) > millis(config.give_up_after) {
            let next = EventRecord {
                delivery: Delivery::Failed,
                ..event.clone()
            };
            if !metadata.event_delivery(&next, seen).await? {
                return Ok(false);
            }
            tracing::error!(event = %event.id, r#type = event.kind.as_str(), credential = %event.credential_id,
                attempts = event.attempts, last = ?event.last_outcome,
                "gave up delivering an event after events.give_up_after; it stays listed by GET /v1/events");
            self.count("failed");
            return Ok(true);
        }
        let Some(hook) = config.webhook_for(&event.workspace) else {
            // Not routed here: during a rolling change of the configuration another instance
            // (or this one after a reload) may have the webhook. Looked at again later, so it
            // does not keep crowding the due list meanwhile.
            let later = EventRecord {
                next_at_ms: now.saturating_add(millis(UNROUTED_RETRY)),
                last_outcome: Some("no webhook takes its workspace on one instance".into()),
                ..event.clone()
            };
            if metadata.event_delivery(&later, seen).await? {
                self.count("unrouted");
            }
            return Ok(false);
        };
        // The claim: the due time moved past the attempt, so no other instance lists it
        // meanwhile; if this one dies, the event is due again when the claim runs out.
        let until = now.saturating_add(millis(hook.timeout + CLAIM_MARGIN));
        let claim = EventRecord {
            next_at_ms: until,
            ..event.clone()
        };
        if !metadata.event_delivery(&claim, seen).await? {
            return Ok(false);
        }
        let attempts = event.attempts + 1;
        let next = match self.send(hook, &event).await {
            Ok(status) => {
                tracing::info!(event = %event.id, r#type = event.kind.as_str(), webhook = %hook.key,
                    attempts, status, "delivered an event");
                EventRecord {
                    delivery: Delivery::Delivered,
                    attempts,
                    last_outcome: Some(format!("HTTP {status}")),
                    ..event.clone()
                }
            }
            Err(failure) => {
                // A receiver's Retry-After may ask for a longer wait, never a shorter one.
                let wait = crate::time::backoff(RETRY_MIN, config.retry_max, attempts as u32)
                    .max(failure.retry_after.unwrap_or_default())
                    .min(config.retry_max);
                // Warned once per event; a receiver that stays down shows in the metrics.
                if attempts == 1 {
                    tracing::warn!(event = %event.id, webhook = %hook.key, outcome = %failure.outcome, retry_in = ?wait,
                        "delivering an event failed; retrying");
                } else {
                    tracing::debug!(event = %event.id, webhook = %hook.key, attempts, outcome = %failure.outcome, retry_in = ?wait,
                        "delivering an event failed again; retrying");
                }
                EventRecord {
                    attempts,
                    next_at_ms: crate::time::now_unix_ms().saturating_add(millis(wait)),
                    last_outcome: Some(failure.outcome),
                    ..event.clone()
                }
            }
        };
        let delivered = next.delivery == Delivery::Delivered;
        if metadata
            .event_delivery(&next, (event.attempts, until))
            .await?
        {
            self.count(if delivered { "delivered" } else { "retried" });
        }
        Ok(true)
    }

    /// Posts the signed document; the status of a 2xx answer, else why not.
    async fn send(&self, hook: &Webhook, event: &EventRecord) -> Result<u16, Failure> {
        let http = self
            .http
            .clone()
            .ok_or_else(|| Failure::new("no HTTP client"))?;
        let key = hook
            .secret
            .resolve(&format!("{}.secret", hook.key))
            .map_err(|_| Failure::new("its secret cannot be read"))?;
        let body = serde_json::to_vec(&Document::of(event))
            .map_err(|_| Failure::new("cannot encode the event"))?;
        let timestamp = crate::time::now_unix();
        let signed = signature(key.expose().as_bytes(), timestamp, &body);
        let answer = http
            .post(hook.url.clone())
            .timeout(hook.timeout)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signed)
            .header(EVENT_ID_HEADER, &event.id)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                Failure::new(if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "connection failed"
                } else {
                    "request failed"
                })
            })?;
        let status = answer.status();
        let retry_after = answer
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (a bounded part of) the answer so the connection can be reused.
        let mut answer = answer;
        let mut read = 0;
        while let Ok(Some(chunk)) = answer.chunk().await {
            read += chunk.len();
            if read > MAX_ANSWER {
                break;
            }
        }
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err(Failure {
                outcome: format!("HTTP {}", status.as_u16()),
                retry_after,
            })
        }
    }

    fn count(&self, outcome: &str) {
        self.service
            .metrics()
            .event_deliveries
            .with_label_values(&[outcome])
            .inc();
    }
}

/// Why an attempt failed: a short outcome for the row and the log (never the URL, which may
/// carry a token), and the receiver's `Retry-After`, if it sent one.
struct Failure {
    outcome: String,
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(outcome: &str) -> Self {
        Self {
            outcome: outcome.to_owned(),
            retry_after: None,
        }
    }
}
