//! Moves: copying a credential to the secrets manager the routing chain now names (on a patch,
//! or as background migration under a claim every instance honours), and dropping managers that
//! were removed from the configuration once nothing refers to them.

use std::sync::Arc;
use std::time::Duration;

use super::error::manager_failure;
use super::input::write_token;
use super::{Runtime, Service, ServiceError, WriteOutcome};
use crate::cache::Loaded;
use crate::manager::{PutRequest, SecretsManager};
use crate::metadata::{CredentialRecord, JournalEntry, JournalKind, Location};
use crate::secret::SecretFields;

/// What a background move did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveOutcome {
    Moved,
    /// Already where the chain says (another process, or a write, moved it).
    InPlace,
    /// Deleted meanwhile.
    Gone,
    /// The source or target is read-only: never moved.
    ReadOnly,
    /// Another instance is moving it.
    Claimed,
}

/// How long a move claim lasts unless renewed (it is, while the move runs): a crashed
/// mover's claims are taken over after this.
const MOVE_CLAIM_TTL: Duration = Duration::from_secs(5);

impl Service {
    /// Copies a credential to another secrets manager, verifies the copy, switches the recorded
    /// location, and deletes the old copy. Caller holds the credential's lock.
    pub(super) async fn move_to(
        &self,
        runtime: &Runtime,
        current: CredentialRecord,
        mut next: CredentialRecord,
        target_id: &str,
        target: &Arc<dyn SecretsManager>,
        value: &SecretFields,
    ) -> Result<WriteOutcome, ServiceError> {
        let id = current.id.clone();
        let name = Self::secret_name(runtime, target_id, &next.workspace, &next.environment, &id);
        let journal_id = self.journal(&id, target_id, &name).await?;
        let version = self
            .call(
                target_id,
                "put",
                target.put(PutRequest {
                    name: &name,
                    value,
                    expected_version: None,
                    idempotency_key: &write_token(),
                }),
            )
            .await
            .map_err(|e| manager_failure(target_id, e))?;
        let copy = self
            .call(target_id, "get", target.get(&name, Some(&version)))
            .await
            .map_err(|e| manager_failure(target_id, e))?;
        if &copy.value != value {
            return Err(ServiceError::ManagerFailed {
                manager: target_id.to_owned(),
                detail: "read-back after copy differs from what was written".into(),
            });
        }
        next.location = Location {
            manager_id: target_id.to_owned(),
            name,
            version: Some(version),
        };
        let abandoned = JournalEntry {
            id: 0,
            kind: JournalKind::Copy,
            credential_id: id.clone(),
            manager_id: current.location.manager_id.clone(),
            name: current.location.name.clone(),
            created_at: crate::time::now_unix(),
        };
        let event = self.reauthorized(&current, &next);
        let old_entry = self
            .metadata
            .update_credential(&next, current.row_version, Some(&abandoned), event.as_ref())
            .await?;
        if let Some(e) = &event {
            self.events.recorded(e);
        }
        self.metadata.journal_remove(journal_id).await?;
        self.cache.replace(
            &id,
            Loaded {
                record: Arc::new(next.clone()),
                secrets: value.clone(),
                valid_until: next.expires_at_ms.map(crate::time::from_unix_ms),
            },
        );
        if let Some(entry_id) = old_entry {
            let entry = JournalEntry {
                id: entry_id,
                ..abandoned
            };
            self.settle(runtime, &entry).await;
        }
        Ok(WriteOutcome { record: next })
    }

