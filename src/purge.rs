//! Purges of soft-deleted secrets, done in the background. A manager whose delete only marks a
//! secret deleted and wants it purged afterwards (Key Vault with `purge_on_delete`) gets the
//! name recorded in the metadata database by the delete (`service::journal`); the request
//! does not wait. Here each recorded purge is attempted until the manager says it is done —
//! purged, or nothing left to purge — backing off while the delete still runs, and warning
//! when the manager refuses (no purge permission). The records survive restarts and `kill -9`.
//!
//! Every instance sharing the database runs a [`Purger`]; a lease per attempt (`LeaseRows`,
//! as moves and refreshes use) keeps an entry to one instance at a time, and the entry is read
//! again under the lease, so an attempt another instance has just made is not repeated.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::manager::{ManagerError, Purge, SecretsManager};
use crate::metadata::{MetadataError, PurgeEntry};
use crate::service::{Runtime, Service};

/// Entries read per pass, and attempts run at once.
const BATCH: usize = 32;
const CONCURRENCY: usize = 4;
/// The back-off between attempts: doubled from the first up to the last. Key Vault finishes a
/// soft delete within seconds, or minutes for a secret with many versions.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How much longer than one attempt (two calls to the manager, each within the manager
/// timeout) its lease lasts: an instance that dies mid-attempt holds the entry that long.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);
/// When an entry's manager is not loaded on this instance (not built yet, or created moments
/// ago on another instance), how long until this instance looks at it again: moved out of
/// the due window so it cannot crowd out others, but not far, since another instance may
/// have the manager loaded.
const NOT_LOADED_RETRY: Duration = Duration::from_secs(10);
/// At most one warning per manager and outcome this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// When attempt number `attempts` (1 for the first) was made, how long until the next.
fn back_off(attempts: i64) -> Duration {
    let doublings = attempts.saturating_sub(1).clamp(0, 16) as u32;
    RETRY_MIN.saturating_mul(1 << doublings).min(RETRY_MAX)
}

/// The outcome label of an attempt (`credproxy_store_purges_total{outcome}`).
fn outcome(result: &Result<Purge, ManagerError>) -> &'static str {
    match result {
        Ok(Purge::Purged) => "purged",
        Ok(Purge::Gone) => "gone",
        Ok(Purge::Waiting) => "waiting",
        Err(ManagerError::Denied(_)) => "denied",
        Err(_) => "failed",
    }
}

