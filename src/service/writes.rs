//! Writes: create, patch and delete a credential, and write a new version of its secret where
//! it already is. Each follows the journal protocol in `journal.rs`; a patch that changes where
//! the credential belongs hands over to `moves.rs`.

use std::sync::Arc;

use super::error::manager_failure;
use super::input::{
    check_fields, check_patch, check_scope, check_secrets_size, write_token, CreateFields,
};
use super::refresh::{ACCESS_TOKEN, CLIENT_SECRET};
use super::{CreateRequest, PatchRequest, Runtime, Service, ServiceError};
use crate::access::{Action, Caller, Scope};
use crate::cache::Loaded;
use crate::config::{is_valid_name, LOCAL_MANAGER_ID};
use crate::manager::{ManagerError, PutRequest, SecretsManager};
use crate::metadata::{CredentialRecord, GrantType, JournalEntry, JournalKind, Location};
use crate::secret::SecretFields;

/// What a write answers: never the secrets.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub record: CredentialRecord,
}

impl Service {
    pub async fn create(
        &self,
        caller: &Caller,
        request: CreateRequest,
    ) -> Result<WriteOutcome, ServiceError> {
        let environment = request.environment;
        let workspace = check_scope(request.workspace, &environment)?;
        if !self.allows(
            caller,
            Action::Write,
            Scope::credential(&workspace, &environment),
        ) {
            return Err(ServiceError::Forbidden);
        }
        let limits = self.runtime().config.credentials.clone();
        let CreateFields {
            integration_type,
            metadata,
            oauth,
            expires_at_ms,
        } = check_fields(
            request.integration_type,
            request.metadata,
            request.oauth,
            &limits,
        )?;

        let runtime = self.runtime();
        let pin = request.secrets_manager_id;
        if let Some(pin) = &pin {
            check_pin(&runtime, &workspace, pin)?;
        }
        let target = runtime
            .topology
            .route(&workspace, &environment, pin.as_deref());
        let manager = Self::manager(&runtime, &target.manager_id)?;
        let read_only = manager.describe().capabilities.read_only;
        let id = uuid::Uuid::new_v4().to_string();
        let now = crate::time::now_unix();
        let mut record = CredentialRecord {
            id: id.clone(),
            workspace: workspace.clone(),
            environment: environment.clone(),
            integration_type,
            metadata,
            oauth,
            pinned_manager: pin,
            location: Location {
                manager_id: target.manager_id.clone(),
                name: String::new(),
                version: None,
            },
            expires_at_ms,
            token_at_ms: expires_at_ms.map(|_| now.saturating_mul(1000)),
            needs_reauth: false,
            row_version: 1,
            created_at: now,
            updated_at: now,
        };

        if read_only {
            // Registration by reference: the account lives in the read-only manager already.
            if request.secrets.is_some() {
                return Err(ServiceError::ReadOnly {
                    manager: target.manager_id,
                });
            }
            let external_id = request
                .external_id
                .filter(|e| is_valid_name(e))
                .ok_or_else(|| {
                    ServiceError::Invalid(
                        "a read-only manager needs `external_id` (the account id there)".into(),
                    )
                })?;
            let read = self
                .call(&target.manager_id, "get", manager.get(&external_id, None))
                .await
                .map_err(|e| match e {
                    ManagerError::NotFound => {
                        ServiceError::Invalid("`external_id` does not exist in that manager".into())
                    }
                    e => manager_failure(&target.manager_id, e),
                })?;
            record.location.name = external_id;
            self.metadata.create_credential(&record, 0).await?;
            self.cache.replace(
                &id,
                Loaded {
                    record: Arc::new(record.clone()),
                    secrets: read.value,
                    valid_until: read.expires_in.map(crate::time::from_now),
                },
            );
            return Ok(WriteOutcome { record });
        }

        if request.external_id.is_some() {
            return Err(ServiceError::Invalid(
                "`external_id` is only for read-only managers".into(),
            ));
        }
        let secrets = request.secrets.filter(|s| !s.is_empty()).ok_or_else(|| {
            ServiceError::Invalid("`secrets` must hold at least one field".into())
        })?;
        check_secrets_size(&secrets, &limits)?;
        if let Some(oauth) = &record.oauth {
            if oauth.grant == GrantType::ClientCredentials {
                if secrets.get(CLIENT_SECRET).is_none() {
                    return Err(ServiceError::Invalid(
                        "the `client_credentials` grant needs `secrets.client_secret`".into(),
                    ));
                }
                if secrets.get(ACCESS_TOKEN).is_none() {
                    // No token yet: due at once, so the first read (or the background
                    // refresher) buys one.
                    record.expires_at_ms = Some(record.created_at.saturating_mul(1000));
                    record.token_at_ms = record.expires_at_ms;
                }
            }
        }
        let _guard = self.locks.lock(&id).await;
        let name = Self::secret_name(&runtime, &target.manager_id, &workspace, &environment, &id);
        let journal_id = self.journal(&id, &target.manager_id, &name).await?;
        let written = self
            .call(
                &target.manager_id,
                "put",
                manager.put(PutRequest {
                    name: &name,
                    value: &secrets,
                    expected_version: None,
                    idempotency_key: &write_token(),
                }),
            )
            .await;
        let version = match written {
            Ok(v) => v,
            Err(e) => {
                // The write may have landed anyway (a timeout); the journal entry makes sure
                // the sweeper removes whatever is there.
                return Err(manager_failure(&target.manager_id, e));
            }
        };
        record.location.name = name;
        record.location.version = Some(version);
        self.metadata.create_credential(&record, journal_id).await?;
        self.cache.replace(
            &id,
            Loaded {
                record: Arc::new(record.clone()),
                secrets,
                valid_until: record.expires_at_ms.map(crate::time::from_unix_ms),
            },
        );
        Ok(WriteOutcome { record })
    }

