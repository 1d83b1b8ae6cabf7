//! OAuth refresh: deciding that a token is due, serialising refreshers (the credential's lock
//! in this process, then a lease in the metadata database that every process sharing it
//! honours), the token request, and the write-back of the new tokens before anyone is handed
//! them.
//!
//! A rotated refresh token exists only in the token endpoint's answer until it is written
//! back, and the old one is spent: replaying it makes a rotating server revoke the whole token
//! family. So the answer is sealed into the metadata database first; an attempt that crashed
//! before its write-back is finished by the next refresher, which finds the sealed answer
//! instead of asking the server again.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{manager_failure, Service, ServiceError};
use crate::cache::{CacheStatus, Entry};
use crate::config::OAuthConfig;
use crate::manager::SecretsManager;
use crate::metadata::{CredentialRecord, MetadataError};
use crate::oauth::{due_at_ms, Backoff, Grant, OAuthError, TokenClient};
use crate::secret::{SecretFields, SecretString};

/// Field names of the sensitive half of an OAuth credential.
pub const ACCESS_TOKEN: &str = "access_token";
pub const REFRESH_TOKEN: &str = "refresh_token";
pub const CLIENT_SECRET: &str = "client_secret";
/// Carried only inside a sealed pending answer, never written to a store.
const PENDING_EXPIRES_AT: &str = "expires_at";

/// How many refreshes one background pass starts at most; the rest wait for the next pass.
const SCAN_BATCH: usize = 1000;
/// How long a refresh lease lasts unless renewed. Short, so a crashed holder blocks others
/// only briefly; the holder renews it every third of that while it works.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long a lease wait polls at most between tries.
const LEASE_POLL_MAX: Duration = Duration::from_millis(200);

/// Why a refresh was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A read found the token inside its refresh window.
    Read,
    /// The background refresher found it due.
    Background,
    /// `POST /v1/credentials/{id}/refresh`: refresh even if not due.
    Forced,
}

/// What a refresh did.
#[derive(Debug, Clone)]
pub enum Refreshed {
    /// New tokens were obtained (or a saved answer applied) and written back.
    Done(CredentialRecord),
    /// Nothing to do: another refresher got there first, or the token is not due.
    Skipped(CredentialRecord),
}

impl Refreshed {
    pub fn record(&self) -> &CredentialRecord {
        match self {
            Refreshed::Done(r) | Refreshed::Skipped(r) => r,
        }
    }
}

pub(crate) struct OAuthState {
    client: TokenClient,
    backoff: Backoff,
    limiter: tokio::sync::Semaphore,
    /// This process's name in lease rows.
    holder: String,
    /// Credentials already warned about refreshing faster than their store advises.
    warned_write_rate: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl OAuthState {
    pub(crate) fn new(config: &OAuthConfig) -> Self {
        Self {
            client: TokenClient::new(),
            backoff: Backoff::new(),
            limiter: tokio::sync::Semaphore::new(config.max_concurrent),
            holder: format!("{}:{}", std::process::id(), uuid::Uuid::new_v4()),
            warned_write_rate: Default::default(),
        }
    }
}

/// The tokens of one successful answer, as sealed while awaiting write-back.
struct Tokens {
    access_token: SecretString,
    refresh_token: Option<SecretString>,
    expires_at: Option<i64>,
}

impl Tokens {
    fn from_grant(grant: Grant) -> Self {
        Self {
            access_token: grant.access_token,
            refresh_token: grant.refresh_token,
            // Rounded down: a token is never believed valid longer than it is.
            expires_at: grant
                .expires_in
                .map(|d| crate::time::now_unix() + d.as_secs() as i64),
        }
    }

    fn to_fields(&self) -> SecretFields {
        let mut f = SecretFields::new();
        f.insert(ACCESS_TOKEN, self.access_token.clone());
        if let Some(r) = &self.refresh_token {
            f.insert(REFRESH_TOKEN, r.clone());
        }
        if let Some(e) = self.expires_at {
            f.insert(PENDING_EXPIRES_AT, SecretString::new(e.to_string()));
        }
        f
    }