/// Per manager id and outcome: when a warning was last logged, and how many were held back.
type Warned = HashMap<(String, &'static str), (Instant, u64)>;

pub struct Purger {
    service: Arc<Service>,
    warned: Mutex<Warned>,
    /// The gauge's manager labels set at the last pass, to zero those that have emptied.
    labelled: Mutex<HashSet<String>>,
}

impl Purger {
    pub fn new(service: Arc<Service>) -> Self {
        Self {
            service,
            warned: Mutex::default(),
            labelled: Mutex::default(),
        }
    }

    /// Attempts every due purge this instance can claim; returns how many it attempted.
    /// One pass; answers how many purges it attempted, and when the next recorded one is
    /// due if one is within `horizon` (milliseconds since the epoch).
    pub async fn pass(&self, horizon: Duration) -> Result<(usize, Option<i64>), MetadataError> {
        let due = self
            .service
            .metadata()
            .purge_due(crate::time::now_unix_ms(), BATCH)
            .await?;
        let runtime = self.service.runtime();
        let attempted = std::sync::atomic::AtomicUsize::new(0);
        futures::stream::iter(due)
            .for_each_concurrent(CONCURRENCY, |entry| {
                let (runtime, attempted) = (&runtime, &attempted);
                async move {
                    match self.attempt(runtime, entry).await {
                        Ok(true) => {
                            attempted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "could not record a purge attempt; it is retried")
                        }
                    }
                }
            })
            .await;
        let pending = self.count_pending(&runtime).await?;
        // Only when there are some: the earliest due within the horizon, so a fleet does not
        // look every second for one that backs off for minutes.
        let next_due = if pending > 0 {
            let until = crate::time::now_unix_ms() + horizon.as_millis() as i64;
            self.service
                .metadata()
                .purge_due(until, 1)
                .await?
                .first()
                .map(|e| e.next_at_ms)
        } else {
            None
        };
        Ok((attempted.into_inner(), next_due))
    }

    /// One attempt at `entry`, if this instance can work it now. `Ok(false)`: left alone.
    async fn attempt(&self, runtime: &Runtime, entry: PurgeEntry) -> Result<bool, MetadataError> {
        let metadata = self.service.metadata();
        let Some(manager) = runtime.registry.get(&entry.manager_id).cloned() else {
            // Its record stays, and keeps the manager from being released, until an instance
            // that has it loaded works it.
            let next = PurgeEntry {
                next_at_ms: crate::time::now_unix_ms() + NOT_LOADED_RETRY.as_millis() as i64,
                last_outcome: Some("not_loaded".into()),
                ..entry
            };
            metadata.purge_reschedule(&next).await?;
            return Ok(false);
        };
        if !manager.purges_after_delete() {
            tracing::info!(manager = %entry.manager_id, credential = %entry.credential_id,
                "purge_on_delete is off now: the soft-deleted secret is left to the vault's retention period");
            metadata.purge_remove(&entry).await?;
            return Ok(false);
        }
        // One instance at a time: a lease for the attempt, then a fresh read, since another
        // instance may have made this attempt (and rescheduled the entry) since it was listed.
        let key = format!("purge:{}:{}", entry.manager_id, entry.name);
        let holder = self.service.instance_id();
        let timeout = runtime.config.manager_timeout;
        if !metadata
            .lease_acquire(&key, holder, timeout * 2 + CLAIM_MARGIN)
            .await?
        {
            return Ok(false);
        }
        let attempted = match metadata.purge_get(&entry.manager_id, &entry.name).await {
            Ok(Some(fresh)) if fresh.next_at_ms <= crate::time::now_unix_ms() => {
                self.attempt_claimed(runtime, manager, fresh).await
            }
            Ok(_) => Ok(false),
            Err(e) => Err(e),
        };
        if let Err(e) = metadata.lease_release(&key, holder).await {
            tracing::debug!(error = %e, "could not release a purge claim; it expires");
        }
        attempted
    }

    /// The attempt itself, under the entry's lease: ask the manager, count the outcome, and
    /// remove the entry or schedule the next attempt.
    async fn attempt_claimed(
        &self,
        runtime: &Runtime,
        manager: Arc<dyn SecretsManager>,
        entry: PurgeEntry,
    ) -> Result<bool, MetadataError> {
        let metadata = self.service.metadata();
        let label = runtime.topology.metric_label(&entry.manager_id);
        let result = crate::service::call_manager(
            self.service.metrics(),
            runtime.config.manager_timeout,
            &entry.manager_id,
            &label,
            "purge",
            manager.purge_deleted(&entry.name),
        )
        .await;
        let outcome = outcome(&result);
        self.service
            .metrics()
            .store_purges
            .with_label_values(&[label.as_str(), outcome])
            .inc();
        let attempts = entry.attempts + 1;
        match result {
            Ok(done @ (Purge::Purged | Purge::Gone)) => {
                if done == Purge::Purged {
                    tracing::info!(manager = %entry.manager_id, credential = %entry.credential_id, attempts,
                        "soft-deleted secret purged");
                } else {
                    tracing::info!(manager = %entry.manager_id, credential = %entry.credential_id, attempts,
                        "nothing left to purge (purged, recovered or written again meanwhile)");
                }
                metadata.purge_remove(&entry).await?;
                return Ok(true);
            }
            Ok(Purge::Waiting) => {}
            Err(ref e) => self.warn(&entry, outcome, attempts, e),
        }
        let wait = match outcome {
            // A missing permission is not granted within seconds.
            "denied" => RETRY_MAX,
            _ => back_off(attempts),
        };
        metadata
            .purge_reschedule(&PurgeEntry {
                attempts,
                next_at_ms: crate::time::now_unix_ms() + wait.as_millis() as i64,
                last_outcome: Some(outcome.to_owned()),
                ..entry
            })
            .await?;
        Ok(true)
    }

    /// A purge the manager refused or failed, at most once per manager and outcome per
    /// [`WARN_EVERY`]. The error names the store's code, never a value.
    fn warn(&self, entry: &PurgeEntry, outcome: &'static str, attempts: i64, error: &ManagerError) {
        let now = Instant::now();
        let suppressed = {
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            match warned.get_mut(&(entry.manager_id.clone(), outcome)) {
                Some((last, held)) if now.duration_since(*last) < WARN_EVERY => {
                    *held += 1;
                    return;
                }
                Some((last, held)) => {
                    *last = now;
                    std::mem::take(held)
                }
                None => {
                    warned.insert((entry.manager_id.clone(), outcome), (now, 0));
                    0
                }
            }
        };
        match outcome {
            "denied" => {
                tracing::warn!(manager = %entry.manager_id, credential = %entry.credential_id,
                attempts, suppressed, error = %error,
                "cannot purge a soft-deleted secret: the secrets manager refused (grant the purge permission); it stays soft-deleted until purged or its retention period ends; retrying")
            }
            _ => tracing::warn!(manager = %entry.manager_id, credential = %entry.credential_id,
                attempts, suppressed, error = %error,
                "purging a soft-deleted secret failed; retrying"),
        }
    }

    /// Sets `credproxy_store_purges_pending` per manager label.
    async fn count_pending(&self, runtime: &Runtime) -> Result<usize, MetadataError> {
        let counts = self.service.metadata().purge_counts().await?;
        let total = counts.values().map(|n| *n as usize).sum();
        let mut by_label: HashMap<String, i64> = HashMap::new();
        for (id, n) in counts {
            *by_label
                .entry(runtime.topology.metric_label(&id))
                .or_default() += n as i64;
        }
        let gauge = &self.service.metrics().store_purges_pending;
        let mut labelled = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
        for gone in labelled.iter().filter(|l| !by_label.contains_key(*l)) {
            gauge.with_label_values(&[gone.as_str()]).set(0);
        }
        for (label, n) in &by_label {
            gauge.with_label_values(&[label.as_str()]).set(*n);
        }
        labelled.extend(by_label.into_keys());
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_back_off_from_a_second_to_five_minutes() {
        assert_eq!(back_off(1), Duration::from_secs(1));
        assert_eq!(back_off(2), Duration::from_secs(2));
        assert_eq!(back_off(4), Duration::from_secs(8));
        assert_eq!(back_off(9), Duration::from_secs(256));
        assert_eq!(back_off(10), RETRY_MAX);
        assert_eq!(back_off(i64::MAX), RETRY_MAX);
        assert_eq!(back_off(0), RETRY_MIN);
    }

    #[test]
    fn outcomes_are_the_documented_labels() {
        let all = [
            outcome(&Ok(Purge::Purged)),
            outcome(&Ok(Purge::Gone)),
            outcome(&Ok(Purge::Waiting)),
            outcome(&Err(ManagerError::Denied("x".into()))),
            outcome(&Err(ManagerError::Timeout)),
        ];
        assert_eq!(all, crate::metrics::PURGE_OUTCOMES);
    }
}