    pub async fn patch(
        &self,
        caller: &Caller,
        id: &str,
        request: PatchRequest,
    ) -> Result<WriteOutcome, ServiceError> {
        if !is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        if !self.allows(caller, Action::Write, Scope::ANY) {
            return Err(ServiceError::Forbidden);
        }
        let limits = self.runtime().config.credentials.clone();
        let new_expiry = check_patch(&request, &limits)?;
        let _guard = self.locks.lock(id).await;
        let current = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        self.check_access(caller, Action::Write, &current)?;
        let runtime = self.runtime();
        let mut next = current.clone();
        if let Some(pin) = request.secrets_manager_id {
            if let Some(p) = &pin {
                check_pin(&runtime, &current.workspace, p)?;
            }
            next.pinned_manager = pin;
        }
        if let Some(m) = request.metadata {
            next.metadata = m;
        }
        if let Some(e) = new_expiry {
            next.expires_at_ms = Some(e);
        }
        if request.secrets.is_some() {
            // New secrets are how a user re-authorises: refreshing may be tried again.
            next.needs_reauth = false;
        }
        if new_expiry.is_some() || request.secrets.is_some() {
            // Maybe a new token: its lifetime counts from now. Other changes leave it alone.
            next.token_at_ms = Some(crate::time::now_unix_ms());
        }
        next.row_version += 1;
        next.updated_at = crate::time::now_unix();

        let target = runtime.topology.route(
            &next.workspace,
            &next.environment,
            next.pinned_manager.as_deref(),
        );
        let moving = target.manager_id != current.location.manager_id;
        let source = Self::manager(&runtime, &current.location.manager_id).ok();
        let source_read_only = source
            .as_ref()
            .is_some_and(|m| m.describe().capabilities.read_only);
        if source_read_only && (moving || request.secrets.is_some()) {
            return Err(ServiceError::ReadOnly {
                manager: current.location.manager_id,
            });
        }
        let target_manager = Self::manager(&runtime, &target.manager_id)?;
        if moving && target_manager.describe().capabilities.read_only {
            return Err(ServiceError::ReadOnly {
                manager: target.manager_id,
            });
        }

        if !moving && request.secrets.is_none() {
            self.metadata
                .update_credential(&next, current.row_version, None, None)
                .await?;
            self.cache.invalidate(id);
            return Ok(WriteOutcome { record: next });
        }

        // The new value is the stored one with the patched fields laid over it.
        let source = source
            .ok_or_else(|| ServiceError::ManagerNotLoaded(current.location.manager_id.clone()))?;
        let loc = &current.location;
        let mut value = self
            .call(
                &loc.manager_id,
                "get",
                source.get(&loc.name, loc.version.as_deref()),
            )
            .await
            .map_err(|e| manager_failure(&loc.manager_id, e))?
            .value;
        let new_secrets = request.secrets.is_some();
        if let Some(patch) = request.secrets {
            value.merge(patch);
            check_secrets_size(&value, &limits)?;
        }

        // New secrets over an expired token whose refresh was reported failing end that.
        let expired = current
            .expires_at_ms
            .filter(|e| new_secrets && *e <= crate::time::now_unix_ms())
            .map(|e| (current.clone(), e));
        let outcome = if moving {
            self.move_to(
                &runtime,
                current,
                next,
                &target.manager_id,
                &target_manager,
                &value,
            )
            .await?
        } else {
            let next = self
                .write_in_place(&current, next, &target_manager, value)
                .await?;
            WriteOutcome { record: next }
        };
        if let Some((before, e)) = expired {
            self.note_recovered(&before, e).await;
        }
        Ok(outcome)
    }

