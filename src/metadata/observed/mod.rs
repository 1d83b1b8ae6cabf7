//! [`Observed`]: the metadata database as the daemon uses it, wrapped so that every failure
//! is seen. A failed write is counted by kind (`credproxy_metadata_write_failures_total`)
//! and logged with the database's reason, at most once per [`LOG_EVERY`] per kind with the
//! number of lines held back meanwhile; a failed read is logged the same way. A write that
//! failed in a way that persists (full, read-only, unreachable) makes the database
//! unwritable for readiness until a write succeeds again; the instance heartbeat writes
//! every two seconds while that lasts, so that happens without traffic once the cause is gone.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::IntCounterVec;

mod queues;

use super::{
    CredentialRecord, CredentialRows, EventRecord, Fault, FleetRows, Invalidation, JournalEntry,
    JournalRows, LeaseRows, Liveness, Metadata, MetadataError, PendingTokenRows, SealedRecord,
    SealedRows, SealedSummary,
};

/// At most one log line per kind of failure (read or write, and fault) this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// A persistent fault clears only once writes have gone this long without one: on a full disk
/// small writes that fit in pages already allocated (the heartbeat) still succeed while
/// anything larger fails, and readiness must not flip back on their account.
pub const CLEAR_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Access {
    Read,
    Write,
}

#[derive(Default)]
struct State {
    /// The persistent fault of the last write, until a write succeeds with none failing for
    /// `CLEAR_AFTER`.
    blocked: Option<Fault>,
    /// When a write last failed with a persistent fault.
    last_fault: Option<Instant>,
    /// Writes failed since the last one that succeeded.
    failed: u64,
    /// Per kind: when a line was last logged, and how many were held back since.
    logged: HashMap<(Access, Fault), (Instant, u64)>,
}

/// The daemon's metadata database: any backend, observed.
pub struct Observed {
    inner: Arc<dyn Metadata>,
    failures: IntCounterVec,
    state: Mutex<State>,
}

impl Observed {
    /// Wraps `inner`; `failures` is the write-failure counter, labelled by `reason`.
    pub fn new(inner: Arc<dyn Metadata>, failures: IntCounterVec) -> Self {
        Self {
            inner,
            failures,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn write<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, MetadataError>>,
    ) -> Result<T, MetadataError> {
        let result = call.await;
        match &result {
            Ok(_) => self.written(),
            Err(e) => {
                if let Some(fault) = e.fault() {
                    self.failed(Access::Write, operation, fault, e);
                }
            }
        }
        result
    }

    async fn read<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, MetadataError>>,
    ) -> Result<T, MetadataError> {
        let result = call.await;
        if let Err(e) = &result {
            if let Some(fault) = e.fault() {
                self.failed(Access::Read, operation, fault, e);
            }
        }
        result
    }

    fn written(&self) {
        let mut state = self.state();
        if state.last_fault.is_some_and(|t| t.elapsed() < CLEAR_AFTER) {
            return;
        }
        let failed = std::mem::take(&mut state.failed);
        if let Some(fault) = state.blocked.take() {
            tracing::info!(
                reason = fault.label(),
                failed_writes = failed,
                "metadata database writes succeed again"
            );
        }
    }

    fn failed(&self, access: Access, operation: &'static str, fault: Fault, error: &MetadataError) {
        let now = Instant::now();
        let held_back = {
            let mut state = self.state();
            if access == Access::Write {
                self.failures.with_label_values(&[fault.label()]).inc();
                state.failed += 1;
                if fault.persists() {
                    state.blocked = Some(fault);
                    state.last_fault = Some(now);
                }
            }
            match state.logged.get_mut(&(access, fault)) {
                Some((last, held)) if now.duration_since(*last) < LOG_EVERY => {
                    *held += 1;
                    return;
                }
                Some((last, held)) => {
                    *last = now;
                    std::mem::take(held)
                }
                None => {
                    state.logged.insert((access, fault), (now, 0));
                    0
                }
            }
        };
        match (access, fault) {
            (Access::Write, Fault::Locked) => tracing::warn!(
                reason = fault.label(), operation, suppressed = held_back, error = %error,
                "metadata database write failed"
            ),
            (Access::Write, _) => tracing::error!(
                reason = fault.label(), operation, suppressed = held_back, error = %error,
                "metadata database write failed"
            ),
            (Access::Read, _) => tracing::warn!(
                reason = fault.label(), operation, suppressed = held_back, error = %error,
                "metadata database read failed"
            ),
        }
    }
}

#[async_trait]
impl Liveness for Observed {
    async fn ping(&self) -> Result<(), MetadataError> {
        self.read("ping", self.inner.ping()).await
    }

