//! The TOML configuration: a raw serde shape that rejects unknown keys, validated once into
//! typed settings with every default named here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::secret::SecretString;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/credproxy/credproxy.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/credproxy";
pub const DEFAULT_SOCKET_NAME: &str = "credproxy.sock";
pub const DEFAULT_DATABASE_NAME: &str = "credproxy.db";
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1024;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(300);
pub const DEFAULT_CACHE_CAPACITY: u64 = 10_000;
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(120);
pub const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_TOKEN_HEADER: &str = "x-credproxy-token";
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(300);
pub const DEFAULT_REFRESH_JITTER: Duration = Duration::from_secs(60);
pub const DEFAULT_REFRESH_CONCURRENCY: usize = 4;
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_REFRESH_SCAN_INTERVAL: Duration = Duration::from_secs(15);
pub const DEFAULT_REFRESH_RETRY_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_REFRESH_RETRY_MAX: Duration = Duration::from_secs(300);
/// The id the local encrypted store answers to in routing, references and the API.
pub const LOCAL_MANAGER_ID: &str = "local";

/// Why a configuration was refused. Every variant names the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file is not valid TOML or has an unknown key: {0}")]
    Syntax(String),
    #[error("`{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("`{key}`: no secrets manager with id `{id}` is configured")]
    UnknownManager { key: String, id: String },
    #[error("`{key}`: secrets manager `{id}` is read-only and cannot be a routing target")]
    ReadOnlyTarget { key: String, id: String },
    #[error("secrets manager `{id}`: type `{kind}` is not built into this binary (cargo feature `{kind}`)")]
    BackendNotBuilt { id: String, kind: &'static str },
    #[error("`{key}`: {addr} is not a loopback address; this listener binds loopback only")]
    NotLoopback { key: String, addr: SocketAddr },
    #[error("`{key}`: cannot read secret from {source_desc}: {reason}")]
    SecretSource {
        key: String,
        source_desc: String,
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw shape
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    backends: RawBackends,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    oauth: RawOAuth,
    #[serde(default)]
    reload: RawReload,
    #[serde(default)]
    migration: RawMigration,
    #[serde(default, rename = "secrets_manager")]
    secrets_managers: Vec<RawManager>,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    access: Vec<RawAccess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    socket_group: Option<GroupSpec>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    header_read_timeout: Option<Duration>,
    max_body_bytes: Option<usize>,
    max_concurrent_requests: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    tcp: Option<RawTcp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTcp {
    listen: SocketAddr,
    token_file: PathBuf,
    token_header: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<SocketAddr>,
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    data_dir: Option<PathBuf>,
    url: Option<String>,
    /// The PostgreSQL password, never inside the URL.
    password: Option<SecretRef>,
    master_key_file: Option<PathBuf>,
    #[serde(default)]
    previous_master_key_files: Vec<PathBuf>,
    generate_master_key: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    journal_sweep_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    journal_grace: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    capacity: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    stale_if_error: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackends {
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReload {
    watch: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    watch_interval: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigration {
    concurrency: Option<usize>,
    rate: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    retry_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOAuth {
    #[serde(default, with = "humantime_serde")]
    refresh_before: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    jitter: Option<Duration>,
    max_concurrent: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    scan_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
    audit: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct RawManager {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    prefix: Option<String>,
    #[serde(flatten)]
    settings: toml::Table,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    default: Option<String>,
    #[serde(default)]
    environments: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    uid: Option<u32>,
    user: Option<String>,
    gid: Option<u32>,
    group: Option<String>,
    tcp: Option<bool>,
    environments: Vec<String>,
    #[serde(default)]
    write: bool,
    #[serde(default)]
    admin: bool,
}

// ---------------------------------------------------------------------------------------------
// Validated shape
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    pub metrics: Option<MetricsConfig>,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub backend_timeout: Duration,
    pub log: LogConfig,
    pub oauth: OAuthConfig,
    pub reload: ReloadConfig,
    pub migration: MigrationConfig,
    pub managers: Vec<ManagerConfig>,
    pub routing: RoutingConfig,
    pub access: Vec<AccessRule>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<GroupSpec>,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    pub shutdown_grace: Duration,
    pub tcp: Option<TcpConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum GroupSpec {
    Id(u32),
    Name(String),
}

#[derive(Debug, Clone)]
pub struct TcpConfig {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub token_header: String,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    pub database: DatabaseUrl,
    pub master_key_file: PathBuf,
    pub previous_master_key_files: Vec<PathBuf>,
    pub generate_master_key: bool,
    /// How often abandoned copies are looked for.
    pub journal_sweep_interval: Duration,
    /// How old a journal entry must be before the sweeper acts on it: older than any write
    /// that can still be in flight in a process sharing the database. `None`: derived from
    /// the request and store timeouts.
    pub journal_grace: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    /// A `postgres://user@host/db?sslmode=…` URL without a password, and where to read the
    /// password from.
    Postgres {
        url: String,
        password: Option<SecretRef>,
    },
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub capacity: u64,
    pub stale_if_error: Duration,
}

/// `[reload]`: besides SIGHUP and `POST /v1/reload`, optionally when the file changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadConfig {
    pub watch: bool,
    pub watch_interval: Duration,
}

/// `[migration]`: how credentials are moved when the routing chain changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// Moves in flight at once per store (a move counts against its source and its target).
    pub concurrency: usize,
    /// Moves started per second per store; 0 means no limit.
    pub rate: u32,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// How OAuth tokens are refreshed (`[oauth]`).
#[derive(Debug, Clone)]
pub struct OAuthConfig {
    /// Refresh this long before `expires_at` (shortened to half the token's lifetime when the
    /// token lives less than twice this).
    pub refresh_before: Duration,
    /// Up to this much earlier again, fixed per credential, so tokens that expire together are
    /// not refreshed together.
    pub jitter: Duration,
    /// Token requests in flight at once, across all token endpoints.
    pub max_concurrent: usize,
    /// Deadline of one token request.
    pub timeout: Duration,
    /// How often the background refresher looks for tokens coming due.
    pub scan_interval: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub audit: bool,
}

/// The manager types the schema knows. Whether one is usable depends on the build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ManagerKind {
    Aws,
    Azure,
    Gcp,
    Hashicorp,
    Composio,
}

impl ManagerKind {
    /// The provider's advice on how often one secret may be updated, where it gives one.
    /// AWS: at most once every 10 minutes sustained, or versions pile up faster than they
    /// are removed and hit the per-secret version quota. Google: 2 writes/s per secret (as
    /// a quota on AddSecretVersion).
    pub fn advised_min_write_interval(self) -> Option<Duration> {
        match self {
            ManagerKind::Aws => Some(Duration::from_secs(600)),
            ManagerKind::Gcp => Some(Duration::from_millis(500)),
            _ => None,
        }
    }

    pub const ALL: [ManagerKind; 5] = [
        ManagerKind::Aws,
        ManagerKind::Azure,
        ManagerKind::Gcp,
        ManagerKind::Hashicorp,
        ManagerKind::Composio,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ManagerKind::Aws => "aws",
            ManagerKind::Azure => "azure",
            ManagerKind::Gcp => "gcp",
            ManagerKind::Hashicorp => "hashicorp",
            ManagerKind::Composio => "composio",
        }
    }

    /// Composio hands out tokens it manages itself; credproxy never writes there.
    pub fn is_read_only(self) -> bool {
        matches!(self, ManagerKind::Composio)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ManagerConfig {
    pub id: String,
    pub kind: ManagerKind,
    pub prefix: String,
    /// Type-specific keys, validated by the backend for `kind` (each backend owns its keys).
    pub settings: toml::Table,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingConfig {
    pub default: Option<String>,
    pub environments: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Uid(u32),
    Gid(u32),
    /// A caller on the loopback TCP listener that presented the token.
    Tcp,
}

#[derive(Debug, Clone)]
pub struct AccessRule {
    pub principal: Principal,
    /// `None` means every environment (`"*"`).
    pub environments: Option<Vec<String>>,
    pub write: bool,
    pub admin: bool,
}

impl AccessRule {
    pub fn allows_environment(&self, environment: &str) -> bool {
        match &self.environments {
            None => true,
            Some(list) => list.iter().any(|e| e == environment),
        }
    }
}

/// Where a manager's access detail comes from: never inline, so config files can be shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

const SECRET_REF_SHAPE: &str =
    "expected { env = \"VAR\" } or { file = \"/path\" }; secrets are never written inline";

/// Hand-written so that a secret pasted inline is refused without being quoted back.
impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RefVisitor;
        impl<'de> serde::de::Visitor<'de> for RefVisitor {
            type Value = SecretRef;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(SECRET_REF_SHAPE)
            }
            fn visit_str<E: serde::de::Error>(self, _v: &str) -> Result<SecretRef, E> {
                Err(E::custom(SECRET_REF_SHAPE))
            }
            fn visit_i64<E: serde::de::Error>(self, _v: i64) -> Result<SecretRef, E> {
                Err(E::custom(SECRET_REF_SHAPE))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<SecretRef, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let parsed = match key.as_str() {
                        "env" => SecretRef::Env(value),
                        "file" => SecretRef::File(PathBuf::from(value)),
                        _ => return Err(serde::de::Error::custom(SECRET_REF_SHAPE)),
                    };
                    if found.replace(parsed).is_some() {
                        return Err(serde::de::Error::custom(SECRET_REF_SHAPE));
                    }
                }
                found.ok_or_else(|| serde::de::Error::custom(SECRET_REF_SHAPE))
            }
        }
        deserializer.deserialize_any(RefVisitor)
    }
}

impl SecretRef {
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(v) => format!("environment variable {v}"),
            SecretRef::File(p) => format!("file {}", p.display()),
        }
    }

    /// Reads the value now; surrounding whitespace (a trailing newline in a file) is dropped.
    pub fn resolve(&self, key: &str) -> Result<SecretString, ConfigError> {
        let fail = |reason: String| ConfigError::SecretSource {
            key: key.to_owned(),
            source_desc: self.describe(),
            reason,
        };
        let raw = match self {
            SecretRef::Env(var) => std::env::var(var).map_err(|_| fail("not set".into()))?,
            SecretRef::File(path) => {
                std::fs::read_to_string(path).map_err(|e| fail(e.kind().to_string()))?
            }
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(fail("empty".into()));
        }
        Ok(SecretString::new(trimmed.to_owned()))
    }
}

/// Names that end up in store paths and URLs: environments, manager ids, credential ids.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !s.starts_with('.')
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text)?;
        config.path = Some(path.to_owned());
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Syntax(e.message().to_owned() + &location(text, &e)))?;
        validate(raw)
    }

    pub fn manager(&self, id: &str) -> Option<&ManagerConfig> {
        self.managers.iter().find(|m| m.id == id)
    }

    /// A digest of what decides where credentials belong (managers' ids, types and prefixes,
    /// and the routing): instances sharing a database move credentials only while they all
    /// agree on it.
    pub fn routing_hash(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for m in &self.managers {
            h.update(format!("m\0{}\0{}\0{}\0", m.id, m.kind.as_str(), m.prefix));
        }
        h.update(format!("d\0{:?}\0", self.routing.default));
        let mut envs: Vec<_> = self.routing.environments.iter().collect();
        envs.sort();
        for (env, id) in envs {
            h.update(format!("e\0{env}\0{id}\0"));
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Settings of `next` that differ from `self` and take effect only after a restart: the
    /// listeners, the metadata database and keys, and the cache's shape.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        let (a, b) = (self, next);
        let mut out = Vec::new();
        let mut check = |changed: bool, key: &'static str| {
            if changed {
                out.push(key);
            }
        };
        check(a.server.socket != b.server.socket, "server.socket");
        check(
            a.server.socket_mode != b.server.socket_mode,
            "server.socket_mode",
        );
        check(
            a.server.socket_group != b.server.socket_group,
            "server.socket_group",
        );
        check(
            a.server
                .tcp
                .as_ref()
                .map(|t| (t.listen, &t.token_file, &t.token_header))
                != b.server
                    .tcp
                    .as_ref()
                    .map(|t| (t.listen, &t.token_file, &t.token_header)),
            "server.tcp",
        );
        check(
            a.server.request_timeout != b.server.request_timeout
                || a.server.header_read_timeout != b.server.header_read_timeout
                || a.server.max_body_bytes != b.server.max_body_bytes
                || a.server.max_concurrent_requests != b.server.max_concurrent_requests
                || a.server.shutdown_grace != b.server.shutdown_grace,
            "server limits",
        );
        check(
            a.metrics.as_ref().map(|m| m.listen) != b.metrics.as_ref().map(|m| m.listen),
            "metrics",
        );
        check(
            a.store.database != b.store.database
                || a.store.data_dir != b.store.data_dir
                || a.store.master_key_file != b.store.master_key_file
                || a.store.previous_master_key_files != b.store.previous_master_key_files,
            "store",
        );
        check(
            a.cache.ttl != b.cache.ttl
                || a.cache.capacity != b.cache.capacity
                || a.cache.stale_if_error != b.cache.stale_if_error,
            "cache",
        );
        check(
            a.log.level != b.log.level
                || a.log.format != b.log.format
                || a.log.audit != b.log.audit,
            "log",
        );
        check(
            a.oauth.max_concurrent != b.oauth.max_concurrent,
            "oauth.max_concurrent",
        );
        out
    }
}

