//! What a proxied call holds while it runs: one of `proxy.max_concurrent`, one of its
//! credential's and one of its caller's shares. Held until the answer's body ends (or is
//! dropped), so a download counts for as long as it streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ProxyError;
use crate::access::Caller;
use crate::config::ProxyConfig;
use crate::metrics::Metrics;

/// Calls in flight per key, each key capped; a key is forgotten once it has none.
#[derive(Default)]
pub(super) struct InFlight(Mutex<HashMap<String, usize>>);

/// One call counted under one key; given back when dropped.
struct Taken {
    owner: Arc<InFlight>,
    key: String,
}

impl InFlight {
    fn try_take(self: &Arc<Self>, key: String, limit: usize) -> Option<Taken> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Taken {
            owner: Arc::clone(self),
            key,
        })
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut counts = self.owner.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The limits every call takes a slot of.
pub(super) struct Limits {
    total: Arc<Semaphore>,
    per_credential: Arc<InFlight>,
    per_caller: Arc<InFlight>,
}

impl Limits {
    pub(super) fn new(max_concurrent: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(max_concurrent)),
            per_credential: Arc::default(),
            per_caller: Arc::default(),
        }
    }

    /// The call's slots, or `Overloaded` naming the limit it hit.
    pub(super) fn take(
        &self,
        config: &ProxyConfig,
        caller: &Caller,
        id: &str,
        integration_type: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<Slots, ProxyError> {
        let overloaded = |scope| ProxyError::Overloaded { scope };
        let caller_key = match caller {
            Caller::Unix { uid, .. } => format!("uid:{uid}"),
            Caller::Tcp => "tcp".to_owned(),
        };
        let caller = self
            .per_caller
            .try_take(caller_key, config.max_concurrent_per_caller)
            .ok_or(overloaded(Scope::Caller))?;
        let credential = self
            .per_credential
            .try_take(id.to_owned(), config.max_concurrent_per_credential)
            .ok_or(overloaded(Scope::Credential))?;
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| overloaded(Scope::All))?;
        metrics.proxy.in_flight.inc();
        Ok(Slots {
            _held: (total, credential, caller),
            integration_type: integration_type.to_owned(),
            metrics: Arc::clone(metrics),
        })
    }
}

/// Which limit a call found full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    Credential,
    Caller,
}

/// A call's slots and its metric handles.
pub struct Slots {
    _held: (OwnedSemaphorePermit, Taken, Taken),
    pub(super) integration_type: String,
    metrics: Arc<Metrics>,
}

impl Slots {
    /// Counts a failure between credproxy and the upstream.
    pub(super) fn failed(&self, kind: &str) {
        self.metrics
            .proxy
            .upstream_errors
            .with_label_values(&[&self.integration_type, kind])
            .inc();
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.metrics.proxy.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_limit_is_counted_and_given_back() {
        let config = ProxyConfig {
            max_concurrent: 3,
            max_concurrent_per_credential: 2,
            max_concurrent_per_caller: 2,
            ..ProxyConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let limits = Limits::new(config.max_concurrent);
        let worker = Caller::Unix {
            uid: 7,
            gid: 7,
            pid: None,
        };
        let take = |caller: &Caller, id: &str| limits.take(&config, caller, id, "t", &metrics);
        let a = take(&worker, "c-1").unwrap();
        let b = take(&Caller::Tcp, "c-1").unwrap();
        let scope = |r: Result<Slots, ProxyError>| match r {
            Err(ProxyError::Overloaded { scope }) => Some(scope),
            _ => None,
        };
        assert_eq!(scope(take(&Caller::Tcp, "c-1")), Some(Scope::Credential));
        let c = take(&worker, "c-2").unwrap();
        assert_eq!(scope(take(&worker, "c-3")), Some(Scope::Caller));
        assert_eq!(scope(take(&Caller::Tcp, "c-3")), Some(Scope::All));
        assert_eq!(metrics.proxy.in_flight.get(), 3);
        drop((a, b, c));
        assert_eq!(metrics.proxy.in_flight.get(), 0);
        assert!(limits.per_credential.0.lock().unwrap().is_empty());
        assert!(limits.per_caller.0.lock().unwrap().is_empty());
        take(&worker, "c-1").unwrap();
    }
}
