//! Turns the raw shape into typed settings: defaults applied, values range-checked, every
//! refusal naming its key. Only what the file alone can tell is checked here; a manager's
//! type-specific keys, and the user and group names of access rules, are checked where the
//! daemon is assembled (the `setup` module), since they need the rest of the crate.

use std::path::PathBuf;

use super::defaults::*;
use super::raw::*;
use super::*;

pub(super) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let postgres = raw
        .store
        .url
        .as_deref()
        .is_some_and(|u| u.starts_with("postgres://") || u.starts_with("postgresql://"));
    let fleet = super::fleet::validate(&raw.store, postgres)?;
    let data_dir = raw
        .store
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));

    let server = super::server::validate(raw.server, &data_dir)?;
    let metrics = match (raw.metrics.enabled, raw.metrics.listen) {
        (Some(false), _) => None,
        (_, Some(listen)) => Some(MetricsConfig { listen }),
        (_, None) => Some(MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN,
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
    let storage = StorageConfig {
        master_key_file: raw
            .store
            .master_key_file
            .unwrap_or_else(|| data_dir.join(DEFAULT_MASTER_KEY_NAME)),
        previous_master_key_files: raw.store.previous_master_key_files,
        generate_master_key: raw.store.generate_master_key.unwrap_or(false),
        journal_sweep_interval: raw
            .store
            .journal_sweep_interval
            .unwrap_or(DEFAULT_JOURNAL_SWEEP_INTERVAL),
        journal_grace: raw.store.journal_grace,
        fleet,
        database,
        data_dir,
    };

    let cache = CacheConfig {
        ttl: raw.cache.ttl.unwrap_or(DEFAULT_CACHE_TTL),
        capacity: raw.cache.capacity.unwrap_or(DEFAULT_CACHE_CAPACITY),
        stale_if_error: raw.cache.stale_if_error.unwrap_or(DEFAULT_STALE_IF_ERROR),
        bypass_interval: raw.cache.bypass_interval.unwrap_or(DEFAULT_BYPASS_INTERVAL),
    };
    if cache.ttl.is_zero() {
        return Err(invalid("cache.ttl", "must be greater than zero"));
    }
    if cache.capacity == 0 {
        return Err(invalid("cache.capacity", "must be greater than zero"));
    }
    if cache.bypass_interval > MAX_BYPASS_INTERVAL {
        return Err(invalid("cache.bypass_interval", "must be at most 1h"));
    }

    let manager_timeout = raw.backends.timeout.unwrap_or(DEFAULT_MANAGER_TIMEOUT);
    if manager_timeout.is_zero() {
        return Err(invalid("backends.timeout", "must be greater than zero"));
    }

    let log = super::log::validate(raw.log)?;

    if storage.journal_sweep_interval < MIN_PERIOD {
        return Err(invalid(
            "store.journal_sweep_interval",
            "must be at least 100ms",
        ));
    }
    let access_check_interval = raw
        .backends
        .access_check_interval
        .unwrap_or(DEFAULT_ACCESS_CHECK_INTERVAL);
    if access_check_interval < MIN_PERIOD {
        return Err(invalid(
            "backends.access_check_interval",
            "must be at least 100ms",
        ));
    }
    let oauth = validate_oauth(raw.oauth)?;
    let reload = ReloadConfig {
        watch: raw.reload.watch.unwrap_or(false),
        watch_interval: raw.reload.watch_interval.unwrap_or(DEFAULT_WATCH_INTERVAL),
    };
    if reload.watch_interval < MIN_PERIOD {
        return Err(invalid("reload.watch_interval", "must be at least 100ms"));
    }
    let migration = MigrationConfig {
        concurrency: raw
            .migration
            .concurrency
            .unwrap_or(DEFAULT_MIGRATION_CONCURRENCY),
        rate: raw.migration.rate.unwrap_or(DEFAULT_MIGRATION_RATE),
        retry_min: raw
            .migration
            .retry_min
            .unwrap_or(DEFAULT_MIGRATION_RETRY_MIN),
        retry_max: raw
            .migration
            .retry_max
            .unwrap_or(DEFAULT_MIGRATION_RETRY_MAX),
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
    let proxy = super::proxy::validate(raw.proxy, server.max_concurrent_requests)?;
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
        storage,
        cache,
        manager_timeout,
        access_check_interval,
        log,
        oauth,
        reload,
        migration,
        credentials: super::limits::validate(raw.credentials)?,
        events: super::events::validate(raw.events)?,
        proxy,
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
    if o.scan_interval < MIN_PERIOD {
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
        let kind = m.kind.ok_or_else(|| invalid(key("type"), "missing"))?;
        if kind.is_empty() {
            return Err(invalid(key("type"), "must not be empty"));
        }
        let prefix = m.prefix.unwrap_or_else(|| DEFAULT_PREFIX.into());
        if prefix.len() > 256 || prefix.chars().any(|c| c.is_control()) {
            return Err(invalid(key("prefix"), "at most 256 printable characters"));
        }
        let manager = ManagerConfig {
            id,
            kind,
            prefix,
            settings: m.settings,
            auth: SealedAuth::default(),
        };
        out.push(manager);
    }
    Ok(out)
}

fn validate_routing(
    raw: RawRouting,
    managers: &[ManagerConfig],
) -> Result<RoutingConfig, ConfigError> {
    let check = |key: String, id: &str| -> Result<(), ConfigError> {
        if id == LOCAL_MANAGER_ID {
            return Ok(());
        }
        if !managers.iter().any(|m| m.id == id) {
            return Err(ConfigError::UnknownManager {
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
    if let Some(user) = raw.user {
        principals.push(Principal::User(user));
    }
    if let Some(gid) = raw.gid {
        principals.push(Principal::Gid(gid));
    }
    if let Some(group) = raw.group {
        principals.push(Principal::Group(group));
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
    let workspaces = match raw.workspaces {
        None => Some(vec![DEFAULT_WORKSPACE.to_owned()]),
        Some(list) if list.is_empty() => {
            return Err(invalid(
                key("workspaces"),
                "list at least one workspace, or \"*\"",
            ))
        }
        Some(list) if list.iter().any(|w| w == "*") => None,
        Some(list) => {
            if let Some(bad) = list.iter().position(|w| !is_valid_name(w)) {
                return Err(invalid(
                    format!("access[{i}].workspaces[{bad}]"),
                    "not a valid workspace name",
                ));
            }
            Some(list)
        }
    };
    let use_credentials = raw.use_.unwrap_or(raw.read);
    if !(raw.read || use_credentials || raw.write || raw.admin) {
        return Err(invalid(
            format!("access[{i}]"),
            "grants nothing: read, use, write and admin are all false",
        ));
    }
    Ok(AccessRule {
        principal: principals.remove(0),
        environments,
        workspaces,
        read: raw.read,
        use_credentials,
        write: raw.write,
        admin: raw.admin,
    })
}

/// Where a syntax error is, as a line and column: never the line's text, which may hold an
/// inline token.
pub(super) fn location(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let mut start = span.start.min(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" (line {line}, column {column})")
        }
        None => String::new(),
    }
}
