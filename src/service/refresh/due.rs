//! When a token is refreshed: by a read that finds it inside its refresh window, on request,
//! and by the background pass over every due token.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::{Refreshed, Trigger};
use crate::cache::{CacheStatus, Entry};
use crate::metadata::CredentialRecord;
use crate::oauth::due_at_ms;
use crate::service::{Service, ServiceError};

/// How many refreshes one background pass starts at most (the soonest due); the next pass
/// follows at once for the rest.
const MAX_PER_PASS: usize = 1000;
/// Rows read per query of a pass, which reads every candidate along the expiry index: a page
/// of rows that cannot be refreshed now (backing off after a failure, or in a read-only store)
/// must not hide the ones that can.
const SCAN_PAGE: usize = 1000;

impl Service {
    /// The read path's token check: a token inside its window is refreshed before it is
    /// handed out; if that fails the current token is served while it is still valid, and
    /// an expired one never is.
    pub(in crate::service) async fn checked_token(
        self: &Arc<Self>,
        id: &str,
        entry: Arc<Entry>,
        status: CacheStatus,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        let Some(expires_at_ms) = entry.expires_at_ms().filter(|_| entry.has_oauth()) else {
            return Ok((entry, status));
        };
        // Boxed: the refresh's state would otherwise make every read's future larger, and a
        // read's future is copied a few times per request.
        Box::pin(self.checked_oauth_token(id, entry, status, expires_at_ms)).await
    }

    async fn checked_oauth_token(
        self: &Arc<Self>,
        id: &str,
        entry: Arc<Entry>,
        status: CacheStatus,
        expires_at_ms: i64,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        if self.is_read_only(entry.manager_id()) {
            // Refreshed by its own service; the cache entry already ends at `expires_in`.
            return Ok((entry, status));
        }
        let config = self.oauth_config();
        let expired = crate::time::now_unix_ms() >= expires_at_ms;
        if entry.needs_reauth() {
            return if expired {
                Err(ServiceError::NeedsReauth)
            } else {
                Ok((entry, status))
            };
        }
        if !self.is_entry_due(&config, id, &entry) {
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
        let task = self.spawn_refresh(id, entry.row_version(), Trigger::Read);
        let outcome = if expired {
            task.await
        } else {
            // The current token is still good: wait a little for the new one, then serve the
            // current one and let the refresh finish on its own.
            let runtime = self.runtime.load();
            let left = Duration::from_millis(
                (expires_at_ms.saturating_sub(crate::time::now_unix_ms())).max(0) as u64,
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
                let cached = self.cache.peek(id).map(|e| e.row_version());
                if cached != Some(fresh.row_version) {
                    // Another process refreshed (or changed) it: our cached copy is old.
                    self.cache.invalidate(id);
                }
                let (entry, status) = self
                    .cache
                    .get_or_load(id, || self.loader(id.to_owned()))
                    .await?;
                let expired = entry
                    .expires_at_ms()
                    .is_some_and(|e| crate::time::now_unix_ms() >= e);
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
    pub(super) fn spawn_refresh(
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
        use crate::access::{Action, Scope};
        if !crate::config::is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        if !self.allows(caller, Action::Write, Scope::ANY) {
            return Err(ServiceError::Forbidden);
        }
        let record = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        self.check_access(caller, Action::Write, &record)?;
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
    /// most `oauth.max_concurrent` at a time. Returns how many were refreshed, and when the
    /// next token seen becomes due (Unix ms) if that is before the next regular pass, so a
    /// short-lived token is refreshed on time without a short `oauth.scan_interval`.
    pub async fn refresh_due(&self) -> Result<(usize, Option<i64>), ServiceError> {
        let config = self.oauth_config();
        let ahead = config.refresh_before + config.jitter + config.scan_interval;
        let horizon = crate::time::now_unix() + ahead.as_secs() as i64 + 1;
        let now = crate::time::now_unix_ms();
        let mut next_due: Option<i64> = None;
        let mut due: Vec<(i64, CredentialRecord)> = Vec::new();
        let mut after = (i64::MIN, String::new());
        loop {
            let page = self
                .metadata
                .oauth_due(horizon, (after.0, &after.1), SCAN_PAGE)
                .await?;
            let mut last_page = page.len() < SCAN_PAGE;
            if let Some(last) = page.last() {
                // The page's last row as the store sorts it (expires_at is whole seconds).
                let next = (
                    last.expires_at_ms
                        .map_or(i64::MAX, |ms| ms.div_euclid(1000)),
                    last.id.clone(),
                );
                // Never the same page twice, whatever a row holds (the database orders ids
                // by its own collation, so only the expiry can be compared here).
                last_page |= next.0 < after.0 || next == after;
                after = next;
            }
            for r in page {
                if r.oauth.is_none()
                    || r.needs_reauth
                    || self.is_read_only(&r.location.manager_id)
                    || self.oauth.backoff.remaining(&r.id).is_some()
                    || self.oauth.deferred.remaining(&r.id).is_some()
                {
                    continue;
                }
                match due_at_ms(&config, &r) {
                    Some(at) if at <= now => due.push((at, r)),
                    Some(at) => next_due = Some(next_due.map_or(at, |n| n.min(at))),
                    None => {}
                }
            }
            if last_page {
                break;
            }
        }
        due.sort_unstable_by_key(|(at, _)| *at);
        if due.len() > MAX_PER_PASS {
            due.truncate(MAX_PER_PASS);
            next_due = Some(now);
        }
        let due = due.into_iter().map(|(_, r)| r);
        let config = &config;
        let refreshed = futures::stream::iter(due)
            .map(|r| async move {
                match self.refresh(&r.id, r.row_version, Trigger::Background).await {
                    Ok(Refreshed::Done(_)) => 1,
                    Ok(Refreshed::Skipped(_)) => 0,
                    Err(e) => {
                        // Failures of the token endpoint back off already; any other (its
                        // store cannot be built or read, a field is missing) would otherwise
                        // put the credential at the head of every pass.
                        if self.oauth.backoff.remaining(&r.id).is_none() {
                            self.oauth.deferred.failed(config, &r.id, None);
                        }
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
        Ok((refreshed, next_due))
    }
}
