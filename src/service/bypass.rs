//! Reads that bypass the cache (`Cache-Control: no-cache`): a caller whose upstream refused the
//! cached key asks for the store's current value. Owns the per-credential limit that keeps such
//! reads from hammering a store, and the adoption of a version written to the store out of band.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::error::manager_failure;
use super::reads::earliest;
use super::{Service, ServiceError};
use crate::access::{Action, Caller, Scope};
use crate::cache::{CacheStatus, Entry, Loaded};
use crate::config::is_valid_name;
use crate::manager::ManagerError;

/// When each credential's last bypass read its store. Entries older than the interval say
/// nothing any more and are forgotten, so the map holds at most the credentials bypassed
/// within the last two intervals.
#[derive(Default)]
pub(super) struct BypassLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    last: HashMap<String, Instant>,
    /// When the map is next pruned: at most once per interval, so a burst of bypasses of
    /// distinct credentials costs one pass over the map per interval, not one per read.
    next_prune: Option<Instant>,
}

impl BypassLimiter {
    /// Whether a bypass of `key` may read the store at `now`; if so, that read is recorded.
    /// A zero `interval` turns the limit off.
    pub(super) fn admit(&self, key: &str, interval: Duration, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if interval.is_zero() {
            state.last.clear();
            return true;
        }
        if state.next_prune.is_none_or(|at| now >= at) {
            state
                .last
                .retain(|_, at| now.duration_since(*at) < interval);
            state.next_prune = Some(now + interval);
        }
        match state.last.get_mut(key) {
            Some(at) if now.duration_since(*at) < interval => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                state.last.insert(key.to_owned(), now);
                true
            }
        }
    }

    /// Drops what no longer limits anything (run with the cache's sweep, so a burst is
    /// forgotten even if no bypass follows it).
    pub(super) fn forget_older_than(&self, interval: Duration, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .last
            .retain(|_, at| now.duration_since(*at) < interval);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap().last.len()
    }
}

impl Service {
    /// Resolves a credential from its store, whatever the cache holds, and puts the value in
    /// the cache's place. Access is checked exactly as for [`Self::get`], against the
    /// credential's row, before any store call. At most one bypass per credential reads the
    /// store per `cache.bypass_interval`; one within it is answered like a plain read, which
    /// after a successful bypass is the value that bypass loaded ([`CacheStatus::BypassLimited`]).
    /// A failed store read is answered as an error, never with the cached value.
    pub async fn get_current(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        if !self.allows(caller, Action::Read, Scope::ANY) {
            return Err(ServiceError::Forbidden);
        }
        if !is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        let (since, record) = self.readable_row(caller, id, Action::Read).await?;
        let interval = self.runtime.load().config.cache.bypass_interval;
        let bypasses = &self.metrics.cache_bypasses;
        let (entry, status) = if self.bypasses.admit(id, interval, Instant::now()) {
            // In a task of its own: the load takes the credential's write lock, and a caller
            // that gives up (a disconnect, the request deadline) must not leave that lock held
            // by a flight nobody polls any more.
            let loaded = self
                .cache
                .reload(id, || {
                    let task = tokio::spawn(self.current_loader(id.to_owned()));
                    async move {
                        task.await.unwrap_or_else(|e| {
                            Err(ServiceError::Metadata(format!(
                                "the bypass read failed: {e}"
                            )))
                        })
                    }
                })
                .await;
            let outcome = if loaded.is_ok() { "loaded" } else { "failed" };
            bypasses.with_label_values(&[outcome]).inc();
            (loaded?, CacheStatus::Bypass)
        } else {
            bypasses.with_label_values(&["limited"]).inc();
            // A bypass still under way is the value this caller wants: wait for it.
            let (entry, status) = match self.cache.join_reload(id).await {
                Some(loaded) => (loaded?, CacheStatus::Hit),
                None => {
                    self.cache
                        .get_or_load_since(id, Some(since), || {
                            self.loader_from(id.to_owned(), Some(record))
                        })
                        .await?
                }
            };
            let status = match status {
                CacheStatus::Hit => CacheStatus::BypassLimited,
                other => other,
            };
            (entry, status)
        };
        self.check_entry_access(caller, &entry, Action::Read)?;
        self.checked_token(id, entry, status).await
    }

