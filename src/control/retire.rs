//! Changing and deleting a secrets manager given through the API: a patch may rename it,
//! rotate its access details (probed before they are swapped in) or change settings that do not
//! decide where its secrets are; a delete is planned first (`?dry_run=true` answers the plan),
//! then the manager retires: routing stops naming it, its credentials move to their fallback
//! in the background, and it disappears once empty.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::managers::{DeletePlan, ManagerView, PatchManager, PlannedTarget};
use super::{definition, ControlError, ControlPlane};
use crate::access::{Action, Caller};
use crate::manager::descriptor;
use crate::metadata::{ManagerRecord, ManagerSource, ManagerState, MetadataError};
use crate::routing::{ManagerEntry, RouteReason, Topology};

/// Credentials read per page while planning a delete.
const PAGE: usize = 500;

impl ControlPlane {
    /// The row of an API manager the caller may administer; file managers are changed in the
    /// file.
    async fn api_row(&self, caller: &Caller, id: &str) -> Result<ManagerRecord, ControlError> {
        let workspace = self.workspace_of(id).await?;
        self.require(caller, Action::Admin, &workspace)?;
        match self.service.metadata().manager_get(id).await? {
            Some(row) if row.source == ManagerSource::Api => Ok(row),
            Some(_) | None => Err(ControlError::FileManaged(format!("secrets manager `{id}`"))),
        }
    }

    pub async fn patch_manager(
        &self,
        caller: &Caller,
        id: &str,
        body: PatchManager,
    ) -> Result<ManagerView, ControlError> {
        let row = self.api_row(caller, id).await?;
        if row.state == ManagerState::Retiring {
            return Err(ControlError::Conflict(format!(
                "secrets manager `{id}` is being deleted"
            )));
        }
        let descriptor = descriptor::find(&row.kind)
            .ok_or_else(|| ControlError::invalid("type", "not built into this binary"))?;
        let mut next = row.clone();
        if let Some(name) = body.name {
            super::managers::check_name(&name)?;
            next.name = name;
        }
        let mut reprobe = false;
        if let Some(settings) = body.settings {
            definition::check_settings(descriptor, &settings)?;
            for (key, value) in flat(&settings) {
                let locates = descriptor.key(&key).is_some_and(|k| k.locates);
                if locates && flat(&row.settings).get(&key) != Some(&value) {
                    return Err(ControlError::invalid(
                        format!("settings.{key}"),
                        "decides where this manager's secrets are, so its credentials would \
                         become unreadable; create a new manager and route to it instead, \
                         which moves them",
                    ));
                }
            }
            merge(&mut next.settings, settings);
            reprobe = true;
        }
        let mut auth = definition::open(&self.keys, &row)?;
        let mut auth_changed = false;
        if let Some(given) = body.auth {
            auth.merge(definition::check_auth(descriptor, given)?);
            auth_changed = true;
            reprobe = true;
        }
        if reprobe {
            self.probe(&next, &auth).await?;
        }
        if auth_changed {
            let version = row.auth.as_ref().map_or(0, |a| a.version) + 1;
            next.auth_keys = auth.field_names().map(str::to_owned).collect();
            next.auth = Some(definition::seal(
                &self.keys,
                &row.workspace,
                id,
                version,
                &auth,
            ));
        }
        next.row_version += 1;
        next.updated_at = crate::time::now_unix();
        match self
            .service
            .metadata()
            .manager_update(&next, row.row_version)
            .await
        {
            Err(MetadataError::Conflict) => {
                return Err(ControlError::Conflict(format!(
                    "secrets manager `{id}` was changed concurrently; read it again"
                )))
            }
            other => other?,
        }
        tracing::info!(manager = %id, access_details_rotated = auth_changed, "secrets manager changed");
        self.refresh().await?;
        self.view(id).await
    }

