//! The token request itself: reading the refresh token, asking the token endpoint (at most
//! `oauth.max_concurrent` at a time), and what each kind of answer does to the credential.

use std::time::Duration;

use super::write_back::Tokens;
use super::{Refreshed, Trigger, CLIENT_SECRET, REFRESH_TOKEN};
use crate::config::OAuthConfig;
use crate::metadata::{CredentialRecord, EventKind, GrantType};
use crate::oauth::OAuthError;
use crate::service::error::manager_failure;
use crate::service::events::derived_id;
use crate::service::{Service, ServiceError};

impl Service {
    pub(super) async fn refresh_leased(
        &self,
        id: &str,
        seen_row_version: i64,
        trigger: Trigger,
    ) -> Result<Refreshed, ServiceError> {
        let config = self.oauth_config();
        let record = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        if self.is_read_only(&record.location.manager_id) {
            return Err(ServiceError::ReadOnly {
                manager: record.location.manager_id.clone(),
            });
        }
        let Some(oauth) = record.oauth.clone() else {
            return Err(ServiceError::NotRefreshable(
                "the credential has no `oauth` description".into(),
            ));
        };
        if let Some(done) = self.apply_pending(&record).await? {
            return Ok(Refreshed::Done(done));
        }
        if record.needs_reauth {
            return Err(ServiceError::NeedsReauth);
        }
        // Re-read after the lock: if the row moved on, someone refreshed (or changed) it.
        if record.row_version != seen_row_version
            || (!matches!(trigger, Trigger::Forced | Trigger::Rejected)
                && !self.is_due(&config, &record))
        {
            return Ok(Refreshed::Skipped(record));
        }

        let runtime = self.runtime();
        let manager = Self::manager(&runtime, &record.location.manager_id)?;
        let loc = &record.location;
        let value = self
            .call(
                &loc.manager_id,
                "get",
                manager.get(&loc.name, loc.version.as_deref()),
            )
            .await
            .map_err(|e| manager_failure(&loc.manager_id, e))?
            .value;
        let refresh_token = match oauth.grant {
            GrantType::RefreshToken => {
                Some(value.get(REFRESH_TOKEN).cloned().ok_or_else(|| {
                    ServiceError::NotRefreshable(format!(
                        "the credential has no `{REFRESH_TOKEN}` field"
                    ))
                })?)
            }
            GrantType::ClientCredentials => None,
        };
        let client_secret = value.get(CLIENT_SECRET).cloned();
        if oauth.grant == GrantType::ClientCredentials && client_secret.is_none() {
            return Err(ServiceError::NotRefreshable(format!(
                "the `client_credentials` grant needs a `{CLIENT_SECRET}` field"
            )));
        }
        if let Some(e) = record.expires_at_ms {
            let left = (e.saturating_sub(crate::time::now_unix_ms())).max(0) as f64 / 1000.0;
            self.metrics.oauth_time_to_expiry.observe(left);
        }

        let (answer, asked) = {
            let _permit = self
                .oauth
                .limiter
                .acquire()
                .await
                .map_err(|_| ServiceError::Metadata("refresh limiter closed".into()))?;
            let asked = std::time::SystemTime::now();
            let answer = self
                .oauth
                .client
                .refresh(
                    &oauth,
                    client_secret.as_ref(),
                    refresh_token.as_ref(),
                    config.timeout,
                )
                .await;
            (answer, asked)
        };
        match answer {
            Ok(grant) => {
                let tokens = Tokens::from_grant(grant, asked);
                // The old refresh token is spent now: keep the answer before anything else.
                self.save_pending(&record, &tokens).await;
                self.check_write_rate(&record, &tokens, &config);
                match self.write_tokens(record, &tokens).await {
                    Ok(done) => {
                        let _ = self.metadata.pending_token_delete(id).await;
                        if done
                            .expires_at_ms
                            .is_some_and(|e| e <= crate::time::now_unix_ms())
                        {
                            // A token expired on arrival (`expires_in: 0`, or shorter than the
                            // round trip) is due again at once: backing off keeps such an
                            // endpoint from being asked on every read and pass.
                            self.oauth.backoff.failed(&config, id, None);
                            tracing::warn!(credential = id, "the token endpoint issued a token that had already expired; backing off");
                        } else {
                            self.oauth.backoff.succeeded(id);
                            self.oauth.deferred.succeeded(id);
                        }
                        self.count("success");
                        tracing::info!(credential = id, expires_at_ms = ?done.expires_at_ms,
                            rotated = tokens.refresh_token.is_some(), "refreshed OAuth token");
                        Ok(Refreshed::Done(done))
                    }
                    Err(e) => {
                        self.oauth.backoff.failed(&config, id, None);
                        self.count("write_failed");
                        tracing::error!(credential = id, error = %e,
                            "refreshed OAuth token but could not write it back; the sealed answer is kept and applied by the next attempt");
                        Err(e)
                    }
                }
            }
            Err(OAuthError::Rejected { code }) => {
                self.count(if code == "invalid_grant" {
                    "invalid_grant"
                } else {
                    "rejected"
                });
                tracing::warn!(credential = id, code = %code,
                    "token endpoint rejected the refresh; marking the credential for re-authorisation");
                let what = match oauth.grant {
                    GrantType::RefreshToken => "the refresh token",
                    GrantType::ClientCredentials => "the client credentials",
                };
                let reason = format!("the token endpoint refused {what} ({code})");
                self.mark_needs_reauth(record, &reason).await?;
                Err(ServiceError::NeedsReauth)
            }
            Err(e) => {
                let wait = self.oauth.backoff.failed(&config, id, e.retry_after());
                self.count("unavailable");
                tracing::warn!(credential = id, error = %e, retry_in = ?wait, "OAuth refresh failed; will retry");
                self.note_failing_past_expiry(&record, &e).await;
                Err(ServiceError::TokenUnavailable {
                    detail: e.to_string(),
                    retry_after: wait,
                })
            }
        }
    }

