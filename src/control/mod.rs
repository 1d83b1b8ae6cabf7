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

pub(crate) use definition::{check_auth, check_create, check_settings, CheckedManager};
pub use error::ControlError;
pub(crate) use managers::check_name;
pub use managers::{CreateManager, DeletePlan, ManagerView, PatchManager};
pub(crate) use routing::check_environment_name;
pub use routing::{RoutingBody, RoutingView};

use crate::access::Policy;
use crate::config::{Config, RoutingConfig, DEFAULT_WORKSPACE, LOCAL_MANAGER_ID};
use crate::manager::local::Keyring;
use crate::manager::{self, descriptor, Registry, SecretsManager};
use crate::metadata::{ManagerRecord, ManagerSource, ManagerState, MetadataError};
use crate::migrate::Migrator;
use crate::routing::{ManagerEntry, Source, Topology};
use crate::service::{Runtime, Service};

/// How often an instance asks the database whether the control plane changed, when nothing
/// tells it (SQLite).
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often it asks anyway when the change feed tells it (PostgreSQL): a safety net that a
/// fleet of 1,000 pays 33 reads a second for.
pub const FEED_RECHECK: Duration = Duration::from_secs(30);

/// Why a runtime is being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// At start: the file's managers were just built; record their definitions.
    Start,
    /// A reload: build the file's managers anew (their access details are read again, which
    /// is what an operator reloads for) and record their definitions.
    Reload,
    /// A change through the API, or one another instance made: reuse what did not change and
    /// leave the file's records alone (instances may run different files during a rollout).
    Refresh,
}

/// What an `apply` changed: the reload report, and the log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Applied {
    pub managers_added: Vec<String>,
    pub managers_removed: Vec<String>,
    pub managers_changed: Vec<String>,
    /// Removed from the file but holding credentials: kept (and recorded) until they are out.
    pub managers_retired: Vec<String>,
    /// Changed settings that take effect only after a restart; their old values stay.
    pub restart_required: Vec<&'static str>,
    /// Credentials the configuration now puts elsewhere, moving in the background.
    pub moves_planned: usize,
}

