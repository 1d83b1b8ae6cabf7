//! Configuration reload: re-read and validate the file, build its managers, and only then
//! put it in force; an invalid file leaves the running configuration untouched. Triggered by
//! SIGHUP, `POST /v1/reload`, or (with `reload.watch`) a change of the file. After a switch
//! the migrator re-plans where credentials belong.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::ConfigError;
use crate::control::{ControlError, ControlPlane};
use crate::lifecycle::sd_notify_reloading;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the daemon was not started from a config file; nothing to reload")]
    NoFile,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Control(ControlError),
}

impl From<ControlError> for ReloadError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Config(e) => ReloadError::Config(e),
            other => ReloadError::Control(other),
        }
    }
}

/// What a successful reload changed.
pub type ReloadReport = crate::control::Applied;

pub struct Reloader {
    control: Arc<ControlPlane>,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(control: Arc<ControlPlane>) -> Self {
        Self {
            control,
            running: tokio::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> Option<PathBuf> {
        self.control.service().runtime().config.path.clone()
    }

    /// Reloads the file the daemon was started with. `trigger` is for the log.
    pub async fn reload(&self, trigger: &'static str) -> Result<ReloadReport, ReloadError> {
        let _one = self.running.lock().await;
        sd_notify_reloading();
        let result = self.reload_inner().await;
        crate::lifecycle::sd_notify("READY=1");
        let outcome = if result.is_ok() { "success" } else { "failure" };
        self.control
            .service()
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
        let path = self.path().ok_or(ReloadError::NoFile)?;
        let next = crate::setup::load(&path)?;
        // The file's managers are built anew: their access details (a rotated token file,
        // a new environment) are read again, which is what an operator reloads for.
        let applied = self
            .control
            .apply(next, crate::control::Mode::Reload)
            .await?;
        Ok(ReloadReport {
            managers_added: applied.managers_added,
            managers_removed: applied.managers_removed,
            managers_changed: applied.managers_changed,
            managers_retired: applied.managers_retired,
            restart_required: applied.restart_required,
            moves_planned: applied.moves_planned,
        })
    }
}