    /// Writes a new version of a credential's secret to the secrets manager it is already in
    /// (with compare-and-swap on the recorded version where the manager has it), then switches
    /// the row from `current` to `next` and replaces the cached entry. Caller holds the lock.
    pub(super) async fn write_in_place(
        &self,
        current: &CredentialRecord,
        mut next: CredentialRecord,
        manager: &Arc<dyn SecretsManager>,
        value: SecretFields,
    ) -> Result<CredentialRecord, ServiceError> {
        let id = current.id.as_str();
        let loc = &current.location;
        let caps = manager.describe().capabilities;
        let idempotency_key = write_token();
        let put = |expected_version| {
            self.call(
                &loc.manager_id,
                "put",
                manager.put(PutRequest {
                    name: &loc.name,
                    value: &value,
                    expected_version,
                    idempotency_key: &idempotency_key,
                }),
            )
        };
        let expected = if caps.compare_and_swap {
            loc.version.as_deref()
        } else {
            None
        };
        // Marks a version that may land without being recorded (a timeout, a crash).
        let intent = self
            .journal_kind(JournalKind::Version, id, &loc.manager_id, &loc.name)
            .await?;
        let version = match put(expected).await {
            Err(ManagerError::Conflict) => {
                // The manager moved past the recorded version. If an earlier write of ours
                // left an unrecorded version (its intent is still journaled) and the row
                // is unchanged, writing over that version loses nothing. Otherwise
                // someone else wrote to the manager: report the conflict, never overwrite.
                let fresh = self
                    .metadata
                    .get_credential(id)
                    .await?
                    .ok_or(ServiceError::NotFound)?;
                let ours = self.earlier_intents(id, intent).await?;
                if fresh.row_version != current.row_version || ours.is_empty() {
                    let _ = self.metadata.journal_remove(intent).await;
                    return Err(ServiceError::Conflict);
                }
                put(None).await
            }
            other => other,
        }
        .map_err(|e| manager_failure(&loc.manager_id, e))?;
        next.location.version = Some(version);
        let event = self.reauthorized(current, &next);
        self.metadata
            .update_credential(&next, current.row_version, None, event.as_ref())
            .await?;
        if let Some(e) = &event {
            self.events.recorded(e);
        }
        for entry in self
            .earlier_intents(id, intent)
            .await?
            .into_iter()
            .chain([intent])
        {
            self.metadata.journal_remove(entry).await?;
        }
        self.cache.replace(
            id,
            Loaded {
                record: Arc::new(next.clone()),
                secrets: value,
                valid_until: next.expires_at_ms.map(crate::time::from_unix_ms),
            },
        );
        Ok(next)
    }

    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<(), ServiceError> {
        if !is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        if !self.allows(caller, Action::Write, Scope::ANY) {
            return Err(ServiceError::Forbidden);
        }
        let _guard = self.locks.lock(id).await;
        let current = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        self.check_access(caller, Action::Write, &current)?;
        let runtime = self.runtime();
        // For a read-only manager only the reference goes; `settle` never deletes there.
        let abandoned = JournalEntry {
            id: 0,
            kind: JournalKind::Copy,
            credential_id: id.to_owned(),
            manager_id: current.location.manager_id.clone(),
            name: current.location.name.clone(),
            created_at: crate::time::now_unix(),
        };
        let entry_id = self
            .metadata
            .delete_credential(id, current.row_version, &abandoned)
            .await?;
        self.cache.invalidate(id);
        self.settle(
            &runtime,
            &JournalEntry {
                id: entry_id,
                ..abandoned
            },
        )
        .await;
        Ok(())
    }
}

/// A pin must name the local store or an active manager of the credential's own workspace;
/// any other id is answered as unknown, whether or not it exists elsewhere.
fn check_pin(runtime: &Runtime, workspace: &str, pin: &str) -> Result<(), ServiceError> {
    let usable = pin == LOCAL_MANAGER_ID
        || runtime
            .topology
            .manager(pin)
            .is_some_and(|m| m.workspace == workspace && !m.retiring);
    if usable && runtime.registry.get(pin).is_some() {
        Ok(())
    } else {
        Err(ServiceError::UnknownManager(pin.to_owned()))
    }
}
