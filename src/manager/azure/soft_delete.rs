//! Key Vault's soft delete, handled as the long-running operation it is. A delete only marks
//! the secret deleted; Key Vault finishes deleting it some seconds later, and until then a
//! purge, a recovery or a write to the name is refused with `409 ObjectIsBeingDeleted`. Once
//! deleted, the name stays taken (`409 ObjectIsDeletedButRecoverable` on a write) until it is
//! recovered or purged, for the vault's whole retention period.
//!
//! Here: one attempt at a purge the background purger asked for ([`AzureManager::purge`]), and
//! a write that finds its name held by a deleted secret ([`AzureManager::set_reclaiming`]):
//! credproxy wrote that name, so it recovers the secret (which brings its versions back; the
//! write then adds one), or purges it when `purge_on_delete` allows; when Key Vault refuses
//! both, the write fails with [`ManagerError::NameUnavailable`].

use std::time::Duration;

use azure_core::http::RequestContent;
use azure_security_keyvault_secrets::models::{Secret, SetSecretParameters};

use super::failure::{Failure, BEING_DELETED, BEING_RECOVERED, DELETED_BUT_RECOVERABLE};
use super::AzureManager;
use crate::manager::{ManagerError, Purge};

/// First pause between polls of a long-running operation, doubled up to [`POLL_MAX`]. The
/// caller's deadline (`backends.timeout`) bounds the whole write.
const POLL_FIRST: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(1);
/// Most tries of one write or one recovery poll, whatever the deadline.
const MAX_ROUNDS: usize = 60;
/// How often one write may make its name available again (a second time: the secret was
/// deleted again meanwhile).
const MAX_RECLAIMS: usize = 2;

/// The next pause after `pause`.
fn longer(pause: Duration) -> Duration {
    (pause * 2).min(POLL_MAX)
}

impl AzureManager {
    /// One attempt at purging the soft-deleted `vault_name`. First the deleted secret is read,
    /// as Microsoft's SDK pollers wait for a delete; but its 404 means either "still being
    /// deleted" or "nothing deleted any more" (purged, recovered, written again), so the purge
    /// itself, which tells the two apart (`409 ObjectIsBeingDeleted` or 404), always follows.
    pub(super) async fn purge(&self, vault_name: &str) -> Result<Purge, ManagerError> {
        if let Err(e) = self.client.get_deleted_secret(vault_name, None).await {
            let failure = Failure::from_sdk(e);
            // 403: no permission to read deleted secrets; the SDK's pollers read that as
            // "done" too, and the purge answers for itself.
            if !matches!(failure.status(), Some(404 | 403)) {
                return Err(failure.into_error());
            }
        }
        match self.client.purge_deleted_secret(vault_name, None).await {
            Ok(_) => Ok(Purge::Purged),
            Err(e) => match Failure::from_sdk(e) {
                f if f.status() == Some(404) => Ok(Purge::Gone),
                // Still being deleted, or being recovered (then Gone, once recovered).
                f if f.is(409, BEING_DELETED) || f.is(409, BEING_RECOVERED) => Ok(Purge::Waiting),
                f => Err(f.into_error()),
            },
        }
    }

    /// Writes `body` as the new version of `vault_name`; when a deleted secret holds the name,
    /// waits for its delete to finish, makes the name available again and writes then.
    pub(super) async fn set_reclaiming(
        &self,
        vault_name: &str,
        body: RequestContent<SetSecretParameters>,
    ) -> Result<Secret, ManagerError> {
        let mut pause = POLL_FIRST;
        let mut reclaims = 0;
        for _ in 0..MAX_ROUNDS {
            let written = match self.client.set_secret(vault_name, body.clone(), None).await {
                Ok(response) => response.into_model(),
                Err(e) => Err(e),
            };
            let failure = match written {
                Ok(secret) => return Ok(secret),
                Err(e) => Failure::from_sdk(e),
            };
            if failure.is(409, DELETED_BUT_RECOVERABLE) && reclaims < MAX_RECLAIMS {
                reclaims += 1;
                self.reclaim(vault_name).await?;
                pause = POLL_FIRST;
            } else if failure.is(409, BEING_DELETED) || failure.is(409, BEING_RECOVERED) {
                // A delete, purge or recovery still running: the name frees up shortly.
                tokio::time::sleep(pause).await;
                pause = longer(pause);
            } else {
                return Err(failure.into_error());
            }
        }
        Err(ManagerError::Transient(
            "Key Vault kept the name busy (being deleted or recovered)".into(),
        ))
    }

    /// Makes a name held by a deleted secret available: recovers it (credproxy wrote that
    /// name, and its versions come back with it), else purges it if `purge_on_delete` allows.
    async fn reclaim(&self, vault_name: &str) -> Result<(), ManagerError> {
        let recover_refused = match self.recover(vault_name).await {
            Ok(()) => {
                tracing::info!(manager = %self.id, "recovered a deleted Key Vault secret to write its credential again");
                return Ok(());
            }
            Err(f) if f.status() == Some(403) => f,
            // Gone meanwhile (purged), still being deleted, or another writer recovering it:
            // the write tries again.
            Err(f)
                if f.status() == Some(404)
                    || f.is(409, BEING_DELETED)
                    || f.is(409, BEING_RECOVERED) =>
            {
                return Ok(())
            }
            Err(f) => return Err(f.into_error()),
        };
        if !self.purge_on_delete {
            let reason = format!(
                "recover refused ({}); purge not allowed (purge_on_delete is false)",
                recover_refused.code()
            );
            return Err(ManagerError::NameUnavailable(reason));
        }
        match self.client.purge_deleted_secret(vault_name, None).await {
            Ok(_) => {
                tracing::info!(manager = %self.id, "purged a deleted Key Vault secret to write its credential again");
                Ok(())
            }
            Err(e) => match Failure::from_sdk(e) {
                f if f.status() == Some(404) || f.is(409, BEING_DELETED) => Ok(()),
                f if f.status() == Some(403) => Err(ManagerError::NameUnavailable(format!(
                    "recover refused ({}); purge refused ({})",
                    recover_refused.code(),
                    f.code()
                ))),
                f => Err(f.into_error()),
            },
        }
    }

    /// Recovers the deleted `vault_name` and waits until the secret is readable again, as the
    /// SDK's recovery poller does (a 403 on the read ends the wait too: no read permission).
    async fn recover(&self, vault_name: &str) -> Result<(), Failure> {
        self.client
            .recover_deleted_secret(vault_name, None)
            .await
            .map_err(Failure::from_sdk)?;
        let mut pause = POLL_FIRST;
        for _ in 0..MAX_ROUNDS {
            match self.client.get_secret(vault_name, None).await {
                Ok(_) => return Ok(()),
                Err(e) => match Failure::from_sdk(e) {
                    f if f.status() == Some(403) => return Ok(()),
                    f if f.status() == Some(404) => {}
                    f => return Err(f),
                },
            }
            tokio::time::sleep(pause).await;
            pause = longer(pause);
        }
        Ok(())
    }
}