    fn from_fields(mut f: SecretFields) -> Option<Self> {
        Some(Self {
            access_token: f.remove(ACCESS_TOKEN)?,
            refresh_token: f.remove(REFRESH_TOKEN),
            expires_at: match f.remove(PENDING_EXPIRES_AT) {
                Some(e) => Some(e.expose().parse().ok()?),
                None => None,
            },
        })
    }
}

fn pending_name(id: &str) -> String {
    format!("oauth-pending:{id}")
}

fn lease_key(id: &str) -> String {
    format!("oauth-refresh:{id}")
}

impl Service {
    fn oauth_config(&self) -> OAuthConfig {
        self.runtime.load().config.oauth.clone()
    }

    /// Whether `record`'s token is inside its refresh window now.
    fn is_due(&self, config: &OAuthConfig, record: &CredentialRecord) -> bool {
        record.oauth.is_some()
            && !record.needs_reauth
            && due_at_ms(config, record).is_some_and(|due| crate::time::now_unix_ms() >= due)
    }

    fn is_read_only(&self, manager_id: &str) -> bool {
        self.runtime
            .load()
            .registry
            .get(manager_id)
            .is_some_and(|b| b.describe().capabilities.read_only)
    }

    /// The read path's token check: a token inside its window is refreshed before it is
    /// handed out; if that fails the current token is served while it is still valid, and
    /// an expired one never is.
    pub(super) async fn checked_token(
        self: &Arc<Self>,
        id: &str,
        entry: Arc<Entry>,
        status: CacheStatus,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        let record = &entry.loaded.record;
        let Some(expires_at) = record.expires_at.filter(|_| record.oauth.is_some()) else {
            return Ok((entry, status));
        };
        if self.is_read_only(&record.location.manager_id) {
            // Refreshed by its own service; the cache entry already ends at `expires_in`.
            return Ok((entry, status));
        }
        let config = self.oauth_config();
        let expired = crate::time::now_unix_ms() >= expires_at.saturating_mul(1000);
        if record.needs_reauth {
            return if expired {
                Err(ServiceError::NeedsReauth)
            } else {
                Ok((entry, status))
            };
        }
        if !self.is_due(&config, record) {
            return Ok((entry, status));
        }
        if let Some(wait) = self.oauth.backoff.remaining(id) {
            return if expired {
                Err(ServiceError::TokenUnavailable {
                    detail: "the last refresh failed; backing off".into(),
                    retry_after: wait,
                })
            } else {
                Ok((entry, status))
            };
        }
        let task = self.spawn_refresh(id, record.row_version, Trigger::Read);
        let outcome = if expired {
            task.await
        } else {
            // The current token is still good: wait a little for the new one, then serve the
            // current one and let the refresh finish on its own.
            let runtime = self.runtime.load();
            let left = Duration::from_millis(
                (expires_at.saturating_mul(1000) - crate::time::now_unix_ms()).max(0) as u64,
            );
            let budget = (runtime.config.server.request_timeout / 2).min(left);
            match tokio::time::timeout(budget, task).await {
                Ok(joined) => joined,
                Err(_) => return Ok((entry, status)),
            }
        }
        .unwrap_or_else(|e| {
            Err(ServiceError::TokenUnavailable {
                detail: format!("the refresh task failed: {e}"),
                retry_after: config.retry_min,
            })
        });
        match outcome {
            Ok(done) => {
                let fresh = done.record();
                let cached = self.cache.peek(id).map(|e| e.loaded.record.row_version);
                if cached != Some(fresh.row_version) {
                    // Another process refreshed (or changed) it: our cached copy is old.
                    self.cache.invalidate(id);
                }
                let (entry, status) = self
                    .cache
                    .get_or_load(id, || self.loader(id.to_owned()))
                    .await?;
                let expired = entry
                    .loaded
                    .record
                    .expires_at
                    .is_some_and(|e| crate::time::now_unix_ms() >= e.saturating_mul(1000));
                if expired {
                    return Err(ServiceError::TokenUnavailable {
                        detail: "the token endpoint issued a token that has already expired".into(),
                        retry_after: config.retry_min,
                    });
                }
                Ok((entry, status))
            }
            Err(e) if !expired => {
                tracing::debug!(credential = id, error = %e, "refresh on read failed; serving the current token");
                Ok((entry, status))
            }
            Err(e) => Err(e),
        }
    }

