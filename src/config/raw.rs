//! The configuration file's shape as serde reads it: every section rejects unknown keys, and
//! nothing here has a default or a meaning yet (validation gives both).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{GroupSpec, LogFormat, SecretRef};
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) store: RawStore,
    #[serde(default)]
    pub(super) cache: RawCache,
    #[serde(default)]
    pub(super) backends: RawBackends,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) oauth: RawOAuth,
    #[serde(default)]
    pub(super) reload: RawReload,
    #[serde(default)]
    pub(super) migration: RawMigration,
    #[serde(default)]
    pub(super) credentials: super::limits::RawCredentials,
    #[serde(default)]
    pub(super) events: super::events::RawEvents,
    #[serde(default)]
    pub(super) proxy: super::proxy::RawProxy,
    #[serde(default, rename = "secrets_manager")]
    pub(super) secrets_managers: Vec<RawManager>,
    #[serde(default)]
    pub(super) routing: RawRouting,
    #[serde(default)]
    pub(super) access: Vec<RawAccess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) socket: Option<PathBuf>,
    pub(super) socket_mode: Option<String>,
    pub(super) socket_group: Option<GroupSpec>,
    #[serde(default, with = "humantime_serde")]
    pub(super) request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) header_read_timeout: Option<Duration>,
    pub(super) max_body_bytes: Option<usize>,
    pub(super) max_concurrent_requests: Option<usize>,
    pub(super) max_requests_per_caller: Option<usize>,
    pub(super) worker_threads: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) body_read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) shutdown_grace: Option<Duration>,
    pub(super) tcp: Option<RawTcp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTcp {
    pub(super) listen: SocketAddr,
    pub(super) token_file: PathBuf,
    pub(super) token_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<SocketAddr>,
    pub(super) enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) data_dir: Option<PathBuf>,
    pub(super) url: Option<String>,
    /// The PostgreSQL password, never inside the URL.
    pub(super) password: Option<SecretRef>,
    pub(super) master_key_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) previous_master_key_files: Vec<PathBuf>,
    pub(super) generate_master_key: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub(super) journal_sweep_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) journal_grace: Option<Duration>,
    pub(super) pool_size: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) pool_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) heartbeat_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    #[serde(default, with = "humantime_serde")]
    pub(super) ttl: Option<Duration>,
    pub(super) capacity: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub(super) stale_if_error: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) bypass_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackends {
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) access_check_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReload {
    pub(super) watch: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub(super) watch_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMigration {
    pub(super) concurrency: Option<usize>,
    pub(super) rate: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retry_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retry_max: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOAuth {
    #[serde(default, with = "humantime_serde")]
    pub(super) refresh_before: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) jitter: Option<Duration>,
    pub(super) max_concurrent: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) scan_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retry_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) retry_max: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<LogFormat>,
    pub(super) audit: Option<bool>,
    pub(super) audit_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub(super) audit_flush_interval: Option<Duration>,
    pub(super) audit_buffer: Option<usize>,
    pub(super) audit_blocking: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RawManager {
    pub(super) id: Option<String>,
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) prefix: Option<String>,
    #[serde(flatten)]
    pub(super) settings: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) default: Option<String>,
    #[serde(default)]
    pub(super) environments: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccess {
    pub(super) uid: Option<u32>,
    pub(super) user: Option<String>,
    pub(super) gid: Option<u32>,
    pub(super) group: Option<String>,
    pub(super) tcp: Option<bool>,
    pub(super) environments: Vec<String>,
    pub(super) workspaces: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub(super) read: bool,
    /// Absent: as `read` (a rule that may not read may not use either unless it says so).
    #[serde(rename = "use")]
    pub(super) use_: Option<bool>,
    #[serde(default)]
    pub(super) write: bool,
    #[serde(default)]
    pub(super) admin: bool,
}

fn yes() -> bool {
    true
}
