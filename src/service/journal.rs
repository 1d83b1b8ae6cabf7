//! The write journal: recording secret copies and versions that a crash could leave behind
//! unaccounted for, and settling them.
//!
//! Every write follows one journaled pattern so a crash at any point loses nothing and leaves
//! no copy unaccounted for: journal the copy that may be abandoned, write the secrets manager,
//! switch the metadata row (compare-and-swap on its version) in the same transaction that
//! settles the journal, then delete what was abandoned.

use std::time::Duration;

use super::error::manager_failure;
use super::{Runtime, Service, ServiceError};
use crate::metadata::{JournalEntry, JournalKind, PurgeEntry};

/// How long after a soft delete its purge is first tried: Key Vault takes seconds to finish
/// deleting, and a purge before that is refused.
const FIRST_PURGE_AFTER_MS: i64 = 1_000;

/// The purge a soft delete of `entry`'s copy leaves to do.
fn purge_entry(entry: &JournalEntry) -> PurgeEntry {
    let now = crate::time::now_unix_ms();
    PurgeEntry {
        manager_id: entry.manager_id.clone(),
        name: entry.name.clone(),
        credential_id: entry.credential_id.clone(),
        attempts: 0,
        next_at_ms: now + FIRST_PURGE_AFTER_MS,
        last_outcome: None,
        created_at_ms: now,
    }
}

impl Service {
    pub(super) async fn journal(
        &self,
        credential_id: &str,
        manager_id: &str,
        name: &str,
    ) -> Result<i64, ServiceError> {
        self.journal_kind(JournalKind::Copy, credential_id, manager_id, name)
            .await
    }

    pub(super) async fn journal_kind(
        &self,
        kind: JournalKind,
        credential_id: &str,
        manager_id: &str,
        name: &str,
    ) -> Result<i64, ServiceError> {
        Ok(self
            .metadata
            .journal_add(&JournalEntry {
                id: 0,
                kind,
                credential_id: credential_id.to_owned(),
                manager_id: manager_id.to_owned(),
                name: name.to_owned(),
                created_at: crate::time::now_unix(),
            })
            .await?)
    }

    /// Version intents of `credential_id` other than `current`: writes that may have landed
    /// unrecorded.
    pub(super) async fn earlier_intents(
        &self,
        credential_id: &str,
        current: i64,
    ) -> Result<Vec<i64>, ServiceError> {
        Ok(self
            .metadata
            .journal_list()
            .await?
            .into_iter()
            .filter(|e| {
                e.kind == JournalKind::Version
                    && e.credential_id == credential_id
                    && e.id != current
            })
            .map(|e| e.id)
            .collect())
    }

    /// Deletes a journaled copy unless a credential refers to it, then clears the entry. A
    /// failure leaves the entry for the sweeper. Caller holds the credential's lock.
    pub(super) async fn settle(&self, runtime: &Runtime, entry: &JournalEntry) -> bool {
        let settled = async {
            if entry.kind == JournalKind::Version {
                // Never a reason to delete anything; dropped once its credential is gone.
                if self
                    .metadata
                    .get_credential(&entry.credential_id)
                    .await?
                    .is_none()
                {
                    self.metadata.journal_remove(entry.id).await?;
                }
                return Ok::<bool, ServiceError>(true);
            }
            if self
                .metadata
                .location_in_use(&entry.manager_id, &entry.name)
                .await?
            {
                self.metadata.journal_remove(entry.id).await?;
                return Ok::<bool, ServiceError>(true);
            }
            let Ok(manager) = Self::manager(runtime, &entry.manager_id) else {
                return Ok(false);
            };
            if manager.describe().capabilities.read_only {
                self.metadata.journal_remove(entry.id).await?;
                return Ok(true);
            }
            self.call(&entry.manager_id, "delete", manager.delete(&entry.name))
                .await
                .map_err(|e| manager_failure(&entry.manager_id, e))?;
            if manager.purges_after_delete() {
                // Before the journal entry goes: a crash in between deletes again (a no-op)
                // and records the purge again.
                self.metadata.purge_add(&purge_entry(entry)).await?;
                self.purge_recorded.notify_one();
            }
            self.metadata.journal_remove(entry.id).await?;
            Ok(true)
        }
        .await;
        match settled {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(credential = %entry.credential_id, manager = %entry.manager_id, error = %e,
                    "could not remove an abandoned secret copy yet; will retry");
                false
            }
        }
    }

    /// Settles journal entries older than `min_age` (younger ones may belong to a write in
    /// flight in another process). Returns how many remain.
    pub async fn sweep_journal(&self, min_age: Duration) -> Result<usize, ServiceError> {
        let entries = self.metadata.journal_list().await?;
        let runtime = self.runtime();
        let cutoff = crate::time::now_unix() - min_age.as_secs() as i64;
        let mut remaining = 0;
        for entry in entries {
            if entry.created_at > cutoff {
                remaining += 1;
                continue;
            }
            let _guard = self.locks.lock(&entry.credential_id).await;
            if !self.settle(&runtime, &entry).await {
                remaining += 1;
            }
        }
        self.metrics.journal_pending.set(remaining as i64);
        Ok(remaining)
    }
}
