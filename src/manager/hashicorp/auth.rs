//! Vault authentication: the token or AppRole credentials, the client that carries the
//! current token, and the background task that renews it or logs in again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::settings::HashicorpSettings;
use super::{classify, HashicorpManager};
use crate::manager::ManagerError;
use crate::secret::SecretString;

/// Upper bound on one HTTP call to Vault, below the daemon's backend timeout by default.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// Re-login back-off bounds after a failed login.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub(super) enum Auth {
    Token(SecretString),
    AppRole {
        role_id: SecretString,
        secret_id: SecretString,
        mount: String,
    },
}

impl HashicorpManager {
    /// AppRole login; swaps in a client carrying the new token. Returns the lease.
    pub(super) async fn login(&self) -> Result<Duration, ManagerError> {
        let Auth::AppRole {
            role_id,
            secret_id,
            mount,
        } = &self.auth
        else {
            return Err(ManagerError::Permanent("not an AppRole manager".into()));
        };
        let anonymous = self.client.load_full();
        let info =
            vaultrs::auth::approle::login(&*anonymous, mount, role_id.expose(), secret_id.expose())
                .await
                .map_err(classify)?;
        let token = SecretString::new(info.client_token);
        let client = make_client(&self.settings, &token)
            .map_err(|e| ManagerError::Permanent(e.to_string()))?;
        self.client.store(Arc::new(client));
        tracing::info!(manager = %self.id, lease_seconds = info.lease_duration, "logged in to Vault with AppRole");
        Ok(Duration::from_secs(info.lease_duration))
    }

    /// Renews the current token; returns the new lease, or `None` if it does not expire.
    async fn renew(&self) -> Result<Option<Duration>, ManagerError> {
        let client = self.client.load_full();
        let lookup = vaultrs::token::lookup_self(&*client)
            .await
            .map_err(classify)?;
        tracing::debug!(manager = %self.id, ttl = lookup.ttl, renewable = ?lookup.renewable, "Vault token looked up");
        // Only a token without an expiry time never expires; a ttl of 0 on an expiring token
        // means less than a second is left.
        if lookup.expire_time.is_none() {
            return Ok(None);
        }
        // Only a token that says it is not renewable is left alone; some servers omit the
        // field on lookup.
        if lookup.renewable == Some(false) {
            return Ok(Some(Duration::from_secs(lookup.ttl)));
        }
        let info = vaultrs::token::renew_self(&*client, None)
            .await
            .map_err(classify)?;
        tracing::debug!(manager = %self.id, lease_seconds = info.lease_duration, "renewed the Vault token");
        Ok(Some(Duration::from_secs(info.lease_duration)))
    }

    /// A refusal means the token was revoked or has expired: wake the auth task now rather
    /// than at the next renewal.
    pub(super) fn after_error(&self, e: ManagerError) -> ManagerError {
        if matches!(e, ManagerError::Denied(_)) {
            self.relogin.notify_one();
        }
        e
    }
}

pub(super) fn make_client(
    settings: &HashicorpSettings,
    token: &SecretString,
) -> Result<VaultClient, ClientError> {
    let mut builder = VaultClientSettingsBuilder::default();
    builder
        .address(&settings.address)
        .token(token.expose())
        .timeout(Some(HTTP_TIMEOUT))
        .verify(true)
        .namespace(settings.namespace.clone());
    if let Some(ca) = &settings.ca_file {
        builder.ca_certs(vec![ca.clone()]);
    } else {
        builder.ca_certs(vec![]);
    }
    let settings = builder
        .build()
        .map_err(|_| ClientError::InvalidLoginMethodError)?;
    VaultClient::new(settings)
}

/// Keeps the token alive: renew at two thirds of its lease; when renewal fails (or a request
/// was refused), log in again with AppRole, backing off while Vault is unreachable.
pub(super) async fn auth_loop(backend: Weak<HashicorpManager>, relogin: Arc<Notify>) {
    let mut backoff = RETRY_MIN;
    loop {
        let Some(b) = backend.upgrade() else { return };
        tracing::trace!(manager = %b.id, "Vault auth check");
        let next = match b.renew().await {
            Ok(Some(lease)) => {
                backoff = RETRY_MIN;
                lease.mul_f64(2.0 / 3.0).max(Duration::from_secs(1))
            }
            // A token that never expires (e.g. a root token): only a refusal wakes us.
            Ok(None) => Duration::from_secs(3600),
            Err(e) => match &b.auth {
                Auth::Token(_) => {
                    tracing::warn!(manager = %b.id, error = %e, "Vault token renewal failed");
                    backoff = (backoff * 2).min(RETRY_MAX);
                    backoff
                }
                Auth::AppRole { .. } => match b.login().await {
                    Ok(lease) => {
                        backoff = RETRY_MIN;
                        lease.mul_f64(2.0 / 3.0).max(Duration::from_secs(1))
                    }
                    Err(e) => {
                        tracing::warn!(manager = %b.id, error = %e, "Vault AppRole login failed");
                        backoff = (backoff * 2).min(RETRY_MAX);
                        backoff
                    }
                },
            },
        };
        // Hold only the weak reference while waiting, so dropping the backend ends the task.
        drop(b);
        let relogin_wanted = {
            tokio::select! {
                _ = tokio::time::sleep(next) => false,
                _ = relogin.notified() => true,
            }
        };
        if relogin_wanted {
            let Some(b) = backend.upgrade() else { return };
            if let Auth::AppRole { .. } = b.auth {
                if let Err(e) = b.login().await {
                    tracing::warn!(manager = %b.id, error = %e, "Vault AppRole re-login failed");
                    drop(b);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }
}
