//! Assembles the daemon from a validated config: metadata store, keys, stores, service,
//! listeners and background tasks; runs it until a shutdown signal; tears it down in order.
//! What can refuse the start is checked first, before anything is created (`start`).

mod start;
mod tasks;

pub use start::{load_keyring, preflight, read_tcp_token, Early};

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::access::Policy;
use crate::config::{Config, ConfigError, DatabaseUrl, LOCAL_MANAGER_ID};
use crate::control::ControlPlane;
use crate::lifecycle::sd_notify;
use crate::manager::local::{KeyError, Keyring, LocalManager};
use crate::manager::{self, Registry};
use crate::metadata::sqlite::SqliteMetadata;
use crate::metadata::{Metadata, MetadataError, Observed};
use crate::metrics::Metrics;
use crate::migrate::Migrator;
use crate::reload::Reloader;
use crate::server::{self, App, Listeners};
use crate::service::{Runtime, Service};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] MetadataError),
    #[error(transparent)]
    Socket(#[from] server::unix::SocketError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] crate::audit::OpenError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("master key file {path} does not exist (store.master_key_file){expected}. Restore it, or for a new installation create one with `credproxy keygen --out {path}` (or set store.generate_master_key = true)")]
    MasterKeyMissing { path: String, expected: String },
    #[error("master key file {path} does not exist, and the metadata database {database} holds data sealed under master key id {expected}, which a new key could not open: refusing to generate one (store.generate_master_key = true). Restore the key with id {expected} to {path}, or name its file in store.master_key_file or store.previous_master_key_files; to start from scratch on purpose, move the database away")]
    MasterKeyLost {
        path: String,
        database: String,
        expected: String,
    },
    #[error("the metadata database {database} holds data sealed under master key id {unknown}, which neither store.master_key_file {path} (key id {current}) nor store.previous_master_key_files holds: every such credential would fail. Put the key with id {unknown} back in {path}, or name its file in store.previous_master_key_files (then its data is re-wrapped under the current key)")]
    MasterKeyWrong {
        path: String,
        current: String,
        database: String,
        unknown: String,
    },
    #[error(
        "server.tcp.token_file {path} is readable by group or others (mode {mode:o}); chmod 600 it"
    )]
    TokenPermissions { path: String, mode: u32 },
}

/// The parts a daemon is made of, built but not yet serving. Tests swap stores in `registry`.
pub struct Parts {
    pub config: Arc<Config>,
    pub metadata: Arc<dyn Metadata>,
    pub keys: Arc<Keyring>,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
}

pub async fn open_metadata(config: &Config) -> Result<Arc<dyn Metadata>, StartError> {
    match &config.storage.database {
        DatabaseUrl::Sqlite(path) => Ok(Arc::new(SqliteMetadata::open(path)?)),
        #[cfg(feature = "postgres")]
        DatabaseUrl::Postgres { url, password } => {
            let url = match password {
                Some(p) => {
                    let password = p.resolve("store.password")?;
                    let mut u = url::Url::parse(url).map_err(|_| ConfigError::Invalid {
                        key: "store.url".into(),
                        reason: "not a valid postgres:// URL".into(),
                    })?;
                    let _ = u.set_password(Some(password.expose()));
                    crate::secret::SecretString::new(u.to_string())
                }
                None => crate::secret::SecretString::new(url.clone()),
            };
            Ok(Arc::new(
                crate::metadata::postgres::PostgresMetadata::open(
                    url.expose(),
                    &config.storage.fleet,
                )
                .await?,
            ))
        }
        #[cfg(not(feature = "postgres"))]
        DatabaseUrl::Postgres { .. } => Err(StartError::Config(ConfigError::Invalid {
            key: "store.url".into(),
            reason: "PostgreSQL is not built into this binary".into(),
        })),
    }
}

/// Builds everything that does not listen yet.
pub async fn build(config: Config) -> Result<Parts, StartError> {
    build_checked(crate::setup::check(config)?).await
}