    /// Runs a refresh in a task of its own: once a token request is sent, nothing — a caller
    /// giving up, a request deadline — may cancel it before its answer is written back.
    fn spawn_refresh(
        self: &Arc<Self>,
        id: &str,
        seen_row_version: i64,
        trigger: Trigger,
    ) -> tokio::task::JoinHandle<Result<Refreshed, ServiceError>> {
        let service = Arc::clone(self);
        let id = id.to_owned();
        tokio::spawn(async move { service.refresh(&id, seen_row_version, trigger).await })
    }

    /// `POST /v1/credentials/{id}/refresh`: refreshes now, due or not.
    pub async fn force_refresh(
        self: &Arc<Self>,
        caller: &crate::access::Caller,
        id: &str,
    ) -> Result<Refreshed, ServiceError> {
        use crate::access::Action;
        if !crate::config::is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        if !self.allows(caller, Action::Write, None) {
            return Err(ServiceError::Forbidden);
        }
        let record = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        if !self.allows(caller, Action::Write, Some(&record.environment)) {
            return Err(ServiceError::Forbidden);
        }
        self.spawn_refresh(id, record.row_version, Trigger::Forced)
            .await
            .unwrap_or_else(|e| {
                Err(ServiceError::TokenUnavailable {
                    detail: format!("the refresh task failed: {e}"),
                    retry_after: Duration::from_secs(1),
                })
            })
    }

    /// One pass of the background refresher: refreshes every token inside its window, at
    /// most `oauth.max_concurrent` at a time. Returns how many were refreshed.
    pub async fn refresh_due(&self) -> Result<usize, ServiceError> {
        let config = self.oauth_config();
        let horizon =
            crate::time::now_unix() + (config.refresh_before + config.jitter).as_secs() as i64 + 1;
        let candidates = self.metadata.oauth_due(horizon, SCAN_BATCH).await?;
        let due: Vec<CredentialRecord> = candidates
            .into_iter()
            .filter(|r| {
                self.is_due(&config, r)
                    && !self.is_read_only(&r.location.manager_id)
                    && self.oauth.backoff.remaining(&r.id).is_none()
            })
            .collect();
        let refreshed = futures::stream::iter(due)
            .map(|r| async move {
                match self.refresh(&r.id, r.row_version, Trigger::Background).await {
                    Ok(Refreshed::Done(_)) => 1,
                    Ok(Refreshed::Skipped(_)) => 0,
                    Err(e) => {
                        tracing::debug!(credential = %r.id, error = %e, "background refresh failed");
                        0
                    }
                }
            })
            .buffer_unordered(config.max_concurrent)
            .fold(0usize, |n, done| async move { n + done })
            .await;
        if let Ok(n) = self.metadata.count_needs_reauth().await {
            self.metrics.needs_reauth.set(n as i64);
        }
        Ok(refreshed)
    }

