//! What keeps one caller from starving the rest: a per-caller share of the request limit, and
//! a back-off (with a rate-limited log line) when accepting connections fails, e.g. because the
//! process has run out of file descriptors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::access::Caller;

/// Who a share belongs to: a uid on the socket; TCP callers share one token, so one share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Uid(u32),
    Tcp,
}

/// Requests in flight per caller, capped at `limit` each.
pub struct PerCaller {
    limit: usize,
    in_flight: Mutex<HashMap<Key, usize>>,
}

/// A slot held by one request; given back when dropped.
pub struct Slot {
    owner: Arc<PerCaller>,
    key: Key,
}

impl PerCaller {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `caller`, or `None` when it already has `limit` requests in flight.
    pub fn try_acquire(self: &Arc<Self>, caller: &Caller) -> Option<Slot> {
        let key = match caller {
            Caller::Unix { uid, .. } => Key::Uid(*uid),
            Caller::Tcp => Key::Tcp,
        };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let count = in_flight.entry(key).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(Slot {
            owner: Arc::clone(self),
            key,
        })
    }

    #[cfg(test)]
    fn callers(&self) -> usize {
        self.in_flight.lock().unwrap().len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut in_flight = self
            .owner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = in_flight.get_mut(&self.key) {
            *count -= 1;
            // Forgotten once idle: the map holds only callers with requests in flight.
            if *count == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

/// Consecutive accept failures: each waits twice as long as the last (10 ms up to 1 s), and
/// the log gets one line per 10 s saying how many failed meanwhile.
pub struct AcceptErrors {
    consecutive: u32,
    suppressed: u64,
    last_logged: Option<Instant>,
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl AcceptErrors {
    pub fn new() -> Self {
        Self {
            consecutive: 0,
            suppressed: 0,
            last_logged: None,
        }
    }

    /// Any successful accept ends a run of failures.
    pub fn succeeded(&mut self) {
        self.consecutive = 0;
    }

    /// Logs (at most once per 10 s) and waits before the next accept.
    pub async fn failed(&mut self, e: &std::io::Error) {
        // One connection that went away before it was accepted says nothing about the next.
        if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
        ) {
            return;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        let now = Instant::now();
        if self.last_logged.is_none_or(|t| now - t >= LOG_EVERY) {
            tracing::warn!(
                error = %e,
                failures_since_last_line = self.suppressed,
                "accepting a connection failed; backing off (new clients wait meanwhile)"
            );
            self.last_logged = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        tokio::time::sleep(self.delay()).await;
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(10)
            .saturating_mul(1 << self.consecutive.saturating_sub(1).min(7))
            .min(Duration::from_secs(1))
    }
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(uid: u32) -> Caller {
        Caller::Unix {
            uid,
            gid: uid,
            pid: None,
        }
    }

    #[test]
    fn one_caller_cannot_take_more_than_its_share() {
        let limits = PerCaller::new(2);
        let a1 = limits.try_acquire(&uid(1)).unwrap();
        let _a2 = limits.try_acquire(&uid(1)).unwrap();
        assert!(limits.try_acquire(&uid(1)).is_none());
        // Others are unaffected, and a returned slot is usable again.
        let _b = limits.try_acquire(&uid(2)).unwrap();
        let _t = limits.try_acquire(&Caller::Tcp).unwrap();
        drop(a1);
        let _a3 = limits.try_acquire(&uid(1)).unwrap();
        drop((_a2, _a3, _b, _t));
        assert_eq!(limits.callers(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn accept_failures_back_off_and_are_logged_at_most_every_ten_seconds() {
        let mut errors = AcceptErrors::new();
        let e = std::io::Error::from_raw_os_error(24);
        let started = Instant::now();
        for _ in 0..10 {
            errors.failed(&e).await;
        }
        // 10+20+40+...+1000 ms capped: well above ten tight 50 ms retries.
        assert!(started.elapsed() >= Duration::from_millis(2500));
        assert_eq!(errors.suppressed, 9);
        errors.succeeded();
        assert_eq!(errors.delay(), Duration::from_millis(10));
    }
}