    fn write_fault(&self) -> Option<Fault> {
        self.state().blocked
    }
}

#[async_trait]
impl CredentialRows for Observed {
    async fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, MetadataError> {
        self.read("get_credential", self.inner.get_credential(id))
            .await
    }

    async fn create_credential(
        &self,
        record: &CredentialRecord,
        journal_id: i64,
    ) -> Result<(), MetadataError> {
        self.write(
            "create_credential",
            self.inner.create_credential(record, journal_id),
        )
        .await
    }

    async fn update_credential(
        &self,
        record: &CredentialRecord,
        expected_row_version: i64,
        abandoned: Option<&JournalEntry>,
        event: Option<&EventRecord>,
    ) -> Result<Option<i64>, MetadataError> {
        self.write(
            "update_credential",
            self.inner
                .update_credential(record, expected_row_version, abandoned, event),
        )
        .await
    }

    async fn delete_credential(
        &self,
        id: &str,
        expected_row_version: i64,
        abandoned: &JournalEntry,
    ) -> Result<i64, MetadataError> {
        self.write(
            "delete_credential",
            self.inner
                .delete_credential(id, expected_row_version, abandoned),
        )
        .await
    }

    async fn list_credentials(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        self.read(
            "list_credentials",
            self.inner.list_credentials(after, limit),
        )
        .await
    }

    async fn count_credentials(&self) -> Result<u64, MetadataError> {
        self.read("count_credentials", self.inner.count_credentials())
            .await
    }

    async fn count_by_manager(&self) -> Result<HashMap<String, u64>, MetadataError> {
        self.read("count_by_manager", self.inner.count_by_manager())
            .await
    }

    async fn location_in_use(&self, manager_id: &str, name: &str) -> Result<bool, MetadataError> {
        self.read(
            "location_in_use",
            self.inner.location_in_use(manager_id, name),
        )
        .await
    }

    async fn manager_in_use(&self, manager_id: &str) -> Result<bool, MetadataError> {
        self.read("manager_in_use", self.inner.manager_in_use(manager_id))
            .await
    }

    async fn oauth_due(
        &self,
        before: i64,
        after: (i64, &str),
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        self.read("oauth_due", self.inner.oauth_due(before, after, limit))
            .await
    }

    async fn count_needs_reauth(&self) -> Result<u64, MetadataError> {
        self.read("count_needs_reauth", self.inner.count_needs_reauth())
            .await
    }
}

#[async_trait]
impl JournalRows for Observed {
    async fn journal_add(&self, entry: &JournalEntry) -> Result<i64, MetadataError> {
        self.write("journal_add", self.inner.journal_add(entry))
            .await
    }

    async fn journal_remove(&self, id: i64) -> Result<(), MetadataError> {
        self.write("journal_remove", self.inner.journal_remove(id))
            .await
    }

    async fn journal_list(&self) -> Result<Vec<JournalEntry>, MetadataError> {
        self.read("journal_list", self.inner.journal_list()).await
    }
}

#[async_trait]
impl SealedRows for Observed {
    async fn sealed_latest(&self, name: &str) -> Result<Option<SealedRecord>, MetadataError> {
        self.read("sealed_latest", self.inner.sealed_latest(name))
            .await
    }

    async fn sealed_get(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        self.read("sealed_get", self.inner.sealed_get(name, version))
            .await
    }

    async fn sealed_insert(&self, record: &SealedRecord) -> Result<(), MetadataError> {
        self.write("sealed_insert", self.inner.sealed_insert(record))
            .await
    }

    async fn sealed_prune(&self, name: &str, keep_from: i64) -> Result<(), MetadataError> {
        self.write("sealed_prune", self.inner.sealed_prune(name, keep_from))
            .await
    }

    async fn sealed_delete(&self, name: &str) -> Result<(), MetadataError> {
        self.write("sealed_delete", self.inner.sealed_delete(name))
            .await
    }

    async fn sealed_list(
        &self,
        query: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<SealedSummary>, bool), MetadataError> {
        self.read("sealed_list", self.inner.sealed_list(query, offset, limit))
            .await
    }

    async fn sealed_with_other_key(
        &self,
        current_key_id: &str,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, MetadataError> {
        self.read(
            "sealed_with_other_key",
            self.inner.sealed_with_other_key(current_key_id, limit),
        )
        .await
    }

    async fn sealed_key_ids(&self) -> Result<Vec<String>, MetadataError> {
        self.read("sealed_key_ids", self.inner.sealed_key_ids())
            .await
    }

    async fn sealed_rewrap(
        &self,
        record: &SealedRecord,
        old_key_id: &str,
    ) -> Result<(), MetadataError> {
        self.write(
            "sealed_rewrap",
            self.inner.sealed_rewrap(record, old_key_id),
        )
        .await
    }
}

#[async_trait]
impl PendingTokenRows for Observed {
    async fn pending_token_put(
        &self,
        credential_id: &str,
        sealed: &SealedRecord,
    ) -> Result<(), MetadataError> {
        self.write(
            "pending_token_put",
            self.inner.pending_token_put(credential_id, sealed),
        )
        .await
    }

