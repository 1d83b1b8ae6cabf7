//! A workspace's routing through the API: `GET /v1/routing?workspace=` shows the chain in
//! force, `PUT /v1/routing` replaces it (checked like the file: only writable managers of the
//! workspace are targets), saves it, and the migrator moves what it puts elsewhere.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ControlError, ControlPlane};
use crate::access::{Action, Caller};
use crate::config::{is_valid_name, RoutingConfig, DEFAULT_WORKSPACE, LOCAL_MANAGER_ID};
use crate::metadata::RoutingRecord;

/// `PUT /v1/routing`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingBody {
    #[serde(default)]
    pub workspace: Option<String>,
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub environments: BTreeMap<String, String>,
}

/// A workspace's routing as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RoutingView {
    pub workspace: String,
    /// The default manager, `local` when none is set.
    pub default: String,
    pub environments: BTreeMap<String, String>,
    pub fallback: &'static str,
    /// `file` (the config file's `[routing]`, for the `default` workspace), `api`, or `none`.
    pub source: &'static str,
    /// After a `PUT`: credentials the new routing puts elsewhere, moving in the background.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moves_planned: Option<usize>,
}

impl ControlPlane {
    pub async fn get_routing(
        &self,
        caller: &Caller,
        workspace: Option<&str>,
    ) -> Result<RoutingView, ControlError> {
        let workspace = workspace.unwrap_or(DEFAULT_WORKSPACE);
        self.require(caller, Action::View, workspace)?;
        Ok(self.routing_view(workspace))
    }

    fn routing_view(&self, workspace: &str) -> RoutingView {
        let runtime = self.service.runtime();
        let routing = runtime.topology.routing(workspace);
        let file =
            workspace == DEFAULT_WORKSPACE && runtime.config.routing != RoutingConfig::default();
        RoutingView {
            workspace: workspace.to_owned(),
            default: routing
                .default
                .clone()
                .unwrap_or_else(|| LOCAL_MANAGER_ID.to_owned()),
            source: if file {
                "file"
            } else if routing == RoutingConfig::default() {
                "none"
            } else {
                "api"
            },
            environments: routing.environments,
            fallback: LOCAL_MANAGER_ID,
            moves_planned: None,
        }
    }

    pub async fn put_routing(
        &self,
        caller: &Caller,
        body: RoutingBody,
    ) -> Result<RoutingView, ControlError> {
        let workspace = super::workspace_or_default(body.workspace)?;
        self.require(caller, Action::Admin, &workspace)?;
        let runtime = self.service.runtime();
        if workspace == DEFAULT_WORKSPACE && runtime.config.routing != RoutingConfig::default() {
            return Err(ControlError::FileManaged(
                "the routing of workspace `default`".into(),
            ));
        }
        let check = |key: String, id: &str| -> Result<(), ControlError> {
            if id == LOCAL_MANAGER_ID {
                return Ok(());
            }
            match runtime.topology.manager(id) {
                Some(m) if m.workspace == workspace && !m.retiring && !m.read_only => Ok(()),
                Some(m) if m.workspace == workspace && m.read_only => Err(ControlError::invalid(
                    key,
                    "is a read-only manager: it can be pinned, never a routing target",
                )),
                Some(m) if m.workspace == workspace => {
                    Err(ControlError::invalid(key, "is being deleted"))
                }
                // Another workspace's manager is answered like one that does not exist.
                _ => Err(ControlError::invalid(
                    key,
                    "no secrets manager with that id in this workspace",
                )),
            }
        };
        if let Some(id) = &body.default {
            check("default".into(), id)?;
        }
        for (env, id) in &body.environments {
            check_environment_name(env)?;
            check(format!("environments.{env}"), id)?;
        }
        self.service
            .metadata()
            .routing_put(&RoutingRecord {
                workspace: workspace.clone(),
                default: body.default,
                environments: body.environments,
            })
            .await?;
        let applied = self.refresh().await?;
        tracing::info!(workspace = %workspace, moves_planned = applied.moves_planned, "routing changed");
        let mut view = self.routing_view(&workspace);
        view.moves_planned = Some(applied.moves_planned);
        Ok(view)
    }
}

/// An environment a routing body names must be a valid name.
pub(crate) fn check_environment_name(env: &str) -> Result<(), ControlError> {
    if is_valid_name(env) {
        Ok(())
    } else {
        Err(ControlError::invalid(
            "environments",
            "an environment name is not 1-128 letters, digits, `-`, `_` or `.`",
        ))
    }
}
