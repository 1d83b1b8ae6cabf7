//! The configuration file: its raw shape (`raw`), validation into the typed settings below
//! (`validate`), references to access details kept outside the file (`secret_ref`), which
//! settings a reload can change (`restart`), and every default (`defaults`).
//!
//! This module imports nothing of the crate but `secret`: what a manager type accepts, and
//! whether a user or group exists, is checked where the daemon is assembled (the `setup` module).

mod defaults;
mod events;
mod fleet;
mod limits;
mod log;
mod proxy;
mod proxy_url;
mod raw;
mod restart;
mod secret_ref;
mod server;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use defaults::*;
pub use events::{EventsConfig, Webhook};
pub use fleet::FleetConfig;
pub use limits::{key_words, CredentialLimits};
pub use log::{LogConfig, LogFormat};
pub use proxy::{is_reserved_header, read_ca, ProxyAuth, ProxyConfig, Upstream};
pub use secret_ref::SecretRef;

use crate::secret::SecretString;

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

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: Option<PathBuf>,
    pub server: ServerConfig,
    pub metrics: Option<MetricsConfig>,
    /// The `[store]` section: where credproxy keeps its state.
    pub storage: StorageConfig,
    pub cache: CacheConfig,
    /// `backends.timeout`: the deadline of one call to a secrets manager.
    pub manager_timeout: Duration,
    /// `backends.access_check_interval`: how often files holding managers' access details are
    /// checked for new content.
    pub access_check_interval: Duration,
    pub log: LogConfig,
    pub oauth: OAuthConfig,
    pub reload: ReloadConfig,
    pub migration: MigrationConfig,
    /// `[credentials]`: what one credential may hold.
    pub credentials: CredentialLimits,
    /// `[events]`: re-authorisation events and their webhooks.
    pub events: EventsConfig,
    /// `[proxy]`: where credentials may be used through the egress proxy.
    pub proxy: ProxyConfig,
    pub managers: Vec<ManagerConfig>,
    pub routing: RoutingConfig,
    pub access: Vec<AccessRule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub socket_group: Option<GroupSpec>,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_concurrent_requests: usize,
    /// Requests one caller (a uid on the socket; TCP callers together) may have in flight.
    pub max_requests_per_caller: usize,
    /// How long reading a request's body may take, from its headers on.
    pub body_read_timeout: Duration,
    pub shutdown_grace: Duration,
    pub tcp: Option<TcpConfig>,
    /// Threads serving requests and running the background tasks; `0`: one per core.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum GroupSpec {
    Id(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TcpConfig {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub token_header: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// `[store]`: the data directory, the metadata database and the master key.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageConfig {
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
    /// How this instance uses a shared PostgreSQL database.
    pub fleet: FleetConfig,
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

#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub ttl: Duration,
    pub capacity: u64,
    pub stale_if_error: Duration,
    /// The least time between two bypass reads (`Cache-Control: no-cache`) of one credential
    /// that go to its store; zero turns the limit off.
    pub bypass_interval: Duration,
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
#[derive(Debug, Clone, PartialEq)]
pub struct OAuthConfig {
    /// Refresh at most this long before `expires_at`, and at most a twentieth of the token's
    /// lifetime before it (`oauth::due_at_ms`).
    pub refresh_before: Duration,
    /// Up to this much earlier again (at most a fortieth of the lifetime), fixed per
    /// credential, so tokens that expire together are not refreshed together.
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

#[derive(Debug, Clone, PartialEq)]
pub struct ManagerConfig {
    pub id: String,
    /// The type's name (`aws`, `hashicorp`...). Whether it exists and is built into this
    /// binary, and what `settings` it takes, is for the `manager` module's descriptors to say.
    pub kind: String,
    pub prefix: String,
    /// Type-specific keys, checked against the type's descriptor where the daemon is assembled.
    pub settings: toml::Table,
    /// The values of secret keys given through the API (their keys in `settings` are
    /// `{ sealed = true }`); empty for managers of the file.
    pub auth: SealedAuth,
}

/// A manager's access details as given through the API, opened from their sealed form only to
/// build the manager. Equal when they are the same opened copy.
#[derive(Debug, Clone, Default)]
pub struct SealedAuth(pub Option<std::sync::Arc<crate::secret::SecretFields>>);

impl PartialEq for SealedAuth {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl ManagerConfig {
    /// The value of the secret key `key` (a dotted path such as `approle.role_id`), from where
    /// `reference` says.
    pub fn resolve(&self, key: &str, reference: &SecretRef) -> Result<SecretString, ConfigError> {
        let full = format!("secrets_manager.{}.{key}", self.id);
        match reference {
            SecretRef::Sealed => self
                .auth
                .0
                .as_ref()
                .and_then(|auth| auth.get(key))
                .cloned()
                .ok_or(ConfigError::SecretSource {
                    key: full,
                    source_desc: reference.describe(),
                    reason: "not set".into(),
                }),
            other => other.resolve(&full),
        }
    }
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
    /// A user name as written in the file; resolved to a `Uid` where the daemon is assembled,
    /// and never matching a caller until then.
    User(String),
    /// A group name, likewise resolved to a `Gid`.
    Group(String),
    /// A caller on the loopback TCP listener that presented the token.
    Tcp,
}

#[derive(Debug, Clone)]
pub struct AccessRule {
    pub principal: Principal,
    /// `None` means every environment (`"*"`).
    pub environments: Option<Vec<String>>,
    /// `None` means every workspace (`"*"`); a rule without `workspaces` grants `default`.
    pub workspaces: Option<Vec<String>>,
    /// May read credentials' secret values (`GET /v1/credentials/{id}`, batch reads).
    pub read: bool,
    /// May use credentials through the egress proxy without seeing them (`use` in the file).
    pub use_credentials: bool,
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

    pub fn allows_workspace(&self, workspace: &str) -> bool {
        match &self.workspaces {
            None => true,
            Some(list) => list.iter().any(|w| w == workspace),
        }
    }
}

/// Names that end up in secret names and URLs: environments, manager ids, credential ids.
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
        // The path names the key (`cache.ttl`), the span its place; neither quotes the value.
        let raw: raw::RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text))
            .map_err(|e| {
            let key = e.path().to_string();
            let e = e.into_inner();
            let message = crate::secret::without_values(e.message());
            let at = validate::location(text, &e);
            ConfigError::Syntax(match key.as_str() {
                "" | "." => format!("{message}{at}"),
                _ => format!("`{key}`: {message}{at}"),
            })
        })?;
        validate::validate(raw)
    }

    pub fn manager(&self, id: &str) -> Option<&ManagerConfig> {
        self.managers.iter().find(|m| m.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn syntax_and_type_errors_name_the_place_never_the_text() {
        let e = err("[server]\nsocket = \"/tmp/s\"\n[store]\nurl = \"sk_live_canary\" oops\n");
        assert!(e.contains("line 4, column"), "{e}");
        let e2 = err("[server]\nrequest_timeout = \"sk_live_canary\"\n");
        let e3 = err("[log]\nformat = \"sk_live_canary\"\n");
        for e in [e, e2, e3] {
            assert!(!e.contains("canary"), "{e}");
        }
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
    fn the_bypass_interval_defaults_to_a_second_and_zero_turns_the_limit_off() {
        assert_eq!(
            Config::parse("").unwrap().cache.bypass_interval,
            DEFAULT_BYPASS_INTERVAL
        );
        let off = Config::parse("[cache]\nbypass_interval = \"0s\"").unwrap();
        assert!(off.cache.bypass_interval.is_zero());
        assert!(err("[cache]\nbypass_interval = \"2h\"").contains("cache.bypass_interval"));
        assert!(err("[cache]\nbypass_interval = \"often\"").contains("bypass_interval"));
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