    /// Moves one credential to where the routing chain now puts it (background migration):
    /// read, copy, read back and compare, switch the row with compare-and-swap, delete the
    /// old copy — each step journaled, under the credential's lock so writes and refreshes in
    /// this process wait, and a write from another process makes the switch fail and the
    /// move retry from the newer value.
    pub async fn migrate_one(&self, id: &str) -> Result<MoveOutcome, ServiceError> {
        let _guard = self.locks.lock(id).await;
        // One mover per credential across every process sharing the database: a claim that
        // expires on its own if its holder dies, so another instance takes the move over.
        let claim = format!("move:{id}");
        let holder = uuid::Uuid::new_v4().to_string();
        if !self
            .metadata
            .lease_acquire(&claim, &holder, MOVE_CLAIM_TTL)
            .await?
        {
            self.metrics.move_claims.with_label_values(&["busy"]).inc();
            return Ok(MoveOutcome::Claimed);
        }
        self.metrics.move_claims.with_label_values(&["taken"]).inc();
        let moved = {
            let work = self.migrate_claimed(id);
            let renew = self.renew_lease(&claim, &holder, MOVE_CLAIM_TTL);
            tokio::pin!(work, renew);
            tokio::select! {
                r = &mut work => r,
                () = &mut renew => work.await,
            }
        };
        if let Err(e) = self.metadata.lease_release(&claim, &holder).await {
            tracing::debug!(credential = id, error = %e, "could not release a move claim; it expires");
        }
        moved
    }

    async fn migrate_claimed(&self, id: &str) -> Result<MoveOutcome, ServiceError> {
        let runtime = self.runtime();
        let Some(current) = self.metadata.get_credential(id).await? else {
            return Ok(MoveOutcome::Gone);
        };
        let target = runtime.topology.route(
            &current.workspace,
            &current.environment,
            current.pinned_manager.as_deref(),
        );
        if target.manager_id == current.location.manager_id {
            return Ok(MoveOutcome::InPlace);
        }
        let source = Self::manager(&runtime, &current.location.manager_id)?;
        let target_manager = Self::manager(&runtime, &target.manager_id)?;
        if source.describe().capabilities.read_only
            || target_manager.describe().capabilities.read_only
        {
            return Ok(MoveOutcome::ReadOnly);
        }
        let loc = &current.location;
        let value = self
            .call(
                &loc.manager_id,
                "get",
                source.get(&loc.name, loc.version.as_deref()),
            )
            .await
            .map_err(|e| manager_failure(&loc.manager_id, e))?
            .value;
        let mut next = current.clone();
        next.row_version += 1;
        next.updated_at = crate::time::now_unix();
        self.move_to(
            &runtime,
            current,
            next,
            &target.manager_id,
            &target_manager,
            &value,
        )
        .await?;
        Ok(MoveOutcome::Moved)
    }

    /// Drops secrets managers kept in the registry after they were removed from the
    /// configuration, once no credential and no journal entry refers to them any more. Returns
    /// the ids dropped.
    pub async fn prune_retired(&self) -> Result<Vec<String>, ServiceError> {
        let runtime = self.runtime();
        let mut retired = Vec::new();
        for id in runtime.registry.ids() {
            if id != crate::config::LOCAL_MANAGER_ID
                && runtime.topology.manager(id).is_none_or(|m| m.retiring)
                && !self.metadata.manager_in_use(id).await?
            {
                retired.push(id.to_owned());
            }
        }
        if retired.is_empty() {
            return Ok(retired);
        }
        // A retiring manager's record (deleted through the API, or removed from the file while
        // it held credentials) goes with it; the other instances drop it when they see that.
        for id in &retired {
            if runtime.topology.manager(id).is_some_and(|m| m.retiring) {
                self.metadata.manager_delete(id).await?;
            }
        }
        let mut registry = runtime.registry.clone();
        let mut topology = runtime.topology.clone();
        for id in &retired {
            registry.remove(id);
            topology.remove(id);
        }
        // Only if no reload happened meanwhile; otherwise the next pass prunes.
        let next = Arc::new(Runtime {
            config: Arc::clone(&runtime.config),
            registry,
            policy: runtime.policy.clone(),
            topology,
            control_version: runtime.control_version,
        });
        let previous = self.runtime.compare_and_swap(&runtime, next);
        if !Arc::ptr_eq(&previous, &runtime) {
            return Ok(Vec::new());
        }
        Ok(retired)
    }
}
