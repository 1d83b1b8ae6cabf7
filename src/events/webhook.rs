//! Delivering queued events to their webhooks. Every instance sharing the metadata database
//! runs a [`Deliverer`]; a lease per attempt (`LeaseRows`, as purges use) keeps an event to one
//! instance at a time, and the event is read again under the lease, so one another instance
//! has just delivered is not sent again. An instance that dies mid-attempt leaves the lease to
//! expire and the event to be sent again: delivery is at least once, and receivers
//! deduplicate by the event id. Attempts back off from a second to `events.retry_max` (a
//! receiver's `Retry-After` is followed within that) until `events.give_up_after`.

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
/// How much longer than one attempt its lease lasts.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);
/// How often events past their retention are removed.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// The most of a receiver's answer that is read (and thrown away).
const MAX_ANSWER: usize = 64 * 1024;

pub struct Deliverer {
    service: Arc<Service>,
    /// `None` only if the TLS stack could not be set up; every attempt then fails clearly.
    http: Option<reqwest::Client>,
    pruned: Mutex<Option<Instant>>,
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
            pruned: Mutex::new(None),
        }
    }

    /// Attempts every due delivery this instance can claim; returns how many due events it
    /// found (a full batch means there may be more).
    pub async fn pass(&self) -> Result<usize, MetadataError> {
        let runtime = self.service.runtime();
        let config = &runtime.config.events;
        self.prune_if_due(config).await;
        let metadata = self.service.metadata();
        if config.webhooks.is_empty() {
            // Nothing to deliver to: what is pending waits for a webhook (or its give-up time).
            return Ok(0);
        }
        let due = metadata
            .events_due(crate::time::now_unix_ms(), BATCH)
            .await?;
        let found = due.len();
        futures::stream::iter(due)
            .for_each_concurrent(CONCURRENCY, |event| async move {
                if let Err(e) = self.attempt(config, event).await {
                    tracing::debug!(error = %e, "could not record a delivery attempt; it is retried");
                }
            })
            .await;
        let pending = metadata.events_pending().await?;
        self.service.metrics().events_queued.set(pending as i64);
        Ok(found)
    }

    async fn prune_if_due(&self, config: &EventsConfig) {
        {
            let mut last = self.pruned.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let before = crate::time::now_unix_ms() - config.retention.as_millis() as i64;
        match self.service.metadata().events_prune(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "removed events past their retention"),
            Err(e) => tracing::debug!(error = %e, "could not remove old events; retried later"),
        }
    }

    /// One attempt at `event`, if this instance can claim it now.
    async fn attempt(
        &self,
        config: &EventsConfig,
        event: EventRecord,
    ) -> Result<(), MetadataError> {
        let metadata = self.service.metadata();
        let Some(hook) = config.webhook_for(&event.workspace) else {
            // Its workspace's webhook was removed since: polling still sees it.
            let next = EventRecord {
                delivery: Delivery::Unrouted,
                last_outcome: Some("no webhook takes its workspace".into()),
                ..event.clone()
            };
            if metadata.event_delivery(&next, event.attempts).await? {
                self.count("unrouted");
            }
            return Ok(());
        };
        let key = format!("event:{}", event.seq);
        let holder = self.service.instance_id();
        if !metadata
            .lease_acquire(&key, holder, hook.timeout + CLAIM_MARGIN)
            .await?
        {
            return Ok(());
        }
        let result = match metadata.event_get(event.seq).await {
            Ok(Some(fresh))
                if fresh.delivery == Delivery::Pending
                    && fresh.next_at_ms <= crate::time::now_unix_ms() =>
            {
                self.attempt_claimed(config, hook, fresh).await
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = metadata.lease_release(&key, holder).await {
            tracing::debug!(error = %e, "could not release a delivery claim; it expires");
        }
        result
    }

    async fn attempt_claimed(
        &self,
        config: &EventsConfig,
        hook: &Webhook,
        event: EventRecord,
    ) -> Result<(), MetadataError> {
        let metadata = self.service.metadata();
        let now = crate::time::now_unix_ms();
        if now.saturating_sub(event.at_ms) > config.give_up_after.as_millis() as i64 {
            tracing::error!(event = %event.id, r#type = event.kind.as_str(), credential = %event.credential_id,
                webhook = %hook.key, attempts = event.attempts, last = ?event.last_outcome,
                "gave up delivering an event after events.give_up_after; it stays listed by GET /v1/events");
            let next = EventRecord {
                delivery: Delivery::Failed,
                ..event.clone()
            };
            if metadata.event_delivery(&next, event.attempts).await? {
                self.count("failed");
            }
            return Ok(());
        }
        let attempts = event.attempts + 1;
        let outcome = self.send(hook, &event).await;
        let next = match outcome {
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
                let wait = failure
                    .retry_after
                    .unwrap_or_else(|| {
                        crate::time::backoff(RETRY_MIN, config.retry_max, attempts as u32)
                    })
                    .min(config.retry_max);
                // Warned once per event; a receiver that stays down is in the metrics.
                if attempts == 1 {
                    tracing::warn!(event = %event.id, webhook = %hook.key, outcome = %failure.outcome, retry_in = ?wait,
                        "delivering an event failed; retrying");
                } else {
                    tracing::debug!(event = %event.id, webhook = %hook.key, attempts, outcome = %failure.outcome, retry_in = ?wait,
                        "delivering an event failed again; retrying");
                }
                EventRecord {
                    attempts,
                    next_at_ms: crate::time::now_unix_ms() + wait.as_millis() as i64,
                    last_outcome: Some(failure.outcome),
                    ..event.clone()
                }
            }
        };
        let delivered = next.delivery == Delivery::Delivered;
        if metadata.event_delivery(&next, event.attempts).await? {
            self.count(if delivered { "delivered" } else { "retried" });
        }
        Ok(())
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
