//! Assembles the daemon from a validated config: metadata store, keys, stores, service,
//! listeners and background tasks; runs it until a shutdown signal; tears it down in order.

mod tasks;

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
use crate::manager::local::{KeyError, Keyring, LocalManager, MasterKey};
use crate::manager::{self, Registry};
use crate::metadata::sqlite::SqliteMetadata;
use crate::metadata::{Metadata, MetadataError};
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
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// The parts a daemon is made of, built but not yet serving. Tests swap stores in `registry`.
pub struct Parts {
    pub config: Arc<Config>,
    pub metadata: Arc<dyn Metadata>,
    pub keys: Arc<Keyring>,
    pub registry: Registry,
    pub metrics: Arc<Metrics>,
}

pub fn load_keyring(config: &Config) -> Result<Keyring, KeyError> {
    let path = &config.storage.master_key_file;
    if !path.exists() && config.storage.generate_master_key {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| KeyError::Write {
                path: parent.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        MasterKey::generate().write_new(path)?;
        tracing::warn!(path = %path.display(), "generated a new master key (store.generate_master_key = true); back it up: without it the local store cannot be read");
    }
    let current = MasterKey::load(path)?;
    let previous = config
        .storage
        .previous_master_key_files
        .iter()
        .map(|p| MasterKey::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Keyring::new(current, previous))
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
                crate::metadata::postgres::PostgresMetadata::open(url.expose()).await?,
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
    let config = Arc::new(crate::setup::check(config)?);
    std::fs::create_dir_all(&config.storage.data_dir).map_err(|e| StartError::DataDir {
        path: config.storage.data_dir.display().to_string(),
        source: e,
    })?;
    let metadata = open_metadata(&config).await?;
    let keys = Arc::new(load_keyring(&config)?);
    let mut registry = Registry::new();
    registry.insert(
        LOCAL_MANAGER_ID,
        Arc::new(LocalManager::new(Arc::clone(&keys), Arc::clone(&metadata))),
    );
    for manager in &config.managers {
        registry.insert(manager.id.clone(), manager::build(manager).await?);
    }
    Ok(Parts {
        config,
        metadata,
        keys,
        registry,
        metrics: Arc::new(Metrics::new()),
    })
}

/// Turns parts into the service and the request handlers' state.
pub fn assemble(parts: Parts, socket_gid: u32) -> Result<Arc<App>, StartError> {
    let (owner_uid, _) = crate::sys::effective_ids();
    let policy = Policy::new(parts.config.access.clone(), owner_uid, socket_gid);
    let tcp_token = match &parts.config.server.tcp {
        Some(tcp) => Some(
            crate::config::SecretRef::File(tcp.token_file.clone())
                .resolve("server.tcp.token_file")?,
        ),
        None => None,
    };
    let runtime = Runtime {
        topology: crate::routing::Topology::from_config(&parts.config),
        config: Arc::clone(&parts.config),
        registry: parts.registry,
        policy,
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
    )))
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

async fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, StartError> {
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
    warn_of_a_partial_user_namespace();
    let socket_path = config.server.socket.clone();
    let parts = build(config).await?;
    let config = Arc::clone(&parts.config);
    let keys = Arc::clone(&parts.keys);
    let listeners = bind(&config).await?;
    let socket_gid =
        server::unix::socket_gid(&socket_path).unwrap_or(crate::sys::effective_ids().1);
    let app = assemble(parts, socket_gid)?;
    serve_app(app, listeners, keys, &socket_path, shutdown).await;
    Ok(())
}

/// In a user namespace that does not map every id, callers outside it are reported as the
/// overflow ids: `setup::check` refuses rules naming such callers, and this says so at start.
fn warn_of_a_partial_user_namespace() {
    let ids = crate::setup::Ids::current();
    if ids.partial() {
        let show = |m: &Option<crate::sys::IdMap>| {
            m.as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "all".into())
        };
        tracing::warn!(
            uid_map = %show(&ids.uid_map),
            gid_map = %show(&ids.gid_map),
            "credproxy runs in a user namespace that does not map every id: callers outside it \
             are reported as uid {} / gid {} (and audited so) and match no access rule",
            ids.overflow_uid,
            ids.overflow_gid,
        );
    }
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
    if let Err(e) = service.heartbeat().await {
        tracing::warn!(error = %e, "could not register this instance in the metadata database");
    }
    service
        .metrics()
        .instance_info
        .with_label_values(&[service.instance_id()])
        .set(1);
    {
        let (service, mut stop) = (Arc::clone(&service), stop_rx.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(crate::service::HEARTBEAT_INTERVAL) => {}
                    _ = stop.changed() => {
                        service.leave_fleet().await;
                        return;
                    }
                }
                if let Err(e) = service.heartbeat().await {
                    tracing::debug!(error = %e, "instance heartbeat failed");
                }
            }
        });
    }
    let sweep_interval = service.runtime().config.storage.journal_sweep_interval;
    tasks.spawn(tasks::sweep_journal_forever(
        Arc::clone(&service),
        grace,
        sweep_interval,
        stop_rx.clone(),
    ));
    tasks.spawn(tasks::rotate_keys(Arc::clone(&service), keys));
    tasks.spawn(tasks::refresh_tokens_forever(
        Arc::clone(&service),
        stop_rx.clone(),
    ));
    {
        let (service, stop) = (Arc::clone(&service), stop_rx.clone());
        tasks.spawn(async move { service.follow_invalidations(stop).await });
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
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tasks.spawn(Arc::clone(&app.control).follow(stop_rx.clone()));
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
    let reload = service.runtime().config.reload.clone();
    tasks.spawn(tasks::reload_on_change(
        Arc::clone(&app.reloader),
        reload,
        stop_rx,
    ));

    app.set_ready(true);
    sd_notify("READY=1");
    tracing::info!(socket = %socket_path.display(), version = env!("CARGO_PKG_VERSION"), "credproxy ready");

    server::run(listeners, Arc::clone(&app), async {
        shutdown.await;
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
    tracing::info!("credproxy stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_data_directory_that_cannot_be_made_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let config = Config::parse(&format!(
            "[store]\ndata_dir = \"{}\"",
            file.join("data").display()
        ))
        .unwrap();
        let e = build(config).await.err().unwrap().to_string();
        assert!(e.contains("cannot create the data directory"), "{e}");
        assert!(!e.contains("listen"), "{e}");
    }
}
