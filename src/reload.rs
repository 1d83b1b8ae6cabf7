//! Configuration reload: re-read and validate the file, build its managers, and only then
//! put it in force; an invalid file leaves the running configuration untouched. Triggered by
//! SIGHUP, `POST /v1/reload`, or (with `reload.watch`) a change of the file. After a switch
//! the migrator re-plans where credentials belong.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::access::Policy;
use crate::config::{ConfigError, LOCAL_MANAGER_ID};
use crate::lifecycle::sd_notify_reloading;
use crate::manager::{self, Registry};
use crate::migrate::Migrator;
use crate::routing::{ManagerEntry, Topology};
use crate::service::{Runtime, Service};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the daemon was not started from a config file; nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("metadata database: {0}")]
    Metadata(String),
}

/// What a successful reload changed.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub managers_added: Vec<String>,
    pub managers_removed: Vec<String>,
    pub managers_changed: Vec<String>,
    /// Removed managers kept only to move their credentials out.
    pub managers_retired: Vec<String>,
    /// Changed settings that take effect only after a restart; their old values stay.
    pub restart_required: Vec<&'static str>,
    /// Credentials the new configuration puts elsewhere, moving in the background.
    pub moves_planned: usize,
}

pub struct Reloader {
    service: Arc<Service>,
    migrator: Arc<Migrator>,
    owner_uid: u32,
    socket_gid: u32,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        service: Arc<Service>,
        migrator: Arc<Migrator>,
        owner_uid: u32,
        socket_gid: u32,
    ) -> Self {
        Self {
            service,
            migrator,
            owner_uid,
            socket_gid,
            running: tokio::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> Option<PathBuf> {
        self.service.runtime().config.path.clone()
    }

    /// Reloads the file the daemon was started with. `trigger` is for the log.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, ReloadError> {
        let _one = self.running.lock().await;
        sd_notify_reloading();
        let result = self.reload_inner().await;
        crate::lifecycle::sd_notify("READY=1");
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.service
            .metrics()
            .config_reloads
            .with_label_values(&[outcome])
            .inc();
        match &result {
            Ok(report) => {
                tracing::info!(trigger, added = ?report.managers_added, removed = ?report.managers_removed,
                changed = ?report.managers_changed, restart_required = ?report.restart_required,
                moves_planned = report.moves_planned, "configuration reloaded")
            }
            Err(e) => {
                tracing::error!(trigger, error = %e, "configuration reload refused; the running configuration stays in force")
            }
        }
        result
    }

    async fn reload_inner(&self) -> Result<ReloadReport, ReloadError> {
        let current = self.service.runtime();
        let path = current.config.path.clone().ok_or(ReloadError::NoFile)?;
        let next = crate::setup::load(&path)?;

        // Everything is built before anything switches.
        let mut registry = Registry::new();
        if let Some(local) = current.registry.get(LOCAL_MANAGER_ID) {
            registry.insert(LOCAL_MANAGER_ID, Arc::clone(local));
        }
        for manager in &next.managers {
            registry.insert(manager.id.clone(), manager::build(manager).await?);
        }
        let mut topology = Topology::from_config(&next);
        let mut report = ReloadReport {
            managers_added: Vec::new(),
            managers_removed: Vec::new(),
            managers_changed: Vec::new(),
            managers_retired: Vec::new(),
            restart_required: current.config.restart_only_changes(&next),
            moves_planned: 0,
        };
        for m in &next.managers {
            match current.config.manager(&m.id) {
                None => report.managers_added.push(m.id.clone()),
                Some(old) if old != m => report.managers_changed.push(m.id.clone()),
                Some(_) => {}
            }
        }
        // A removed manager still holding credentials stays, read-only in effect (no route
        // leads to it), until the migrator has moved them out.
        for id in current.registry.ids() {
            if id == LOCAL_MANAGER_ID || next.manager(id).is_some() {
                continue;
            }
            if current.config.manager(id).is_some() {
                report.managers_removed.push(id.to_owned());
            }
            let in_use = self
                .service
                .metadata()
                .manager_in_use(id)
                .await
                .map_err(|e| ReloadError::Metadata(e.to_string()))?;
            if in_use {
                if let Some(old) = current.registry.get(id) {
                    registry.insert(id.to_owned(), Arc::clone(old));
                    if let Some(entry) = current.topology.manager(id) {
                        topology.insert(ManagerEntry {
                            retiring: true,
                            ..entry.clone()
                        });
                    }
                    report.managers_retired.push(id.to_owned());
                }
            }
        }
        let read_only = |id: &str| {
            registry
                .get(id)
                .is_some_and(|b| b.describe().capabilities.read_only)
        };
        let planned = crate::migrate::plan(self.service.metadata().as_ref(), &topology, &read_only)
            .await
            .map_err(|e| ReloadError::Metadata(e.to_string()))?;
        report.moves_planned = planned.len();

        let config = current.config.keep_restart_only(next);
        let policy = Policy::new(config.access.clone(), self.owner_uid, self.socket_gid);
        self.service.swap_runtime(Runtime {
            config: Arc::new(config),
            registry,
            policy,
            topology,
        });
        // Others must see the new configuration before anyone moves for it.
        if let Err(e) = self.service.heartbeat().await {
            tracing::warn!(error = %e, "could not record the new configuration for the fleet");
        }
        self.migrator.wake(&planned);
        Ok(report)
    }
}
