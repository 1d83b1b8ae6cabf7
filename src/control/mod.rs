//! The control plane: secrets managers and routing given through the API (kept in the
//! metadata database, sealed where secret, shared by a fleet), merged with those of the
//! config file into the runtime the service serves from. Every change (a reload, an API
//! call, another instance's change seen by polling the database's control version) goes
//! through `apply`: build what changed, plan the moves, swap, let the migrator move.

mod definition;
mod error;
mod managers;
mod retire;
mod routing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use error::ControlError;
pub use managers::{CreateManager, DeletePlan, ManagerView, PatchManager};
pub use routing::{RoutingBody, RoutingView};

use crate::access::Policy;
use crate::config::{Config, RoutingConfig, DEFAULT_WORKSPACE, LOCAL_MANAGER_ID};
use crate::manager::local::Keyring;
use crate::manager::{self, descriptor, Registry, SecretsManager};
use crate::metadata::{ManagerRecord, ManagerSource, ManagerState};
use crate::migrate::Migrator;
use crate::routing::{ManagerEntry, Source, Topology};
use crate::service::{Runtime, Service};

/// How often an instance asks the database whether the control plane changed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What an `apply` changed, for the reload report and the log.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub managers_added: Vec<String>,
    pub managers_removed: Vec<String>,
    pub managers_changed: Vec<String>,
    /// Removed from the file but holding credentials: kept (and recorded) until they are out.
    pub managers_retired: Vec<String>,
    pub restart_required: Vec<&'static str>,
    pub moves_planned: usize,
}

pub struct ControlPlane {
    service: Arc<Service>,
    migrator: Arc<Migrator>,
    keys: Arc<Keyring>,
    owner_uid: u32,
    socket_gid: u32,
    /// One apply at a time; holds the row version each API manager was built from, so an
    /// unchanged manager keeps its instance (and its Vault login) across applies.
    built: tokio::sync::Mutex<HashMap<String, i64>>,
    /// The control version the runtime in force was built from.
    seen: AtomicI64,
}