/// The workspace a request names, `default` when it names none.
pub(crate) fn workspace_or_default(given: Option<String>) -> Result<String, ControlError> {
    let workspace = given.unwrap_or_else(|| DEFAULT_WORKSPACE.to_owned());
    if !crate::config::is_valid_name(&workspace) {
        return Err(ControlError::invalid(
            "workspace",
            "1-128 letters, digits, `-`, `_` or `.`",
        ));
    }
    Ok(workspace)
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
    pub async fn apply(&self, next: Config, mode: Mode) -> Result<Applied, ControlError> {
        let mut built = self.built.lock().await;
        self.apply_locked(&mut built, next, mode).await
    }

    /// Holds off every apply, as one in progress does (for tests of what waits behind it).
    #[cfg(test)]
    pub(crate) async fn hold_applies(&self) -> tokio::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.built.lock().await
    }

    /// [`apply`](Self::apply) with its lock held: one apply at a time, each building on the
    /// runtime the last one left.
    async fn apply_locked(
        &self,
        built: &mut HashMap<String, i64>,
        next: Config,
        mode: Mode,
    ) -> Result<Applied, ControlError> {
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
                .filter(|old| mode != Mode::Reload && *old == m)
                .and_then(|_| current.registry.get(&m.id))
                .cloned();
            let instance = match reuse {
                Some(instance) => instance,
                None => manager::renewing::build(m, self.renewals(m.id.clone())).await?,
            };
            registry.insert(m.id.clone(), instance);
            match old {
                None => applied.managers_added.push(m.id.clone()),
                Some(old) if old != m => applied.managers_changed.push(m.id.clone()),
                Some(_) => {}
            }
        }
        for entry in current.topology.managers() {
            if entry.source == Source::File
                && next.manager(&entry.id).is_none()
                && current.config.manager(&entry.id).is_some()
            {
                applied.managers_removed.push(entry.id.clone());
            }
        }
        if mode != Mode::Refresh {
            self.record_file_managers(&next).await?;
        }
        let version = metadata.control_version().await?;
        for row in metadata.managers().await? {
            if next.manager(&row.id).is_some() {
                if row.source == ManagerSource::Api {
                    return Err(ControlError::Config(crate::config::ConfigError::Invalid {
                        key: format!("secrets_manager.{}.id", row.id),
                        reason: "is the id of a secrets manager created through the API".into(),
                    }));
                }
                // The file's definition is the one in force here.
                continue;
            }
            // A file manager that is not in this file retires here, whatever its record says:
            // it may still be in another instance's file during a rollout, and moves wait
            // until the instances agree.
            let retiring = row.state == ManagerState::Retiring || row.source == ManagerSource::File;
            if row.source == ManagerSource::File
                && current
                    .topology
                    .manager(&row.id)
                    .is_some_and(|m| !m.retiring)
            {
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
            control_version: version,
        });
        self.seen.store(version, Ordering::Release);
        // Others must see a new file's routing before anyone moves for it (a control-plane
        // change alone writes nothing here).
        if let Err(e) = self.service.record_epoch().await {
            tracing::warn!(error = %e, "could not record the new configuration for the fleet");
        }
        self.migrator.wake(&planned);
        Ok(applied)
    }

    /// Applies the file in force again, with whatever the database holds now.
    pub async fn refresh(&self) -> Result<Applied, ControlError> {
        // The file in force is read once the lock is held: read before, while a reload of a
        // new file was applying, it would be the old file, applied again over the new one
        // (the reload undone, its moves never made).
        let mut built = self.built.lock().await;
        let config = (*self.service.runtime().config).clone();
        self.apply_locked(&mut built, config, Mode::Refresh).await
    }

    /// Follows changes other instances make: woken by the change feed on PostgreSQL (and
    /// polling the control version now and then), polling it every second on SQLite; applies
    /// when it moved. Runs until `stop`.
    /// `notified` is subscribed by the caller before its first apply, so a change another
    /// instance makes meanwhile is not missed.
    pub async fn follow(
        self: Arc<Self>,
        mut notified: Option<tokio::sync::broadcast::Receiver<crate::metadata::Invalidation>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let recheck = if notified.is_some() {
            FEED_RECHECK
        } else {
            POLL_INTERVAL
        };
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
                _ = tokio::time::sleep(recheck) => {}
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
        let label = match row.source {
            ManagerSource::Api => format!("api:{}", row.kind),
            ManagerSource::File => row.id.clone(),
        };
        Ok(manager::renewing::build(&config, self.renewals(label)).await?)
    }

    fn renewals(&self, label: String) -> manager::renewing::Observer {
        manager::renewing::counting(Arc::clone(self.service.metrics()), label)
    }

    /// Records the file's managers (settings, and access details resolved now and sealed), so
    /// that one which leaves the file while holding credentials can still be built after a
    /// restart, and moved out. A recorded file manager that is no longer in the file retires
    /// while it holds credentials, and its record goes otherwise.
    async fn record_file_managers(&self, next: &Config) -> Result<(), ControlError> {
        let metadata = self.service.metadata();
        let rows = metadata.managers().await?;
        let now = crate::time::now_unix();
        for manager in &next.managers {
            let descriptor = descriptor::of(manager)?;
            let (settings, auth) = definition::from_file(descriptor, manager)?;
            let existing = rows.iter().find(|r| r.id == manager.id);
            if let Some(row) = existing {
                if row.source == ManagerSource::Api {
                    continue; // refused by the caller
                }
                let same = row.state == ManagerState::Active
                    && row.kind == manager.kind
                    && row.prefix == manager.prefix
                    && row.settings == settings
                    && definition::open(&self.keys, row)
                        .is_ok_and(|old| old.to_json() == auth.to_json());
                if same {
                    continue;
                }
            }
            let version = existing.map_or(0, |r| r.row_version);
            let auth_version = existing
                .and_then(|r| r.auth.as_ref())
                .map_or(0, |a| a.version)
                + 1;
            let record = ManagerRecord {
                id: manager.id.clone(),
                workspace: DEFAULT_WORKSPACE.to_owned(),
                name: manager.id.clone(),
                kind: manager.kind.clone(),
                prefix: manager.prefix.clone(),
                settings,
                auth_keys: auth.field_names().map(str::to_owned).collect(),
                auth: (!auth.is_empty()).then(|| {
                    definition::seal(
                        &self.keys,
                        DEFAULT_WORKSPACE,
                        &manager.id,
                        auth_version,
                        &auth,
                    )
                }),
                source: ManagerSource::File,
                state: ManagerState::Active,
                row_version: version + 1,
                created_at: existing.map_or(now, |r| r.created_at),
                updated_at: now,
            };
            let written = match existing {
                Some(row) => metadata.manager_update(&record, row.row_version).await,
                None => metadata.manager_insert(&record).await,
            };
            match written {
                // Another instance recorded it at the same moment; its record serves as well.
                Ok(()) | Err(MetadataError::Conflict | MetadataError::AlreadyExists) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for row in rows.iter().filter(|r| {
            r.source == ManagerSource::File
                && r.state == ManagerState::Active
                && next.manager(&r.id).is_none()
        }) {
            if metadata.manager_in_use(&row.id).await? {
                let mut retiring = row.clone();
                retiring.state = ManagerState::Retiring;
                retiring.row_version += 1;
                retiring.updated_at = now;
                match metadata.manager_update(&retiring, row.row_version).await {
                    Ok(()) | Err(MetadataError::Conflict) => {}
                    Err(e) => return Err(e.into()),
                }
            } else {
                metadata.manager_delete(&row.id).await?;
            }
        }
        Ok(())
    }

    /// Re-wraps every manager's sealed access details under the current master key (after a
    /// master key rotation), so the previous key can be retired. Returns how many it re-wrapped;
    /// a row another instance changed meanwhile is left for the next start.
    pub async fn rewrap_access_details(&self) -> Result<usize, ControlError> {
        let metadata = self.service.metadata();
        let mut done = 0;
        for row in metadata.managers().await? {
            let Some(auth) = definition::rewrapped(&self.keys, &row)? else {
                continue;
            };
            let mut next = row.clone();
            next.auth = Some(auth);
            next.row_version += 1;
            next.updated_at = crate::time::now_unix();
            match metadata.manager_update(&next, row.row_version).await {
                Ok(()) => done += 1,
                Err(MetadataError::Conflict) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(done)
    }
}