fn location(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let content = text.lines().nth(line - 1).unwrap_or("").trim();
            format!(" (line {line}: `{content}`)")
        }
        None => String::new(),
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let data_dir = raw
        .store
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));

    let server = validate_server(raw.server, &data_dir)?;
    let metrics = match (raw.metrics.enabled, raw.metrics.listen) {
        (Some(false), _) => None,
        (_, Some(listen)) => Some(MetricsConfig { listen }),
        (_, None) => Some(MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }),
    };

    let database = match raw.store.url.as_deref() {
        None => DatabaseUrl::Sqlite(data_dir.join(DEFAULT_DATABASE_NAME)),
        Some(url) => {
            if let Some(path) = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
            {
                if path.is_empty() {
                    return Err(invalid("store.url", "sqlite URL has no path"));
                }
                DatabaseUrl::Sqlite(PathBuf::from(path))
            } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                if !cfg!(feature = "postgres") {
                    return Err(invalid(
                        "store.url",
                        "PostgreSQL metadata stores are not built into this binary (cargo feature `postgres`)",
                    ));
                }
                let parsed = url::Url::parse(url)
                    .map_err(|_| invalid("store.url", "not a valid postgres:// URL"))?;
                if parsed.password().is_some() || parsed.query_pairs().any(|(k, _)| k == "password")
                {
                    // Refused without quoting the URL: it holds a secret.
                    return Err(invalid(
                        "store.url",
                        "must not contain the password; give it as store.password = { env = \"VAR\" } or { file = \"/path\" }",
                    ));
                }
                DatabaseUrl::Postgres {
                    url: url.to_owned(),
                    password: raw.store.password.clone(),
                }
            } else {
                return Err(invalid("store.url", "expected sqlite:PATH"));
            }
        }
    };
    let store = StoreConfig {
        master_key_file: raw
            .store
            .master_key_file
            .unwrap_or_else(|| data_dir.join("master.key")),
        previous_master_key_files: raw.store.previous_master_key_files,
        generate_master_key: raw.store.generate_master_key.unwrap_or(false),
        journal_sweep_interval: raw
            .store
            .journal_sweep_interval
            .unwrap_or(Duration::from_secs(30)),
        journal_grace: raw.store.journal_grace,
        database,
        data_dir,
    };

    let cache = CacheConfig {
        ttl: raw.cache.ttl.unwrap_or(DEFAULT_CACHE_TTL),
        capacity: raw.cache.capacity.unwrap_or(DEFAULT_CACHE_CAPACITY),
        stale_if_error: raw.cache.stale_if_error.unwrap_or(DEFAULT_STALE_IF_ERROR),
    };
    if cache.ttl.is_zero() {
        return Err(invalid("cache.ttl", "must be greater than zero"));
    }
    if cache.capacity == 0 {
        return Err(invalid("cache.capacity", "must be greater than zero"));
    }

    let backend_timeout = raw.backends.timeout.unwrap_or(DEFAULT_BACKEND_TIMEOUT);
    if backend_timeout.is_zero() {
        return Err(invalid("backends.timeout", "must be greater than zero"));
    }

    let log = LogConfig {
        level: raw.log.level.unwrap_or_else(|| "info".into()),
        format: raw.log.format.unwrap_or(LogFormat::Text),
        audit: raw.log.audit.unwrap_or(true),
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(invalid(
            "log.level",
            "not a valid level or filter directive",
        ));
    }

    if store.journal_sweep_interval < Duration::from_millis(100) {
        return Err(invalid(
            "store.journal_sweep_interval",
            "must be at least 100ms",
        ));
    }
    let oauth = validate_oauth(raw.oauth)?;
    let reload = ReloadConfig {
        watch: raw.reload.watch.unwrap_or(false),
        watch_interval: raw.reload.watch_interval.unwrap_or(Duration::from_secs(5)),
    };
    if reload.watch_interval < Duration::from_millis(100) {
        return Err(invalid("reload.watch_interval", "must be at least 100ms"));
    }
    let migration = MigrationConfig {
        concurrency: raw.migration.concurrency.unwrap_or(4),
        rate: raw.migration.rate.unwrap_or(50),
        retry_min: raw.migration.retry_min.unwrap_or(Duration::from_secs(1)),
        retry_max: raw.migration.retry_max.unwrap_or(Duration::from_secs(300)),
    };
    if !(1..=256).contains(&migration.concurrency) {
        return Err(invalid(
            "migration.concurrency",
            "must be between 1 and 256",
        ));
    }
    if migration.retry_min.is_zero() || migration.retry_min > migration.retry_max {
        return Err(invalid(
            "migration.retry_min",
            "must be greater than zero and not above migration.retry_max",
        ));
    }
    let managers = validate_managers(raw.secrets_managers)?;
    let routing = validate_routing(raw.routing, &managers)?;
    let access = raw
        .access
        .into_iter()
        .enumerate()
        .map(|(i, a)| validate_access(i, a))
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Config {
        path: None,
        server,
        metrics,
        store,
        cache,
        backend_timeout,
        log,
        oauth,
        reload,
        migration,
        managers,
        routing,
        access,
    })
}