    async fn pending_token_get(
        &self,
        credential_id: &str,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        self.read(
            "pending_token_get",
            self.inner.pending_token_get(credential_id),
        )
        .await
    }

    async fn pending_token_delete(&self, credential_id: &str) -> Result<(), MetadataError> {
        self.write(
            "pending_token_delete",
            self.inner.pending_token_delete(credential_id),
        )
        .await
    }
}

#[async_trait]
impl LeaseRows for Observed {
    async fn lease_acquire(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, MetadataError> {
        self.write("lease_acquire", self.inner.lease_acquire(key, holder, ttl))
            .await
    }

    async fn lease_release(&self, key: &str, holder: &str) -> Result<(), MetadataError> {
        self.write("lease_release", self.inner.lease_release(key, holder))
            .await
    }
}

#[async_trait]
impl FleetRows for Observed {
    fn invalidations(&self) -> Option<tokio::sync::broadcast::Receiver<Invalidation>> {
        self.inner.invalidations()
    }

    async fn instance_heartbeat(&self, id: &str, config_hash: &str) -> Result<(), MetadataError> {
        self.write(
            "instance_heartbeat",
            self.inner.instance_heartbeat(id, config_hash),
        )
        .await
    }

    async fn instance_remove(&self, id: &str) -> Result<(), MetadataError> {
        self.write("instance_remove", self.inner.instance_remove(id))
            .await
    }

    async fn live_config_hashes(&self, max_age: Duration) -> Result<Vec<String>, MetadataError> {
        self.read("live_config_hashes", self.inner.live_config_hashes(max_age))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::sqlite::SqliteMetadata;

    fn counter() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["reason"]).unwrap()
    }

    #[tokio::test]
    async fn a_full_database_blocks_writes_until_one_succeeds_and_reads_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(SqliteMetadata::open(&dir.path().join("m.db")).unwrap());
        let failures = counter();
        let observed = Observed::new(Arc::clone(&sqlite) as Arc<dyn Metadata>, failures.clone());
        observed.instance_heartbeat("a", "h").await.unwrap();
        assert_eq!(observed.write_fault(), None);
        // SQLite's own page limit: a write that needs a new page fails as on a full disk.
        sqlite.cap_at_current_size().await;
        let big = "x".repeat(64 * 1024);
        let e = observed.instance_heartbeat("b", &big).await.unwrap_err();
        assert_eq!(e.fault(), Some(Fault::Full), "{e}");
        assert!(e.to_string().contains("full"), "{e}");
        assert_eq!(observed.write_fault(), Some(Fault::Full));
        assert_eq!(failures.with_label_values(&["full"]).get(), 1);
        observed.ping().await.expect("reads still answer");
        assert_eq!(
            observed
                .live_config_hashes(Duration::from_secs(60))
                .await
                .unwrap(),
            vec!["h".to_owned()]
        );
        // A write that fits does not clear it at once: on a full disk small writes succeed
        // while larger ones go on failing.
        observed.instance_heartbeat("a", "h2").await.unwrap();
        assert_eq!(observed.write_fault(), Some(Fault::Full));
        // Once writes have gone CLEAR_AFTER without failing, the next success clears it.
        observed.state().last_fault = Instant::now().checked_sub(CLEAR_AFTER);
        observed.instance_heartbeat("a", "h3").await.unwrap();
        assert_eq!(observed.write_fault(), None);
    }

    #[tokio::test]
    async fn lost_races_are_not_failures() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteMetadata::open(&dir.path().join("m.db")).unwrap());
        let failures = counter();
        let observed = Observed::new(store, failures.clone());
        let record = SealedRecord {
            name: "n".into(),
            version: 1,
            key_id: "k".into(),
            wrapped_key: vec![1],
            ciphertext: vec![2],
            created_at: 1,
        };
        observed.sealed_insert(&record).await.unwrap();
        let e = observed.sealed_insert(&record).await.unwrap_err();
        assert!(matches!(e, MetadataError::AlreadyExists));
        assert_eq!(observed.write_fault(), None);
        for fault in Fault::ALL {
            assert_eq!(failures.with_label_values(&[fault.label()]).get(), 0);
        }
        assert_eq!(observed.sealed_key_ids().await.unwrap(), vec!["k"]);
    }
}