    /// Loads the store's current version of `id` (a plain load reads the version the row
    /// records). A version newer than the recorded one was written out of band (a key rotated
    /// in the store's console): the row adopts it, so plain loads after this one read it too
    /// instead of going back to the old value once the cache entry expires.
    fn current_loader(
        self: &Arc<Self>,
        id: String,
    ) -> impl Future<Output = Result<Loaded, ServiceError>> + Send + 'static {
        let service = Arc::clone(self);
        async move {
            // Writes, moves and the journal sweeper hold this lock while a version they wrote
            // is not yet recorded: adopting one of theirs half-way would race them.
            let _guard = service.locks.lock(&id).await;
            let mut record = service
                .metadata
                .get_credential(&id)
                .await?
                .ok_or(ServiceError::NotFound)?;
            let runtime = service.runtime.load_full();
            let manager = Self::manager(&runtime, &record.location.manager_id)?;
            let loc = &record.location;
            // An OAuth credential's row and its tokens are written together by the refresh
            // write-back: its recorded version is read, never one beside it.
            let wanted = if record.oauth.is_some() {
                loc.version.as_deref()
            } else {
                None
            };
            let read = match service
                .call(&loc.manager_id, "get", manager.get(&loc.name, wanted))
                .await
            {
                Ok(read) => read,
                // A move deleted the copy after the row was read: the plain load follows it.
                Err(ManagerError::NotFound) => {
                    return service.loader_from(id, None).await;
                }
                Err(e) => return Err(manager_failure(&loc.manager_id, e)),
            };
            if wanted.is_none() && newer(loc.version.as_deref(), &read.version) {
                let mut next = record.clone();
                next.location.version = Some(read.version.clone());
                next.row_version += 1;
                next.updated_at = crate::time::now_unix();
                match service
                    .metadata
                    .update_credential(&next, record.row_version, None, None)
                    .await
                {
                    Ok(_) => {}
                    // Another instance wrote the row meanwhile: what it recorded wins, and is
                    // what this caller gets.
                    Err(crate::metadata::MetadataError::Conflict) => {
                        return service.loader_from(id, None).await;
                    }
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(
                    credential = %id,
                    manager = %next.location.manager_id,
                    "a bypass read found a newer version in the store; the credential now follows it"
                );
                record = next;
            }
            let valid_until = earliest(
                record.expires_at_ms.map(crate::time::from_unix_ms),
                read.expires_in.map(crate::time::from_now),
            );
            Ok(Loaded {
                record: Arc::new(record),
                secrets: read.value,
                valid_until,
            })
        }
    }
}

/// Whether the store's current version `read` is one to adopt over the `recorded` one: a
/// higher number where versions are numbers (Vault, Google, the local store; a lower one is a
/// lagging replica's answer, not a rotation), any other one where they are opaque ids (AWS's
/// and Azure's current version is by definition the newest).
fn newer(recorded: Option<&str>, read: &str) -> bool {
    let Some(recorded) = recorded else {
        return false;
    };
    match (recorded.parse::<u64>(), read.parse::<u64>()) {
        (Ok(recorded), Ok(read)) => read > recorded,
        _ => recorded != read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_newer_version_is_adopted() {
        assert!(newer(Some("3"), "4"));
        assert!(!newer(Some("4"), "3"), "a lagging replica");
        assert!(!newer(Some("4"), "4"));
        assert!(newer(Some("a1b2"), "c3d4"), "opaque ids: the current one");
        assert!(!newer(None, "4"), "nothing recorded: nothing to compare");
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_bypass_within_the_interval_is_limited() {
        let limiter = BypassLimiter::default();
        let interval = Duration::from_secs(1);
        assert!(limiter.admit("a", interval, Instant::now()));
        assert!(!limiter.admit("a", interval, Instant::now()));
        assert!(
            limiter.admit("b", interval, Instant::now()),
            "per credential"
        );
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!limiter.admit("a", interval, Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(limiter.admit("a", interval, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_forgets_credentials_older_than_the_interval() {
        let limiter = BypassLimiter::default();
        let interval = Duration::from_secs(1);
        for i in 0..1000 {
            assert!(limiter.admit(&format!("c{i}"), interval, Instant::now()));
        }
        assert_eq!(limiter.len(), 1000);
        tokio::time::advance(interval).await;
        // The next bypass prunes what no longer limits anything...
        assert!(limiter.admit("late", interval, Instant::now()));
        assert_eq!(limiter.len(), 1);
        // ...and so does the sweep, with no bypass at all.
        tokio::time::advance(interval).await;
        limiter.forget_older_than(interval, Instant::now());
        assert_eq!(limiter.len(), 0);
    }

    #[test]
    fn a_zero_interval_admits_every_bypass_and_remembers_nothing() {
        let limiter = BypassLimiter::default();
        let now = Instant::now();
        assert!(limiter.admit("a", Duration::ZERO, now));
        assert!(limiter.admit("a", Duration::ZERO, now));
        assert_eq!(limiter.len(), 0);
    }
}