    /// Refreshes `id` unless someone else already did since the caller saw `seen_row_version`.
    pub async fn refresh(
        &self,
        id: &str,
        seen_row_version: i64,
        trigger: Trigger,
    ) -> Result<Refreshed, ServiceError> {
        // In this process: one refresher per credential, and no write or move in between.
        let _guard = self.locks.lock(id).await;
        let holder = format!("{}:{}", self.oauth.holder, uuid::Uuid::new_v4());
        self.take_lease(id, &holder).await?;
        let result = {
            let work = self.refresh_leased(id, seen_row_version, trigger);
            let key = lease_key(id);
            let renew = self.renew_lease(&key, &holder, LEASE_TTL);
            tokio::pin!(work, renew);
            tokio::select! {
                r = &mut work => r,
                () = &mut renew => work.await,
            }
        };
        if let Err(e) = self.metadata.lease_release(&lease_key(id), &holder).await {
            tracing::warn!(credential = id, error = %e, "could not release the refresh lease; it expires on its own");
        }
        let outcome = match &result {
            Ok(Refreshed::Done(_)) => None,
            Ok(Refreshed::Skipped(_)) => Some("skipped"),
            Err(_) => None,
        };
        if let Some(o) = outcome {
            self.metrics.oauth_refreshes.with_label_values(&[o]).inc();
        }
        result
    }

