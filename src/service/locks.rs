//! Keeping writers of one credential apart: a lock per credential in this process, and a lease
//! in the metadata database held while work runs, for every process sharing it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::Service;

/// Per-credential mutual exclusion for writers in this process, so a write, a move and the
/// journal sweeper never interleave on one credential.
#[derive(Default)]
pub(super) struct KeyedLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub(super) async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_owned(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }
}

impl Service {
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
}