fn validate_oauth(raw: RawOAuth) -> Result<OAuthConfig, ConfigError> {
    let o = OAuthConfig {
        refresh_before: raw.refresh_before.unwrap_or(DEFAULT_REFRESH_BEFORE),
        jitter: raw.jitter.unwrap_or(DEFAULT_REFRESH_JITTER),
        max_concurrent: raw.max_concurrent.unwrap_or(DEFAULT_REFRESH_CONCURRENCY),
        timeout: raw.timeout.unwrap_or(DEFAULT_TOKEN_TIMEOUT),
        scan_interval: raw.scan_interval.unwrap_or(DEFAULT_REFRESH_SCAN_INTERVAL),
        retry_min: raw.retry_min.unwrap_or(DEFAULT_REFRESH_RETRY_MIN),
        retry_max: raw.retry_max.unwrap_or(DEFAULT_REFRESH_RETRY_MAX),
    };
    if o.refresh_before.is_zero() {
        return Err(invalid("oauth.refresh_before", "must be greater than zero"));
    }
    if !(1..=1024).contains(&o.max_concurrent) {
        return Err(invalid(
            "oauth.max_concurrent",
            "must be between 1 and 1024",
        ));
    }
    if o.timeout.is_zero() {
        return Err(invalid("oauth.timeout", "must be greater than zero"));
    }
    if o.scan_interval < Duration::from_millis(100) {
        return Err(invalid("oauth.scan_interval", "must be at least 100ms"));
    }
    if o.retry_min.is_zero() || o.retry_min > o.retry_max {
        return Err(invalid(
            "oauth.retry_min",
            "must be greater than zero and not above oauth.retry_max",
        ));
    }
    Ok(o)
}