    /// Warns (once per credential) when a token's lifetime means write-backs more often than
    /// its secrets manager advises: each refresh is one new secret version there.
    fn check_write_rate(&self, record: &CredentialRecord, tokens: &Tokens, config: &OAuthConfig) {
        let runtime = self.runtime.load();
        let Some(manager) = runtime.config.manager(&record.location.manager_id) else {
            return;
        };
        let (Some(advised), Some(expires_at_ms)) = (
            crate::manager::descriptor::find(&manager.kind)
                .and_then(|d| d.advised_min_write_interval),
            tokens.expires_at_ms,
        ) else {
            return;
        };
        let lifetime = Duration::from_millis(
            expires_at_ms
                .saturating_sub(crate::time::now_unix_ms())
                .max(0) as u64,
        );
        let interval = crate::oauth::refresh_interval(config, lifetime);
        if interval >= advised {
            return;
        }
        let mut warned = self
            .oauth
            .warned_write_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if warned.len() < 10_000 && warned.insert(record.id.clone()) {
            tracing::warn!(credential = %record.id, manager = %manager.id, every = ?interval, advised = ?advised,
                "this token is refreshed (and written back) more often than its secrets manager advises for one secret; consider a secrets manager without that limit for it");
        }
    }

    /// Records `refresh_failing` when a refresh fails after the token it should replace has
    /// expired: readers get errors now. Once per expired token, however many attempts,
    /// instances or restarts notice it (the event's id is derived from the token's expiry).
    async fn note_failing_past_expiry(&self, record: &CredentialRecord, error: &OAuthError) {
        let Some(expired) = record
            .expires_at_ms
            .filter(|e| *e <= crate::time::now_unix_ms())
        else {
            return;
        };
        let reason = format!(
            "refreshing has failed since the access token expired at {}: {error}",
            crate::time::rfc3339_ms(expired)
        );
        let config = self.runtime.load().config.events.clone();
        let key = expiry_key(record, expired);
        let event = self.events.event(
            &config,
            EventKind::RefreshFailing,
            record,
            reason,
            Some(&[&key[0], &key[1]]),
        );
        if let Err(e) = self.events.add(event, None).await {
            tracing::warn!(credential = %record.id, error = %e, "could not record a refresh_failing event");
        }
    }

    /// Records `refresh_recovered` for a token that had expired when it was replaced (by a
    /// refresh, a saved answer or a PATCH), if its refresh was reported failing (and only
    /// once, like that report).
    pub(in crate::service) async fn note_recovered(&self, record: &CredentialRecord, expired: i64) {
        let config = self.runtime.load().config.events.clone();
        let key = expiry_key(record, expired);
        let parts = [key[0].as_str(), key[1].as_str()];
        let failing = derived_id(EventKind::RefreshFailing, &record.id, &parts);
        let event = self.events.event(
            &config,
            EventKind::RefreshRecovered,
            record,
            format!(
                "refreshed after failing since the access token expired at {}",
                crate::time::rfc3339_ms(expired)
            ),
            Some(&parts),
        );
        if let Err(e) = self.events.add(event, Some(&failing)).await {
            tracing::warn!(credential = %record.id, error = %e, "could not record a refresh_recovered event");
        }
    }

    async fn mark_needs_reauth(
        &self,
        current: CredentialRecord,
        reason: &str,
    ) -> Result<(), ServiceError> {
        let id = current.id.clone();
        let config = self.runtime.load().config.events.clone();
        self.events
            .flag(&config, current, true, EventKind::NeedsReauth, reason)
            .await?;
        self.cache.invalidate(&id);
        Ok(())
    }
}

/// What identifies one expired token of a credential, for the ids of the events about it: the
/// credential's creation (an id deleted and created again is another credential) and the expiry.
fn expiry_key(record: &CredentialRecord, expired: i64) -> [String; 2] {
    [record.created_at.to_string(), expired.to_string()]
}
