//! Recording re-authorisation events: building the event a change means, recording it with
//! that change (or alone, for what changes no row), counting it, and waking this instance's
//! deliverer. Delivering them is the job of the top-level `events` module (its webhook deliverer).
//!
//! A credential's `needs_reauth` flag is the state the events report: it is set when its
//! provider refuses the refresh token or its Composio account stops being `ACTIVE`, and
//! cleared when new tokens or secrets are stored or the account is usable again. Each change
//! of the flag is one compare-and-swap of the row carrying its event, so every instance and
//! attempt that notices the same change records it once, and a crash between the change and
//! its event cannot happen.

use std::sync::Arc;

use sha2::Digest;
use tokio::sync::Notify;

use super::ServiceError;
use crate::config::EventsConfig;
use crate::metadata::{
    CredentialRecord, Delivery, EventKind, EventRecord, Metadata, MetadataError,
};
use crate::metrics::Metrics;

/// What records events; cloned into loads, which run without the service.
#[derive(Clone)]
pub(crate) struct EventSink {
    metadata: Arc<dyn Metadata>,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    /// Ids of events noticed alike again and again (every failed refresh of an expired
    /// token is another notice of one `refresh_failing`) already recorded: not written again.
    noted: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

/// The most ids `noted` keeps before it starts over.
const NOTED_MAX: usize = 10_000;

impl EventSink {
    pub(super) fn new(metadata: Arc<dyn Metadata>, metrics: Arc<Metrics>) -> Self {
        Self {
            metadata,
            metrics,
            wake: Arc::new(Notify::new()),
            noted: Arc::default(),
        }
    }

    /// Notified whenever this instance records an event, so its deliverer need not wait for
    /// the next poll.
    pub(crate) fn recorded_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// The event `kind` about `record`, queued for the webhook its workspace has now (or for
    /// polling only). `key`: what makes it the same event when noticed again (by another
    /// attempt or instance); `None` for a change the row's compare-and-swap already makes
    /// unique.
    pub(super) fn event(
        &self,
        config: &EventsConfig,
        kind: EventKind,
        record: &CredentialRecord,
        reason: String,
        key: Option<&[&str]>,
    ) -> EventRecord {
        let now = crate::time::now_unix_ms();
        let id = match key {
            Some(parts) => derived_id(kind, &record.id, parts),
            None => format!("evt_{}", uuid::Uuid::new_v4().simple()),
        };
        let delivery = if config.webhook_for(&record.workspace).is_some() {
            Delivery::Pending
        } else {
            Delivery::Unrouted
        };
        EventRecord {
            seq: 0,
            id,
            kind,
            credential_id: record.id.clone(),
            workspace: record.workspace.clone(),
            environment: record.environment.clone(),
            integration_type: record.integration_type.clone(),
            reason,
            at_ms: now,
            delivery,
            attempts: 0,
            next_at_ms: now,
            last_outcome: None,
        }
    }

    /// Counts, logs and announces an event that was just recorded.
    pub(super) fn recorded(&self, event: &EventRecord) {
        self.metrics
            .events
            .with_label_values(&[event.kind.as_str()])
            .inc();
        tracing::info!(event = %event.id, r#type = event.kind.as_str(), credential = %event.credential_id,
            workspace = %event.workspace, reason = %event.reason, "recorded an event");
        if event.delivery == Delivery::Pending {
            self.wake.notify_one();
        }
    }

    /// Records an event no row change carries; a second notice of the same event (same id)
    /// records nothing, and neither does one that `requires` an event that was not recorded.
    pub(super) async fn add(
        &self,
        event: EventRecord,
        requires: Option<&str>,
    ) -> Result<(), MetadataError> {
        let noted = || self.noted.lock().unwrap_or_else(|p| p.into_inner());
        if noted().contains(&event.id) {
            return Ok(());
        }
        if self.metadata.event_add(&event, requires).await? {
            self.recorded(&event);
        }
        // Recorded now or before: either way there is nothing left to write. (One that
        // required another is not remembered: that one may be recorded later.)
        if requires.is_none() {
            let mut noted = noted();
            if noted.len() >= NOTED_MAX {
                noted.clear();
            }
            noted.insert(event.id);
        }
        Ok(())
    }