fn validate_server(raw: RawServer, data_dir: &Path) -> Result<ServerConfig, ConfigError> {
    let socket = raw
        .socket
        .unwrap_or_else(|| data_dir.join(DEFAULT_SOCKET_NAME));
    // sun_path holds 108 bytes including the terminating NUL.
    if socket.as_os_str().len() > 107 {
        return Err(invalid("server.socket", "path is longer than 107 bytes"));
    }
    let socket_mode = match raw.socket_mode {
        None => DEFAULT_SOCKET_MODE,
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "server.socket_mode",
                    "expected an octal mode such as \"0660\"",
                )
            })?,
    };
    if socket_mode & 0o002 != 0 {
        return Err(invalid(
            "server.socket_mode",
            "world-writable sockets let any local user connect; use the group instead",
        ));
    }
    let positive = |key: &str, d: Option<Duration>, default: Duration| {
        let d = d.unwrap_or(default);
        if d.is_zero() {
            Err(invalid(key, "must be greater than zero"))
        } else {
            Ok(d)
        }
    };
    let tcp = match raw.tcp {
        None => None,
        Some(t) => {
            if !t.listen.ip().is_loopback() {
                return Err(ConfigError::NotLoopback {
                    key: "server.tcp.listen".into(),
                    addr: t.listen,
                });
            }
            let token_header = t
                .token_header
                .unwrap_or_else(|| DEFAULT_TOKEN_HEADER.into())
                .to_ascii_lowercase();
            if hyper::header::HeaderName::from_bytes(token_header.as_bytes()).is_err() {
                return Err(invalid(
                    "server.tcp.token_header",
                    "not a valid header name",
                ));
            }
            Some(TcpConfig {
                listen: t.listen,
                token_file: t.token_file,
                token_header,
            })
        }
    };
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes < 1024 {
        return Err(invalid("server.max_body_bytes", "must be at least 1024"));
    }
    let max_concurrent_requests = raw
        .max_concurrent_requests
        .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS);
    if max_concurrent_requests == 0 {
        return Err(invalid(
            "server.max_concurrent_requests",
            "must be greater than zero",
        ));
    }
    Ok(ServerConfig {
        socket,
        socket_mode,
        socket_group: raw.socket_group,
        request_timeout: positive(
            "server.request_timeout",
            raw.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
        )?,
        header_read_timeout: positive(
            "server.header_read_timeout",
            raw.header_read_timeout,
            DEFAULT_HEADER_READ_TIMEOUT,
        )?,
        max_body_bytes,
        max_concurrent_requests,
        shutdown_grace: raw.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        tcp,
    })
}

