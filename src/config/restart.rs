//! Which settings a reload cannot change: one table, read both to report what needs a restart
//! and to keep those settings at the values the daemon runs with, so the two cannot disagree.

use super::Config;

/// A setting that takes effect only at start: listeners, the metadata database and keys, the
/// cache's shape, logging, and the periodic tasks' timers.
struct RestartOnly {
    key: &'static str,
    differs: fn(&Config, &Config) -> bool,
    keep: fn(&Config, &mut Config),
}

macro_rules! restart_only {
    ($key:literal, $($field:ident).+) => {
        RestartOnly {
            key: $key,
            differs: |a, b| a.$($field).+ != b.$($field).+,
            keep: |a, b| b.$($field).+ = a.$($field).+.clone(),
        }
    };
}

const RESTART_ONLY: &[RestartOnly] = &[
    restart_only!("server.socket", server.socket),
    restart_only!("server.socket_mode", server.socket_mode),
    restart_only!("server.socket_group", server.socket_group),
    restart_only!("server.request_timeout", server.request_timeout),
    restart_only!("server.header_read_timeout", server.header_read_timeout),
    restart_only!("server.body_read_timeout", server.body_read_timeout),
    restart_only!(
        "server.max_requests_per_caller",
        server.max_requests_per_caller
    ),
    restart_only!("server.max_body_bytes", server.max_body_bytes),
    restart_only!(
        "server.max_concurrent_requests",
        server.max_concurrent_requests
    ),
    restart_only!("server.shutdown_grace", server.shutdown_grace),
    restart_only!("proxy.max_concurrent", proxy.max_concurrent),
    restart_only!("server.worker_threads", server.worker_threads),
    restart_only!("server.tcp", server.tcp),
    restart_only!("metrics", metrics),
    restart_only!("store.data_dir", storage.data_dir),
    restart_only!("store.url", storage.database),
    restart_only!("store.master_key_file", storage.master_key_file),
    restart_only!(
        "store.previous_master_key_files",
        storage.previous_master_key_files
    ),
    restart_only!("store.generate_master_key", storage.generate_master_key),
    restart_only!(
        "store.journal_sweep_interval",
        storage.journal_sweep_interval
    ),
    restart_only!("store.journal_grace", storage.journal_grace),
    restart_only!("store.pool_size", storage.fleet.pool_size),
    restart_only!("store.pool_idle_timeout", storage.fleet.pool_idle_timeout),
    restart_only!("store.poll_interval", storage.fleet.poll_interval),
    restart_only!("store.heartbeat_interval", storage.fleet.heartbeat_interval),
    restart_only!("cache.ttl", cache.ttl),
    restart_only!("cache.capacity", cache.capacity),
    restart_only!("cache.stale_if_error", cache.stale_if_error),
    restart_only!("log.level", log.level),
    restart_only!("log.format", log.format),
    restart_only!("log.audit", log.audit),
    restart_only!("log.audit_file", log.audit_file),
    restart_only!("log.audit_flush_interval", log.audit_flush_interval),
    restart_only!("log.audit_buffer", log.audit_buffer),
    restart_only!("log.audit_blocking", log.audit_blocking),
    restart_only!("reload.watch", reload.watch),
    restart_only!("reload.watch_interval", reload.watch_interval),
    restart_only!("oauth.max_concurrent", oauth.max_concurrent),
];

impl Config {
    /// Settings of `next` that differ from `self` and take effect only after a restart.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        RESTART_ONLY
            .iter()
            .filter(|s| (s.differs)(self, next))
            .map(|s| s.key)
            .collect()
    }

    /// `next` with every restart-only setting kept at `self`'s value, so that what the
    /// runtime reports is what is in force.
    pub fn keep_restart_only(&self, mut next: Config) -> Config {
        for setting in RESTART_ONLY {
            (setting.keep)(self, &mut next);
        }
        next.path = self.path.clone();
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_restart_only_change_is_reported_and_kept() {
        let current = Config::parse("").unwrap();
        let next = Config::parse(
            r#"
            [server]
            socket = "/tmp/other.sock"
            max_body_bytes = 2048
            [store]
            journal_sweep_interval = "1s"
            journal_grace = "5s"
            generate_master_key = true
            [reload]
            watch = true
            watch_interval = "1s"
            [cache]
            ttl = "1s"
            [oauth]
            max_concurrent = 9
            refresh_before = "1m"
            "#,
        )
        .unwrap();
        let changed = current.restart_only_changes(&next);
        for key in [
            "server.socket",
            "server.max_body_bytes",
            "store.journal_sweep_interval",
            "store.journal_grace",
            "store.generate_master_key",
            "reload.watch",
            "reload.watch_interval",
            "cache.ttl",
            "oauth.max_concurrent",
        ] {
            assert!(changed.contains(&key), "{key} not reported: {changed:?}");
        }
        assert_eq!(changed.len(), 9, "{changed:?}");

        let kept = current.keep_restart_only(next);
        assert!(current.restart_only_changes(&kept).is_empty());
        // What a reload may change goes through.
        assert_eq!(kept.oauth.refresh_before.as_secs(), 60);
    }
}