    /// Sets or clears `needs_reauth` on the row, with the event that says so, unless it already
    /// says so. Returns the row as it is afterwards. `current` is re-read on a lost
    /// compare-and-swap, a few times; if its secret changed meanwhile (new tokens stored by a
    /// PATCH on another instance, say), what was observed was about the old one and nothing is
    /// changed: the user who just authorised again must not be told to do it once more.
    pub(super) async fn flag(
        &self,
        config: &EventsConfig,
        mut current: CredentialRecord,
        needs_reauth: bool,
        kind: EventKind,
        reason: &str,
    ) -> Result<CredentialRecord, ServiceError> {
        let observed = (current.location.clone(), current.token_at_ms);
        for _ in 0..4 {
            if current.needs_reauth == needs_reauth
                || (current.location.clone(), current.token_at_ms) != observed
            {
                return Ok(current);
            }
            let mut next = current.clone();
            next.needs_reauth = needs_reauth;
            next.row_version += 1;
            next.updated_at = crate::time::now_unix();
            let event = self.event(config, kind, &current, reason.to_owned(), None);
            match self
                .metadata
                .update_credential(&next, current.row_version, None, Some(&event))
                .await
            {
                Ok(_) => {
                    self.recorded(&event);
                    if let Ok(n) = self.metadata.count_needs_reauth().await {
                        self.metrics.needs_reauth.set(n as i64);
                    }
                    return Ok(next);
                }
                Err(MetadataError::Conflict) => {
                    current = self
                        .metadata
                        .get_credential(&current.id)
                        .await?
                        .ok_or(ServiceError::NotFound)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServiceError::Conflict)
    }
}

/// The id of an event identified by what it is about: the same parts give the same id.
pub(super) fn derived_id(kind: EventKind, credential_id: &str, parts: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    for p in [kind.as_str(), credential_id].iter().chain(parts) {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("evt_{hex}")
}

impl super::Service {
    /// The event a write from `current` to `next` is, if it clears `needs_reauth` (new
    /// secrets stored with PATCH, or new tokens).
    pub(super) fn reauthorized(
        &self,
        current: &CredentialRecord,
        next: &CredentialRecord,
    ) -> Option<EventRecord> {
        (current.needs_reauth && !next.needs_reauth).then(|| {
            self.events.event(
                &self.runtime.load().config.events,
                EventKind::Reauthorized,
                current,
                "new tokens or secrets were stored for the credential".to_owned(),
                None,
            )
        })
    }
}

/// A page of `GET /v1/events`.
pub struct EventPage {
    /// The events the caller may see (those of workspaces and environments it may read).
    pub events: Vec<EventRecord>,
    /// The `seq` to ask after next: the last event looked at, seen or not.
    pub next_after: i64,
    /// Whether more events were recorded after `next_after` when this page was read.
    pub more: bool,
}

impl super::Service {
    /// Events recorded after `after`, as far as `caller` may see them. A page holds at most
    /// `limit` events and may hold fewer (the ones the caller may not see are skipped).
    pub async fn list_events(
        &self,
        caller: &crate::access::Caller,
        after: i64,
        limit: usize,
    ) -> Result<EventPage, ServiceError> {
        use crate::access::{Action, Scope};
        if !self.allows(caller, Action::View, Scope::ANY) {
            return Err(ServiceError::Forbidden);
        }
        let rows = self.metadata.events_after(after, limit).await?;
        let more = rows.len() == limit;
        let next_after = rows.last().map_or(after, |e| e.seq);
        let policy = &self.runtime.load().policy;
        let events = rows
            .into_iter()
            .filter(|e| {
                policy.allows(
                    caller,
                    Action::View,
                    Scope::credential(&e.workspace, &e.environment),
                )
            })
            .collect();
        Ok(EventPage {
            events,
            next_after,
            more,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let a = derived_id(EventKind::RefreshFailing, "c1", &["100", "5"]);
        assert_eq!(
            a,
            derived_id(EventKind::RefreshFailing, "c1", &["100", "5"])
        );
        assert_ne!(
            a,
            derived_id(EventKind::RefreshFailing, "c1", &["100", "6"])
        );
        assert_ne!(
            a,
            derived_id(EventKind::RefreshFailing, "c2", &["100", "5"])
        );
        // Parts are separated: ("1", "00") is not ("10", "0").
        assert_ne!(
            derived_id(EventKind::RefreshFailing, "c", &["1", "00"]),
            derived_id(EventKind::RefreshFailing, "c", &["10", "0"])
        );
        assert!(a.starts_with("evt_") && a.len() == 36);
    }
}
