//! Secrets manager failures in the log at the default level: one WARN line per manager,
//! operation and kind of failure at most every 10 seconds, with the number held back since, so
//! a store refusing every write is visible without flooding the log.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use crate::manager::ManagerError;

const EVERY: Duration = Duration::from_secs(10);

type Key = (String, &'static str, &'static str);

fn seen() -> &'static Mutex<HashMap<Key, (Instant, u64)>> {
    static SEEN: OnceLock<Mutex<HashMap<Key, (Instant, u64)>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Logs `error` from `operation` on `manager` unless it is part of normal operation (a
/// missing secret, a lost compare-and-swap, a read-only store) or one like it was logged in
/// the last 10 s. The error's text is the store's code and reason, never a value.
pub(super) fn log(manager: &str, operation: &'static str, error: &ManagerError) {
    if matches!(
        error,
        ManagerError::NotFound | ManagerError::Conflict | ManagerError::ReadOnly
    ) {
        return;
    }
    let key = (manager.to_owned(), operation, error.outcome());
    let now = Instant::now();
    let suppressed = {
        let mut seen = seen().lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen.entry(key).or_insert((now - EVERY * 2, 0));
        if now.duration_since(entry.0) < EVERY {
            entry.1 += 1;
            return;
        }
        let suppressed = entry.1;
        *entry = (now, 0);
        suppressed
    };
    tracing::warn!(
        manager,
        operation,
        outcome = error.outcome(),
        error = %error,
        suppressed,
        "secrets manager call failed"
    );
}