    /// Keeps a lease while its work runs; returns only if it was lost (the work carries on:
    /// cancelling a refresh mid-request could lose a token answer).
    pub(super) async fn renew_lease(&self, key: &str, holder: &str, ttl: Duration) {
        loop {
            tokio::time::sleep(ttl / 3).await;
            match self.metadata.lease_acquire(key, holder, ttl).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        lease = key,
                        "lost a lease while working (stalled longer than its lifetime)"
                    );
                    return;
                }
                Err(e) => tracing::warn!(lease = key, error = %e, "could not renew a lease"),
            }
        }
    }

    async fn take_lease(&self, id: &str, holder: &str) -> Result<(), ServiceError> {
        let ttl = LEASE_TTL;
        let deadline = tokio::time::Instant::now() + ttl + Duration::from_secs(1);
        let mut pause = Duration::from_millis(10);
        loop {
            if self
                .metadata
                .lease_acquire(&lease_key(id), holder, ttl)
                .await?
            {
                return Ok(());
            }
            if pause == Duration::from_millis(10) {
                self.metrics.lease_waits.inc();
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::TokenUnavailable {
                    detail: "another process has been refreshing this token for too long".into(),
                    retry_after: Duration::from_secs(1),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LEASE_POLL_MAX);
        }
    }

    async fn refresh_leased(
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
            || (trigger != Trigger::Forced && !self.is_due(&config, &record))
        {
            return Ok(Refreshed::Skipped(record));
        }

        let runtime = self.runtime();
        let backend = Self::manager(&runtime, &record.location.manager_id)?;
        let loc = &record.location;
        let value = self
            .call(
                &loc.manager_id,
                "get",
                backend.get(&loc.name, loc.version.as_deref()),
            )
            .await
            .map_err(|e| manager_failure(&loc.manager_id, e))?
            .value;
        let refresh_token = value.get(REFRESH_TOKEN).cloned().ok_or_else(|| {
            ServiceError::NotRefreshable(format!("the credential has no `{REFRESH_TOKEN}` field"))
        })?;
        let client_secret = value.get(CLIENT_SECRET).cloned();
        if let Some(e) = record.expires_at {
            let left = (e * 1000 - crate::time::now_unix_ms()).max(0) as f64 / 1000.0;
            self.metrics.oauth_time_to_expiry.observe(left);
        }

        let answer = {
            let _permit = self
                .oauth
                .limiter
                .acquire()
                .await
                .map_err(|_| ServiceError::Metadata("refresh limiter closed".into()))?;
            self.oauth
                .client
                .refresh(
                    &oauth,
                    client_secret.as_ref(),
                    &refresh_token,
                    config.timeout,
                )
                .await
        };
        match answer {
            Ok(grant) => {
                let tokens = Tokens::from_grant(grant);
                // The old refresh token is spent now: keep the answer before anything else.
                self.save_pending(&record, &tokens).await;
                self.check_write_rate(&record, &tokens, &config);
                match self.write_tokens(record, &tokens).await {
                    Ok(done) => {
                        let _ = self.metadata.pending_token_delete(id).await;
                        self.oauth.backoff.succeeded(id);
                        self.count("success");
                        tracing::info!(credential = id, expires_at = ?done.expires_at,
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
                self.mark_needs_reauth(record).await?;
                Err(ServiceError::NeedsReauth)
            }
            Err(e) => {
                let wait = self.oauth.backoff.failed(&config, id, e.retry_after());
                self.count("unavailable");
                tracing::warn!(credential = id, error = %e, retry_in = ?wait, "OAuth refresh failed; will retry");
                Err(ServiceError::TokenUnavailable {
                    detail: e.to_string(),
                    retry_after: wait,
                })
            }
        }
    }

    /// Warns (once per credential) when a token's lifetime means write-backs more often than
    /// its store advises: each refresh is one new secret version there.
    fn check_write_rate(&self, record: &CredentialRecord, tokens: &Tokens, config: &OAuthConfig) {
        let runtime = self.runtime.load();
        let Some(manager) = runtime.config.manager(&record.location.manager_id) else {
            return;
        };
        let (Some(advised), Some(expires_at)) = (
            crate::manager::descriptor::find(&manager.kind)
                .and_then(|d| d.advised_min_write_interval),
            tokens.expires_at,
        ) else {
            return;
        };
        let lifetime = Duration::from_secs((expires_at - crate::time::now_unix()).max(0) as u64);
        let interval = lifetime.saturating_sub(config.refresh_before.min(lifetime / 2));
        if interval >= advised {
            return;
        }
        let mut warned = self
            .oauth
            .warned_write_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if warned.len() < 10_000 && warned.insert(record.id.clone()) {
            tracing::warn!(credential = %record.id, store = %manager.id, every = ?interval, advised = ?advised,
                "this token is refreshed (and written back) more often than the store advises for one secret; consider a store without that limit for it");
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .oauth_refreshes
            .with_label_values(&[outcome])
            .inc();
    }

    async fn save_pending(&self, record: &CredentialRecord, tokens: &Tokens) {
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
    async fn apply_pending(
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
    async fn write_tokens(
        &self,
        mut current: CredentialRecord,
        tokens: &Tokens,
    ) -> Result<CredentialRecord, ServiceError> {
        let mut attempt = 0;
        loop {
            let runtime = self.runtime();
            let backend: Arc<dyn SecretsManager> =
                Self::manager(&runtime, &current.location.manager_id)?;
            let loc = &current.location;
            let mut value = self
                .call(
                    &loc.manager_id,
                    "get",
                    backend.get(&loc.name, loc.version.as_deref()),
                )
                .await
                .map_err(|e| manager_failure(&loc.manager_id, e))?
                .value;
            value.insert(ACCESS_TOKEN, tokens.access_token.clone());
            if let Some(r) = &tokens.refresh_token {
                value.insert(REFRESH_TOKEN, r.clone());
            }
            let mut next = current.clone();
            next.expires_at = tokens.expires_at;
            next.needs_reauth = false;
            next.row_version += 1;
            next.updated_at = crate::time::now_unix();
            match self.write_in_place(&current, next, &backend, value).await {
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
                other => return other,
            }
        }
    }

    async fn mark_needs_reauth(&self, mut current: CredentialRecord) -> Result<(), ServiceError> {
        for _ in 0..4 {
            let mut next = current.clone();
            next.needs_reauth = true;
            next.row_version += 1;
            next.updated_at = crate::time::now_unix();
            match self
                .metadata
                .update_credential(&next, current.row_version, None)
                .await
            {
                Ok(_) => {
                    self.cache.invalidate(&current.id);
                    if let Ok(n) = self.metadata.count_needs_reauth().await {
                        self.metrics.needs_reauth.set(n as i64);
                    }
                    return Ok(());
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