fn validate_managers(raw: Vec<RawManager>) -> Result<Vec<ManagerConfig>, ConfigError> {
    let mut out: Vec<ManagerConfig> = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("secrets_manager[{i}].{field}");
        let id = m.id.ok_or_else(|| invalid(key("id"), "missing"))?;
        if !is_valid_name(&id) {
            return Err(invalid(
                key("id"),
                "use letters, digits, `-`, `_` and `.` (at most 128)",
            ));
        }
        if id == LOCAL_MANAGER_ID {
            return Err(invalid(
                key("id"),
                "`local` is reserved for the local encrypted store",
            ));
        }
        if out.iter().any(|o| o.id == id) {
            return Err(invalid(
                key("id"),
                format!("`{id}` is used by two managers"),
            ));
        }
        let kind_name = m.kind.ok_or_else(|| invalid(key("type"), "missing"))?;
        let kind = ManagerKind::parse(&kind_name).ok_or_else(|| {
            invalid(
                key("type"),
                format!(
                    "unknown type `{kind_name}` (expected aws, azure, gcp, hashicorp or composio)"
                ),
            )
        })?;
        let prefix = m.prefix.unwrap_or_else(|| "credproxy/".into());
        if prefix.len() > 256 || prefix.chars().any(|c| c.is_control()) {
            return Err(invalid(key("prefix"), "at most 256 printable characters"));
        }
        let manager = ManagerConfig {
            id,
            kind,
            prefix,
            settings: m.settings,
        };
        crate::manager::validate_settings(&manager)?;
        out.push(manager);
    }
    Ok(out)
}