impl ControlPlane {
    pub fn new(
        service: Arc<Service>,
        migrator: Arc<Migrator>,
        keys: Arc<Keyring>,
        owner_uid: u32,
        socket_gid: u32,
    ) -> Self {
        Self {
            service,
            migrator,
            keys,
            owner_uid,
            socket_gid,
            built: tokio::sync::Mutex::new(HashMap::new()),
            seen: AtomicI64::new(-1),
        }
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Puts `next` (a checked config file) together with the database's control rows in force.
    /// Nothing switches unless every file manager builds; an API manager that cannot be built
    /// is left out (its credentials answer 503) and logged, so one customer's broken vault
    /// never stops the others.
    /// `rebuild_file_managers`: build the file's managers anew even when their settings did not
    /// change (a reload, which re-reads their access details).
    pub async fn apply(
        &self,
        next: Config,
        rebuild_file_managers: bool,
    ) -> Result<Applied, ControlError> {
        let mut built = self.built.lock().await;
        let current = self.service.runtime();
        let metadata = Arc::clone(self.service.metadata());
        let mut applied = Applied {
            restart_required: current.config.restart_only_changes(&next),
            ..Applied::default()
        };
        let mut topology = Topology::from_config(&next);
        let mut registry = Registry::new();
        if let Some(local) = current.registry.get(LOCAL_MANAGER_ID) {
            registry.insert(LOCAL_MANAGER_ID, Arc::clone(local));
        }
        for m in &next.managers {
            let old = current.config.manager(&m.id);
            let reuse = old
                .filter(|old| !rebuild_file_managers && *old == m)
                .and_then(|_| current.registry.get(&m.id))
                .cloned();
            let instance = match reuse {
                Some(instance) => instance,
                None => manager::build(m).await?,
            };
            registry.insert(m.id.clone(), instance);
            match old {
                None => applied.managers_added.push(m.id.clone()),
                Some(old) if old != m => applied.managers_changed.push(m.id.clone()),
                Some(_) => {}
            }
        }
        // File managers that left the file: recorded as retiring while they hold credentials,
        // so a restart can still read and move them.
        for entry in current.topology.managers() {
            if entry.source != Source::File || next.manager(&entry.id).is_some() {
                continue;
            }
            if current.config.manager(&entry.id).is_some() {
                applied.managers_removed.push(entry.id.clone());
            }
            if !entry.retiring && metadata.manager_in_use(&entry.id).await? {
                if let Some(old) = current.config.manager(&entry.id) {
                    self.record_retiring_file_manager(old).await?;
                }
            }
        }
        let version = metadata.control_version().await?;
        for row in metadata.managers().await? {
            if next.manager(&row.id).is_some() {
                if row.source == ManagerSource::File {
                    // Back in the file: the file's definition is the one in force.
                    metadata.manager_delete(&row.id).await?;
                    continue;
                }
                return Err(ControlError::Config(crate::config::ConfigError::Invalid {
                    key: format!("secrets_manager.{}.id", row.id),
                    reason: "is the id of a secrets manager created through the API".into(),
                }));
            }
            let retiring = row.state == ManagerState::Retiring;
            if retiring && row.source == ManagerSource::File {
                applied.managers_retired.push(row.id.clone());
            }
            topology.insert(ManagerEntry {
                id: row.id.clone(),
                workspace: row.workspace.clone(),
                kind: row.kind.clone(),
                prefix: row.prefix.clone(),
                source: match row.source {
                    ManagerSource::Api => Source::Api,
                    ManagerSource::File => Source::File,
                },
                read_only: descriptor::find(&row.kind).is_none_or(|d| d.read_only),
                retiring,
            });
            let reuse = (built.get(&row.id) == Some(&row.row_version))
                .then(|| current.registry.get(&row.id).cloned())
                .flatten();
            match reuse {
                Some(instance) => registry.insert(row.id.clone(), instance),
                None => match self.build_row(&row).await {
                    Ok(instance) => {
                        built.insert(row.id.clone(), row.row_version);
                        registry.insert(row.id.clone(), instance);
                    }
                    Err(e) => {
                        built.remove(&row.id);
                        tracing::error!(manager = %row.id, workspace = %row.workspace, error = %e,
                            "cannot build this secrets manager; its credentials answer 503 until it can be built");
                    }
                },
            }
        }
        let file_owns_default = next.routing != RoutingConfig::default();
        for r in metadata.routing_all().await? {
            if r.workspace == DEFAULT_WORKSPACE && file_owns_default {
                continue;
            }
            topology.set_routing(
                &r.workspace,
                RoutingConfig {
                    default: r.default,
                    environments: r.environments,
                },
            );
        }
        built.retain(|id, _| topology.manager(id).is_some());

        let read_only = |id: &str| {
            registry
                .get(id)
                .is_some_and(|m| m.describe().capabilities.read_only)
        };
        let planned = crate::migrate::plan(metadata.as_ref(), &topology, &read_only).await?;
        applied.moves_planned = planned.len();
        let config = current.config.keep_restart_only(next);
        let policy = Policy::new(config.access.clone(), self.owner_uid, self.socket_gid);
        self.service.swap_runtime(Runtime {
            config: Arc::new(config),
            registry,
            policy,
            topology,
        });
        self.seen.store(version, Ordering::Release);
        // Others must see the new routing before anyone moves for it.
        if let Err(e) = self.service.heartbeat().await {
            tracing::warn!(error = %e, "could not record the new configuration for the fleet");
        }
        self.migrator.wake(&planned);
        Ok(applied)
    }

    /// Applies the file in force again, with whatever the database holds now.
    pub async fn refresh(&self) -> Result<Applied, ControlError> {
        let config = (*self.service.runtime().config).clone();
        self.apply(config, false).await
    }

    /// Follows changes other instances make: polls the control version (and, on PostgreSQL,
    /// is woken by their notifications) and applies when it moved. Runs until `stop`.
    pub async fn follow(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut notified = self.service.metadata().invalidations();
        loop {
            let woken = async {
                match notified.as_mut() {
                    Some(rx) => loop {
                        match rx.recv().await {
                            Ok(crate::metadata::Invalidation::Credential(_)) => continue,
                            _ => return,
                        }
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = woken => {}
            }
            match self.service.metadata().control_version().await {
                Ok(v) if v != self.seen.load(Ordering::Acquire) => {
                    if let Err(e) = self.refresh().await {
                        tracing::warn!(error = %e, "could not apply the control plane's changes; retrying");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "cannot read the control version"),
            }
        }
    }

    async fn build_row(
        &self,
        row: &ManagerRecord,
    ) -> Result<Arc<dyn SecretsManager>, ControlError> {
        let auth = definition::open(&self.keys, row)?;
        let config = definition::manager_config(row, auth);
        Ok(manager::build(&config).await?)
    }

    /// Records a manager that left the file as retiring, with its access details resolved now
    /// and sealed, so it can be rebuilt after a restart until its credentials have moved.
    async fn record_retiring_file_manager(
        &self,
        manager: &crate::config::ManagerConfig,
    ) -> Result<(), ControlError> {
        let metadata = self.service.metadata();
        if metadata.manager_get(&manager.id).await?.is_some() {
            return Ok(());
        }
        let descriptor = descriptor::of(manager)?;
        let (settings, auth) = definition::from_file(descriptor, manager)?;
        let now = crate::time::now_unix();
        let record = ManagerRecord {
            id: manager.id.clone(),
            workspace: DEFAULT_WORKSPACE.to_owned(),
            name: manager.id.clone(),
            kind: manager.kind.clone(),
            prefix: manager.prefix.clone(),
            settings,
            auth_keys: auth.field_names().map(str::to_owned).collect(),
            auth: (!auth.is_empty())
                .then(|| definition::seal(&self.keys, DEFAULT_WORKSPACE, &manager.id, 1, &auth)),
            source: ManagerSource::File,
            state: ManagerState::Retiring,
            row_version: 1,
            created_at: now,
            updated_at: now,
        };
        match metadata.manager_insert(&record).await {
            Ok(()) | Err(crate::metadata::MetadataError::AlreadyExists) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