/// [`build`] for a configuration `setup::check` has passed.
async fn build_checked(config: Config) -> Result<Parts, StartError> {
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.storage.data_dir).map_err(|e| StartError::DataDir {
        path: config.storage.data_dir.display().to_string(),
        source: e,
    })?;
    let metrics = Arc::new(Metrics::new());
    let metadata: Arc<dyn Metadata> = Arc::new(Observed::new(
        open_metadata(&config).await?,
        metrics.metadata_write_failures.clone(),
    ));
    let keys = Arc::new(load_keyring(&config, metadata.as_ref()).await?);
    let mut registry = Registry::new();
    registry.insert(
        LOCAL_MANAGER_ID,
        Arc::new(LocalManager::new(Arc::clone(&keys), Arc::clone(&metadata))),
    );
    for manager in &config.managers {
        let renewals = manager::renewing::counting(Arc::clone(&metrics), manager.id.clone());
        registry.insert(
            manager.id.clone(),
            manager::renewing::build(manager, renewals).await?,
        );
    }
    Ok(Parts {
        config,
        metadata,
        keys,
        registry,
        metrics,
    })
}

/// Turns parts into the service and the request handlers' state.
pub fn assemble(parts: Parts, socket_gid: u32) -> Result<Arc<App>, StartError> {
    let (owner_uid, _) = crate::sys::effective_ids();
    let policy = Policy::new(parts.config.access.clone(), owner_uid, socket_gid);
    let tcp_token = match &parts.config.server.tcp {
        Some(tcp) => Some(read_tcp_token(tcp)?),
        None => None,
    };
    let runtime = Runtime {
        topology: crate::routing::Topology::from_config(&parts.config),
        config: Arc::clone(&parts.config),
        registry: parts.registry,
        policy,
        control_version: -1,
    };
    let keys = Arc::clone(&parts.keys);
    let service = Arc::new(Service::new(
        runtime,
        parts.metadata,
        parts.metrics,
        parts.keys,
    ));
    let migrator = Arc::new(Migrator::new(Arc::clone(&service)));
    let control = Arc::new(ControlPlane::new(
        Arc::clone(&service),
        Arc::clone(&migrator),
        keys,
        owner_uid,
        socket_gid,
    ));
    let reloader = Arc::new(Reloader::new(Arc::clone(&control)));
    Ok(Arc::new(App::new(
        service, migrator, reloader, control, tcp_token,
    )?))
}

pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let unix = server::unix::bind(
        &config.server.socket,
        config.server.socket_mode,
        config.server.socket_group.as_ref(),
    )?;
    let tcp = match &config.server.tcp {
        Some(t) => Some(listen(t.listen).await?),
        None => None,
    };
    let metrics = match &config.metrics {
        Some(m) => Some(listen(m.listen).await?),
        None => None,
    };
    Ok(Listeners { unix, tcp, metrics })
}

pub(crate) async fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// How old a journal entry must be before the sweeper may act on it: older than any write
/// that could still be in flight (in this or another process sharing the database).
pub fn journal_grace(config: &Config) -> Duration {
    config.storage.journal_grace.unwrap_or(
        config.server.request_timeout + config.manager_timeout * 4 + Duration::from_secs(30),
    )
}

/// Runs the daemon until `shutdown` completes. Returns once the socket is removed.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let config = crate::setup::check(config)?;
    let early = preflight(&config).await?;
    let socket_path = config.server.socket.clone();
    let parts = build_checked(config).await?;
    let config = Arc::clone(&parts.config);
    let keys = Arc::clone(&parts.keys);
    let unix = server::unix::bind(
        &config.server.socket,
        config.server.socket_mode,
        config.server.socket_group.as_ref(),
    )?;
    let listeners = Listeners {
        unix,
        tcp: early.tcp,
        metrics: early.metrics,
    };
    let socket_gid =
        server::unix::socket_gid(&socket_path).unwrap_or(crate::sys::effective_ids().1);
    let app = assemble(parts, socket_gid)?;
    serve_app(app, listeners, keys, &socket_path, shutdown).await;
    Ok(())
}

