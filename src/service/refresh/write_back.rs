//! Writing new tokens back, and finishing a write-back that an interrupted refresh left undone.
//!
//! A rotated refresh token exists only in the token endpoint's answer until it is written
//! back, and the old one is spent: replaying it makes a rotating server revoke the whole token
//! family. So the answer is sealed into the metadata database first; an attempt that crashed
//! before its write-back is finished by the next refresher, which finds the sealed answer
//! instead of asking the server again.

use std::sync::Arc;

use super::{ACCESS_TOKEN, REFRESH_TOKEN};
use crate::manager::SecretsManager;
use crate::metadata::CredentialRecord;
use crate::oauth::Grant;
use crate::secret::{SecretFields, SecretString};
use crate::service::error::manager_failure;
use crate::service::{Service, ServiceError};

/// Carried only inside a sealed pending answer, never written to a secrets manager: the expiry
/// in Unix milliseconds; answers sealed by earlier versions carry Unix seconds under
/// `expires_at`.
const PENDING_EXPIRES_AT_MS: &str = "expires_at_ms";
const PENDING_EXPIRES_AT_SECS: &str = "expires_at";

/// The tokens of one successful answer, as sealed while awaiting write-back.
pub(super) struct Tokens {
    pub(super) access_token: SecretString,
    pub(super) refresh_token: Option<SecretString>,
    /// Unix milliseconds.
    pub(super) expires_at_ms: Option<i64>,
}

impl Tokens {
    /// The answer to a token request sent at `asked`. `expires_in` counts from when the
    /// server wrote its answer, which is after the request was sent: counting from the
    /// sending makes the expiry a little early, never late.
    pub(super) fn from_grant(grant: Grant, asked: std::time::SystemTime) -> Self {
        Self {
            access_token: grant.access_token,
            refresh_token: grant.refresh_token,
            // Rounded down: a token is never believed valid longer than it is.
            expires_at_ms: grant
                .expires_in
                .map(|d| crate::time::to_unix_ms(crate::time::after(asked, d))),
        }
    }

    fn to_fields(&self) -> SecretFields {
        let mut f = SecretFields::new();
        f.insert(ACCESS_TOKEN, self.access_token.clone());
        if let Some(r) = &self.refresh_token {
            f.insert(REFRESH_TOKEN, r.clone());
        }
        if let Some(e) = self.expires_at_ms {
            f.insert(PENDING_EXPIRES_AT_MS, SecretString::new(e.to_string()));
            // For instances of the previous version still running in a fleet being upgraded:
            // they read only this one, and would store the token with no expiry without it.
            f.insert(
                PENDING_EXPIRES_AT_SECS,
                SecretString::new(e.div_euclid(1000).to_string()),
            );
        }
        f
    }

    fn from_fields(mut f: SecretFields) -> Option<Self> {
        Some(Self {
            access_token: f.remove(ACCESS_TOKEN)?,
            refresh_token: f.remove(REFRESH_TOKEN),
            expires_at_ms: match (
                f.remove(PENDING_EXPIRES_AT_MS),
                f.remove(PENDING_EXPIRES_AT_SECS),
            ) {
                (Some(ms), _) => Some(ms.expose().parse().ok()?),
                (None, Some(secs)) => Some(secs.expose().parse::<i64>().ok()?.checked_mul(1000)?),
                (None, None) => None,
            },
        })
    }
}

fn pending_name(id: &str) -> String {
    format!("oauth-pending:{id}")
}

impl Service {
    pub(super) async fn save_pending(&self, record: &CredentialRecord, tokens: &Tokens) {
        let sealed = self.keys.seal_record(
            &pending_name(&record.id),
            record.row_version,
            &tokens.to_fields().to_json(),
        );
        if let Err(e) = self.metadata.pending_token_put(&record.id, &sealed).await {
            // The write-back still runs; only a crash before it would lose the answer.
            tracing::error!(credential = %record.id, error = %e, "could not save the token answer before write-back");
        }
    }

    /// Finishes an earlier attempt's write-back from its sealed answer, if one is waiting and
    /// the row has not changed since (a newer row means it was applied or superseded).
    pub(super) async fn apply_pending(
        &self,
        record: &CredentialRecord,
    ) -> Result<Option<CredentialRecord>, ServiceError> {
        let id = record.id.as_str();
        let Some(sealed) = self.metadata.pending_token_get(id).await? else {
            return Ok(None);
        };
        let tokens = if sealed.version == record.row_version {
            self.keys
                .open_record(&sealed)
                .ok()
                .and_then(|plain| SecretFields::from_json(&plain).ok())
                .and_then(Tokens::from_fields)
        } else {
            None
        };
        let Some(tokens) = tokens else {
            self.metadata.pending_token_delete(id).await?;
            return Ok(None);
        };
        let done = self.write_tokens(record.clone(), &tokens).await?;
        self.metadata.pending_token_delete(id).await?;
        self.oauth.backoff.succeeded(id);
        self.oauth.deferred.succeeded(id);
        self.count("recovered");
        tracing::warn!(
            credential = id,
            "applied a token answer an interrupted refresh had saved"
        );
        Ok(Some(done))
    }

    /// Writes new tokens over the stored secret (other fields kept; the refresh token only
    /// if rotated) and switches the row. A concurrent change of the row is re-read and the
    /// tokens laid over it again, a few times, so the answer is never dropped for a race.
    pub(super) async fn write_tokens(
        &self,
        mut current: CredentialRecord,
        tokens: &Tokens,
    ) -> Result<CredentialRecord, ServiceError> {
        // The token being replaced has expired: refreshing may have been reported failing,
        // and then its recovery is reported too.
        let expired = current
            .expires_at_ms
            .filter(|e| *e <= crate::time::now_unix_ms())
            .map(|e| (current.clone(), e));
        let mut attempt = 0;
        loop {
            let runtime = self.runtime();
            let manager: Arc<dyn SecretsManager> =
                Self::manager(&runtime, &current.location.manager_id)?;
            let loc = &current.location;
            let mut value = self
                .call(
                    &loc.manager_id,
                    "get",
                    manager.get(&loc.name, loc.version.as_deref()),
                )
                .await
                .map_err(|e| manager_failure(&loc.manager_id, e))?
                .value;
            value.insert(ACCESS_TOKEN, tokens.access_token.clone());
            if let Some(r) = &tokens.refresh_token {
                value.insert(REFRESH_TOKEN, r.clone());
            }
            let mut next = current.clone();
            next.expires_at_ms = tokens.expires_at_ms;
            next.token_at_ms = Some(crate::time::now_unix_ms());
            next.needs_reauth = false;
            next.row_version += 1;
            next.updated_at = crate::time::now_unix();
            match self.write_in_place(&current, next, &manager, value).await {
                Err(ServiceError::Conflict) if attempt < 3 => {
                    attempt += 1;
                    current = self
                        .metadata
                        .get_credential(&current.id)
                        .await?
                        .ok_or(ServiceError::NotFound)?;
                    // The saved answer follows the row it now applies to.
                    self.save_pending(&current, tokens).await;
                }
                other => {
                    if let (Ok(_), Some((before, e))) = (&other, &expired) {
                        self.note_recovered(before, *e).await;
                    }
                    return other;
                }
            }
        }
    }
}