    /// Plans (`dry_run`) or starts the deletion of an API manager. `delete_unmovable`: the
    /// caller agrees that credentials which cannot move (a read-only manager's) are deleted.
    pub async fn delete_manager(
        &self,
        caller: &Caller,
        id: &str,
        dry_run: bool,
        delete_unmovable: bool,
    ) -> Result<DeletePlan, ControlError> {
        let row = self.api_row(caller, id).await?;
        let mut plan = self.plan_delete(&row).await?;
        if delete_unmovable {
            plan.cannot_move_action = "deleted";
        }
        if dry_run {
            return Ok(plan);
        }
        if plan.cannot_move > 0 && !delete_unmovable {
            return Err(ControlError::HasCredentials {
                count: plan.cannot_move,
            });
        }
        if row.state == ManagerState::Active {
            let mut next = row.clone();
            next.state = ManagerState::Retiring;
            next.row_version += 1;
            next.updated_at = crate::time::now_unix();
            match self
                .service
                .metadata()
                .manager_retire(&next, row.row_version)
                .await
            {
                Err(MetadataError::Conflict) => {
                    return Err(ControlError::Conflict(format!(
                        "secrets manager `{id}` was changed concurrently; read it again"
                    )))
                }
                other => other?,
            }
        }
        if plan.cannot_move > 0 {
            for credential in self.credentials_in(id).await? {
                self.service
                    .delete(caller, &credential.id)
                    .await
                    .map_err(|e| {
                        ControlError::Conflict(format!(
                            "credential {} could not be deleted: {e}",
                            credential.id
                        ))
                    })?;
            }
        }
        tracing::info!(manager = %id, credentials = plan.credentials, "secrets manager retiring; its credentials move in the background");
        self.refresh().await?;
        Ok(plan)
    }

    async fn credentials_in(
        &self,
        id: &str,
    ) -> Result<Vec<crate::metadata::CredentialRecord>, ControlError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .service
                .metadata()
                .list_credentials(after.as_deref(), PAGE)
                .await?;
            let Some(last) = page.last() else {
                return Ok(out);
            };
            after = Some(last.id.clone());
            out.extend(page.into_iter().filter(|c| c.location.manager_id == id));
        }
    }

    /// Where each credential of `row` goes once it retires: the same routing chain the
    /// migrator will follow, over the topology as it will be.
    async fn plan_delete(&self, row: &ManagerRecord) -> Result<DeletePlan, ControlError> {
        let runtime = self.service.runtime();
        let topology = without(&runtime.topology, &row.id);
        let read_only = descriptor::find(&row.kind).is_none_or(|d| d.read_only);
        let mut plan = DeletePlan {
            id: row.id.clone(),
            credentials: 0,
            moves: Vec::new(),
            pinned: 0,
            cannot_move: 0,
            cannot_move_action: "refused",
        };
        let mut targets: BTreeMap<(String, RouteReason), u64> = BTreeMap::new();
        for c in self.credentials_in(&row.id).await? {
            plan.credentials += 1;
            if c.pinned_manager.as_deref() == Some(row.id.as_str()) {
                plan.pinned += 1;
            }
            if read_only {
                plan.cannot_move += 1;
                continue;
            }
            let route = topology.route(&c.workspace, &c.environment, c.pinned_manager.as_deref());
            *targets.entry((route.manager_id, route.reason)).or_default() += 1;
        }
        plan.moves = targets
            .into_iter()
            .map(|((target, reason), count)| PlannedTarget {
                target,
                reason,
                count,
            })
            .collect();
        Ok(plan)
    }
}

/// `topology` once manager `id` retires: it is no target, and no routing names it.
fn without(topology: &Topology, id: &str) -> Topology {
    let mut next = topology.clone();
    if let Some(entry) = topology.manager(id) {
        next.insert(ManagerEntry {
            retiring: true,
            ..entry.clone()
        });
    }
    let routed: Vec<(String, crate::config::RoutingConfig)> = topology
        .routed_workspaces()
        .map(|(w, r)| (w.to_owned(), r.clone()))
        .collect();
    for (workspace, mut routing) in routed {
        if routing.default.as_deref() == Some(id) {
            routing.default = None;
        }
        routing.environments.retain(|_, m| m != id);
        next.set_routing(&workspace, routing);
    }
    next
}

fn flat(object: &Map<String, Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    fn walk(prefix: &str, object: &Map<String, Value>, out: &mut BTreeMap<String, Value>) {
        for (k, v) in object {
            match v {
                Value::Object(inner) => walk(&format!("{prefix}{k}."), inner, out),
                other => {
                    out.insert(format!("{prefix}{k}"), other.clone());
                }
            }
        }
    }
    walk("", object, &mut out);
    out
}

fn merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Value::Object(inner)), Value::Object(more)) => merge(inner, more),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}