/// Serves an assembled app: background tasks, readiness, drain, clean-up.
pub async fn serve_app(
    app: Arc<App>,
    listeners: Listeners,
    keys: Arc<Keyring>,
    socket_path: &Path,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let service = Arc::clone(&app.service);
    let grace = journal_grace(&service.runtime().config);
    tokio::pin!(shutdown);
    // Set when the shutdown signal came before the daemon was ready: it then stops at once.
    let mut stopped_early = false;
    if let Err(e) = service.heartbeat().await {
        tracing::warn!(error = %e, "could not register this instance in the metadata database");
    }
    service
        .metrics()
        .instance_info
        .with_label_values(&[service.instance_id()])
        .set(1);
    tasks.spawn(tasks::heartbeat_forever(
        Arc::clone(&service),
        stop_rx.clone(),
    ));
    let sweep_interval = service.runtime().config.storage.journal_sweep_interval;
    tasks.spawn(tasks::sweep_journal_forever(
        Arc::clone(&service),
        grace,
        sweep_interval,
        stop_rx.clone(),
    ));
    tasks.spawn(tasks::sweep_cache_forever(
        Arc::clone(&service),
        stop_rx.clone(),
    ));
    tasks.spawn(tasks::rotate_keys(Arc::clone(&service), keys));
    tasks.spawn(tasks::refresh_tokens_forever(
        Arc::clone(&service),
        stop_rx.clone(),
    ));
    tasks.spawn(tasks::renew_rotated_access_forever(
        Arc::clone(&service),
        stop_rx.clone(),
    ));
    // Both subscribed now, before the first apply: a change another instance makes from here
    // on reaches them.
    let control_changes = service.metadata().invalidations();
    {
        let (service, stop) = (Arc::clone(&service), stop_rx.clone());
        let changes = service.metadata().invalidations();
        tasks.spawn(async move { service.follow_invalidations(changes, stop).await });
    }
    // The managers and routing given through the API, before anything plans a move: without
    // them their credentials would look misplaced.
    // Retried rather than skipped: a migrator without them would move their credentials away.
    while let Err(e) = app
        .control
        .apply(
            (*app.service.runtime().config).clone(),
            crate::control::Mode::Start,
        )
        .await
    {
        tracing::error!(error = %e, "cannot load the control plane from the metadata database; retrying");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut shutdown => {
                stopped_early = true;
                break;
            }
        }
    }
    tasks.spawn(Arc::clone(&app.control).follow(control_changes, stop_rx.clone()));
    {
        let control = Arc::clone(&app.control);
        tasks.spawn(async move {
            match control.rewrap_access_details().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    managers = n,
                    "re-wrapped secrets managers' access details under the current master key"
                ),
                Err(e) => tracing::error!(error = %e, "master key rotation of secrets managers' access details incomplete"),
            }
        });
    }
    // Also how an interrupted migration resumes: the first pass plans from the database.
    tasks.spawn(Arc::clone(&app.migrator).run(stop_rx.clone()));
    // After the control plane too: a purge of an API manager's secret needs that manager.
    tasks.spawn(tasks::purge_forever(
        crate::purge::Purger::new(Arc::clone(&service)),
        service.purge_recorded(),
        stop_rx.clone(),
    ));
    tasks.spawn(tasks::deliver_events_forever(
        crate::events::webhook::Deliverer::new(Arc::clone(&service)),
        service.events_recorded(),
        Arc::clone(&service),
        stop_rx.clone(),
    ));
    // Installed before READY: a SIGHUP that arrives before its handler would kill the process.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => {
            tasks.spawn(tasks::reload_on_sighup(
                Arc::clone(&app.reloader),
                hup,
                stop_rx.clone(),
            ));
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGHUP handler; reload with POST /v1/reload")
        }
    }
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
        Ok(usr1) => {
            tasks.spawn(tasks::reopen_audit_on_sigusr1(
                Arc::clone(&app),
                usr1,
                stop_rx.clone(),
            ));
        }
        Err(e) => tracing::error!(error = %e, "cannot install the SIGUSR1 handler"),
    }
    let reload = service.runtime().config.reload.clone();
    tasks.spawn(tasks::reload_on_change(
        Arc::clone(&app.reloader),
        reload,
        stop_rx,
    ));

    if !stopped_early {
        app.set_ready(true);
        sd_notify("READY=1");
        tracing::info!(socket = %socket_path.display(), version = env!("CARGO_PKG_VERSION"), "credproxy ready");
    }

    server::run(listeners, Arc::clone(&app), async {
        if !stopped_early {
            shutdown.await;
        }
        sd_notify("STOPPING=1");
    })
    .await;

    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("background tasks did not stop within 5s; abandoning them");
        tasks.abort_all();
    }
    if let Err(e) = std::fs::remove_file(socket_path) {
        tracing::warn!(error = %e, "could not remove the socket file");
    }
    // After the drain: the last requests' lines are in the buffer by now.
    let closing = Arc::clone(&app);
    let _ = tokio::task::spawn_blocking(move || closing.close_audit()).await;
    tracing::info!("credproxy stopped");
}

#[cfg(test)]
mod tests;
