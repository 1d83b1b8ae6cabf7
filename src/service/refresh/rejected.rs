//! Refreshes an upstream asked for by refusing an access token with `401` (the egress proxy).
//! A refused token is replaced once, however many calls saw it refused. What keeps an upstream
//! that refuses every token (a path the grant does not cover, a scope it lacks) from turning
//! each call into a token request and a new secret version: a token this process obtained
//! after a `401` is not replaced again after another `401` until some call has succeeded with
//! it or [`HOLD`] has passed, and when the call sent again with a fresh token was refused too,
//! no such refresh runs for [`HOLD`] whatever succeeds meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::Trigger;
use crate::cache::Entry;
use crate::service::Service;

/// How long refreshes after `401`s wait for a credential: for a call to succeed with the token
/// one produced, or after one did not help.
pub const HOLD: Duration = Duration::from_secs(60);

/// Credentials beyond which settled records are dropped.
const KEEP: usize = 10_000;

#[derive(Default)]
pub(crate) struct Rejections(Mutex<HashMap<String, Record>>);

struct Record {
    /// The row version the refresh produced.
    version: i64,
    /// When: the token it produced is not replaced after a `401` for [`HOLD`] from then,
    /// unless a call succeeds with it.
    at: Instant,
    /// A call sent again with that token was refused too: no refresh after a `401` until then.
    futile_until: Option<Instant>,
}

impl Record {
    /// Whether a `401` to the token of `version` may not make a refresh now.
    fn holds(&self, version: i64, now: Instant) -> bool {
        match self.futile_until {
            Some(until) => now < until,
            None => self.version == version && now.duration_since(self.at) < HOLD,
        }
    }
}

impl Rejections {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Record>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Service {
    /// The egress proxy's upstream answered `401` to the access token of `entry`: replaces
    /// that token unless another refresh already did (across a fleet too: the refresh skips a
    /// row that moved on since `entry` was read) or refreshing is not helping (above).
    /// Returns whether a call may be sent again with what the credential holds now. A secrets
    /// manager credproxy never writes to refreshes its tokens itself: its cache entry is
    /// dropped so the next call reads the current one.
    pub async fn refresh_rejected(self: &Arc<Self>, id: &str, entry: &Entry) -> bool {
        if !entry.has_oauth() {
            return false;
        }
        if self.is_read_only(entry.manager_id()) {
            self.cache.invalidate(id);
            return false;
        }
        let now = Instant::now();
        let held_back = self.oauth.rejected.with(|records| {
            records
                .get(id)
                .is_some_and(|r| r.holds(entry.row_version(), now))
        });
        if held_back || self.oauth.backoff.remaining(id).is_some() {
            return false;
        }
        match self
            .spawn_refresh(id, entry.row_version(), Trigger::Rejected)
            .await
        {
            Ok(Ok(done)) => {
                let version = done.record().row_version;
                // Skipped because another process refreshed it: the copy cached here may be
                // the refused one still.
                if self.cache.peek(id).map(|e| e.row_version()) != Some(version) {
                    self.cache.invalidate(id);
                }
                self.oauth.rejected.with(|records| {
                    if records.len() >= KEEP {
                        records.retain(|_, r| r.holds(r.version, now));
                    }
                    records.insert(
                        id.to_owned(),
                        Record {
                            version,
                            at: now,
                            futile_until: None,
                        },
                    );
                });
                true
            }
            Ok(Err(e)) => {
                tracing::info!(credential = id, error = %e, "the upstream refused the access token and it could not be refreshed");
                false
            }
            Err(e) => {
                tracing::warn!(credential = id, error = %e, "the refresh task failed");
                false
            }
        }
    }

    /// A call through the proxy with `entry`'s token got an answer other than `401`: a token a
    /// `401` made us obtain works, and may be replaced after a later `401` (unless a futile
    /// retry still holds refreshes back).
    pub fn token_accepted(&self, id: &str, entry: &Entry) {
        let now = Instant::now();
        self.oauth.rejected.with(|records| {
            let settled = records.get(id).is_some_and(|r| {
                r.version == entry.row_version() && r.futile_until.is_none_or(|u| now >= u)
            });
            if settled {
                records.remove(id);
            }
        });
    }

    /// The call sent again with a fresh token (`entry`'s) was refused too: refreshing does not
    /// help this credential's calls for [`HOLD`].
    pub fn refresh_futile(&self, id: &str, entry: &Entry) {
        tracing::info!(credential = id, hold = ?HOLD, "the upstream refused the refreshed access token too; no refresh after a 401 for a while");
        let now = Instant::now();
        self.oauth.rejected.with(|records| {
            records.insert(
                id.to_owned(),
                Record {
                    version: entry.row_version(),
                    at: now,
                    futile_until: Some(now + HOLD),
                },
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refreshed_token_is_held_until_it_works_or_the_hold_ends() {
        let t0 = Instant::now();
        let fresh = Record {
            version: 2,
            at: t0,
            futile_until: None,
        };
        assert!(fresh.holds(2, t0 + Duration::from_secs(1)));
        assert!(!fresh.holds(3, t0), "another token than the one produced");
        assert!(!fresh.holds(2, t0 + HOLD), "held for a minute at most");
        let futile = Record {
            futile_until: Some(t0 + HOLD),
            ..fresh
        };
        assert!(futile.holds(3, t0), "whatever the token");
        assert!(!futile.holds(3, t0 + HOLD));
    }
}
