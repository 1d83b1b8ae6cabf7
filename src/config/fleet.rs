//! The `[store]` keys that size how an instance uses a shared PostgreSQL database (fleet
//! mode): its connection pool, how often it reads the change feed, and how often it tells the
//! fleet it is alive. SQLite ignores all but `heartbeat_interval`.

use std::time::Duration;

use super::{invalid, ConfigError};

/// At most this many connections, opened when needed.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Closed after this long unused: an idle instance keeps only the one its change-feed poll
/// uses (the rest, opened by background tasks that happened to run at once, go soon).
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often other instances' changes are looked for: the invalidation latency's bound.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often an instance re-records itself on PostgreSQL (its routing configuration is
/// recorded at once when it changes): 1,000 instances write 8 rows a second.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(120);
/// On SQLite, where a heartbeat is a local write and processes sharing the file are few:
/// a killed one stops holding moves back after 10 s.
pub const DEFAULT_SQLITE_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(4);
const MAX_POOL_SIZE: usize = 64;

/// Validated fleet sizing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    pub pool_size: usize,
    pub pool_idle_timeout: Duration,
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            pool_size: DEFAULT_POOL_SIZE,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
        }
    }
}

impl FleetConfig {
    /// An instance not heard from for this long has stopped counting (a killed one; one that
    /// stops cleanly leaves at once): two and a half heartbeats, so one late heartbeat does
    /// not drop a live instance.
    pub fn liveness(&self) -> Duration {
        self.heartbeat_interval * 5 / 2
    }
}

pub(super) fn validate(
    raw: &super::raw::RawStore,
    postgres: bool,
) -> Result<FleetConfig, ConfigError> {
    let d = FleetConfig::default();
    let heartbeat = if postgres {
        DEFAULT_HEARTBEAT_INTERVAL
    } else {
        DEFAULT_SQLITE_HEARTBEAT_INTERVAL
    };
    let fleet = FleetConfig {
        pool_size: raw.pool_size.unwrap_or(d.pool_size),
        pool_idle_timeout: raw.pool_idle_timeout.unwrap_or(d.pool_idle_timeout),
        poll_interval: raw.poll_interval.unwrap_or(d.poll_interval),
        heartbeat_interval: raw.heartbeat_interval.unwrap_or(heartbeat),
    };
    if !(1..=MAX_POOL_SIZE).contains(&fleet.pool_size) {
        return Err(invalid("store.pool_size", "must be between 1 and 64"));
    }
    if fleet.pool_idle_timeout < Duration::from_secs(1) {
        return Err(invalid("store.pool_idle_timeout", "must be at least 1s"));
    }
    if !(Duration::from_millis(50)..=Duration::from_secs(60)).contains(&fleet.poll_interval) {
        return Err(invalid(
            "store.poll_interval",
            "must be between 50ms and 1m",
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&fleet.heartbeat_interval) {
        return Err(invalid(
            "store.heartbeat_interval",
            "must be between 1s and 1h",
        ));
    }
    Ok(fleet)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(store: &str) -> Result<Config, String> {
        Config::parse(&format!("[store]\ndata_dir = \"/tmp/x\"\n{store}"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_bound_an_idle_instance_to_little() {
        let c = load("url = \"postgres://credproxy@db:5432/credproxy\"").unwrap();
        let f = &c.storage.fleet;
        assert_eq!(f.pool_size, 4);
        assert_eq!(f.poll_interval.as_millis(), 500);
        assert_eq!(f.liveness().as_secs(), 300);
        let sqlite = load("").unwrap();
        assert_eq!(sqlite.storage.fleet.liveness().as_secs(), 10);
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        for (text, key) in [
            ("pool_size = 0", "store.pool_size"),
            ("pool_size = 65", "store.pool_size"),
            ("pool_idle_timeout = \"10ms\"", "store.pool_idle_timeout"),
            ("poll_interval = \"1ms\"", "store.poll_interval"),
            ("poll_interval = \"2m\"", "store.poll_interval"),
            ("heartbeat_interval = \"2h\"", "store.heartbeat_interval"),
        ] {
            let e = load(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
        let c =
            load("pool_size = 1\npoll_interval = \"100ms\"\nheartbeat_interval = \"1s\"").unwrap();
        assert_eq!(c.storage.fleet.pool_size, 1);
    }
}
