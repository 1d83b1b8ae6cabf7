//! Every default value of the configuration file, named in one place so that the README's
//! reference table, the validation code and the tests agree.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/credproxy/credproxy.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/credproxy";
pub const DEFAULT_SOCKET_NAME: &str = "credproxy.sock";
pub const DEFAULT_DATABASE_NAME: &str = "credproxy.db";
pub const DEFAULT_MASTER_KEY_NAME: &str = "master.key";
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Shorter than the request timeout, so a caller trickling a body is cut off before it has
/// held a request slot for the whole of it.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_TOKEN_HEADER: &str = "x-credproxy-token";
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);
pub const DEFAULT_JOURNAL_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_CACHE_CAPACITY: u64 = 10_000;
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(120);
/// `cache.bypass_interval`: a worker retrying after a refused key gets the value read a moment
/// ago rather than another store read.
pub const DEFAULT_BYPASS_INTERVAL: Duration = Duration::from_secs(1);
/// Above this a bypass would be limited for so long that asking for one means little: a larger
/// value is more likely a slip (`"1h"` for `"1s"`) than a wish.
pub const MAX_BYPASS_INTERVAL: Duration = Duration::from_secs(3600);
/// `backends.timeout`: the deadline of one call to a secrets manager.
pub const DEFAULT_MANAGER_TIMEOUT: Duration = Duration::from_secs(3);
/// `backends.access_check_interval`: Kubernetes updates a mounted Secret within about a minute;
/// reading a few small files every 10 s is nothing.
pub const DEFAULT_ACCESS_CHECK_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_MIGRATION_CONCURRENCY: usize = 4;
pub const DEFAULT_MIGRATION_RATE: u32 = 50;
pub const DEFAULT_MIGRATION_RETRY_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_MIGRATION_RETRY_MAX: Duration = Duration::from_secs(300);
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(300);
pub const DEFAULT_REFRESH_JITTER: Duration = Duration::from_secs(60);
pub const DEFAULT_REFRESH_CONCURRENCY: usize = 4;
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_REFRESH_SCAN_INTERVAL: Duration = Duration::from_secs(15);
pub const DEFAULT_REFRESH_RETRY_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_REFRESH_RETRY_MAX: Duration = Duration::from_secs(300);
/// What a manager's secret names start with unless its `prefix` says otherwise.
pub const DEFAULT_PREFIX: &str = "credproxy/";
/// The shortest interval accepted for the periodic tasks (sweeps, scans, file watching): below
/// it they would spin.
pub const MIN_PERIOD: Duration = Duration::from_millis(100);
/// The workspace of single-tenant set-ups: credentials created without one, the managers and
/// routing of the config file, and what an `[[access]]` rule without `workspaces` grants.
pub const DEFAULT_WORKSPACE: &str = "default";
/// The id the local encrypted store answers to in routing, references and the API.
pub const LOCAL_MANAGER_ID: &str = "local";