fn validate_routing(
    raw: RawRouting,
    managers: &[ManagerConfig],
) -> Result<RoutingConfig, ConfigError> {
    let check =
        |key: String, id: &str| -> Result<(), ConfigError> {
            if id == LOCAL_MANAGER_ID {
                return Ok(());
            }
            let m = managers.iter().find(|m| m.id == id).ok_or_else(|| {
                ConfigError::UnknownManager {
                    key: key.clone(),
                    id: id.to_owned(),
                }
            })?;
            if m.kind.is_read_only() {
                return Err(ConfigError::ReadOnlyTarget {
                    key,
                    id: id.to_owned(),
                });
            }
            Ok(())
        };
    if let Some(d) = &raw.default {
        check("routing.default".into(), d)?;
    }
    for (env, id) in &raw.environments {
        if !is_valid_name(env) {
            return Err(invalid(
                format!("routing.environments.{env}"),
                "not a valid environment name",
            ));
        }
        check(format!("routing.environments.{env}"), id)?;
    }
    Ok(RoutingConfig {
        default: raw.default,
        environments: raw.environments,
    })
}

fn validate_access(i: usize, raw: RawAccess) -> Result<AccessRule, ConfigError> {
    let key = |f: &str| format!("access[{i}].{f}");
    let mut principals = Vec::new();
    if let Some(uid) = raw.uid {
        principals.push(Principal::Uid(uid));
    }
    if let Some(user) = &raw.user {
        let uid = crate::sys::lookup_user(user)
            .map_err(|e| invalid(key("user"), e.to_string()))?
            .ok_or_else(|| invalid(key("user"), format!("no such user `{user}`")))?;
        principals.push(Principal::Uid(uid));
    }
    if let Some(gid) = raw.gid {
        principals.push(Principal::Gid(gid));
    }
    if let Some(group) = &raw.group {
        let gid = crate::sys::lookup_group(group)
            .map_err(|e| invalid(key("group"), e.to_string()))?
            .ok_or_else(|| invalid(key("group"), format!("no such group `{group}`")))?;
        principals.push(Principal::Gid(gid));
    }
    if raw.tcp == Some(true) {
        principals.push(Principal::Tcp);
    }
    if principals.len() != 1 {
        return Err(invalid(
            format!("access[{i}]"),
            "name exactly one of uid, user, gid, group or tcp = true",
        ));
    }
    if raw.environments.is_empty() {
        return Err(invalid(
            key("environments"),
            "list at least one environment, or \"*\"",
        ));
    }
    let environments = if raw.environments.iter().any(|e| e == "*") {
        None
    } else {
        for e in &raw.environments {
            if !is_valid_name(e) {
                return Err(invalid(
                    key("environments"),
                    format!("`{e}` is not a valid environment name"),
                ));
            }
        }
        Some(raw.environments)
    };
    Ok(AccessRule {
        principal: principals.remove(0),
        environments,
        write: raw.write,
        admin: raw.admin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(
            c.server.socket,
            PathBuf::from("/var/lib/credproxy/credproxy.sock")
        );
        assert_eq!(c.server.socket_mode, 0o660);
        assert_eq!(c.cache.ttl, DEFAULT_CACHE_TTL);
        assert!(c.managers.is_empty());
        assert_eq!(c.metrics.unwrap().listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        assert!(err("[cache]\nttll = \"5s\"").contains("ttll"));
        assert!(err("[serverr]").contains("serverr"));
        assert!(err("[[access]]\nuid = 1\nenvironments=[\"*\"]\nreed = true").contains("reed"));
    }

    #[test]
    fn bad_values_name_their_key() {
        assert!(err("[cache]\nttl = \"0s\"").contains("cache.ttl"));
        assert!(err("[server]\nsocket_mode = \"0666\"").contains("server.socket_mode"));
        assert!(err("[server]\nsocket_mode = \"9z\"").contains("server.socket_mode"));
        assert!(err("[cache]\nttl = \"soon\"").contains("ttl"));
        assert!(err("[store]\nurl = \"mysql://x\"").contains("store.url"));
    }

    #[test]
    fn tcp_listener_must_be_loopback() {
        let e = err("[server.tcp]\nlisten = \"0.0.0.0:2773\"\ntoken_file = \"/t\"");
        assert!(e.contains("not a loopback"), "{e}");
        Config::parse("[server.tcp]\nlisten = \"127.0.0.1:2773\"\ntoken_file = \"/t\"").unwrap();
        Config::parse("[server.tcp]\nlisten = \"[::1]:2773\"\ntoken_file = \"/t\"").unwrap();
    }

    #[test]
    fn routing_to_unknown_or_local_manager() {
        assert!(err("[routing]\ndefault = \"nope\"").contains("no secrets manager with id `nope`"));
        Config::parse("[routing]\ndefault = \"local\"").unwrap();
        let e = err("[routing.environments]\nProduction = \"ghost\"");
        assert!(e.contains("routing.environments.Production"), "{e}");
    }

    #[test]
    fn manager_types_are_checked() {
        let e = err("[[secrets_manager]]\nid = \"x\"\ntype = \"dropbox\"");
        assert!(e.contains("unknown type `dropbox`"), "{e}");
        let e = err("[[secrets_manager]]\nid = \"local\"\ntype = \"aws\"");
        assert!(e.contains("reserved"), "{e}");
    }

    #[test]
    fn access_rules_need_one_principal() {
        let e = err("[[access]]\nuid = 1\ngid = 2\nenvironments = [\"*\"]");
        assert!(e.contains("exactly one"), "{e}");
        let c = Config::parse("[[access]]\nuid = 1000\nenvironments = [\"Sandbox\"]\nwrite = true")
            .unwrap();
        assert_eq!(c.access[0].principal, Principal::Uid(1000));
        assert!(c.access[0].allows_environment("Sandbox"));
        assert!(!c.access[0].allows_environment("Production"));
    }

    #[test]
    fn secret_refs_resolve_from_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "from-file\n").unwrap();
        assert_eq!(
            SecretRef::File(p).resolve("k").unwrap().expose(),
            "from-file"
        );
        let e = SecretRef::Env("CREDPROXY_TEST_SURELY_UNSET".into())
            .resolve("k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not set"), "{e}");
    }
}
