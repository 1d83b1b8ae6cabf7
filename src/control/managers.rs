//! Secrets managers through the API: create (checked, built and probed before anything is
//! saved), list and show (which access details are set, never their values), patch (rename,
//! rotate the access details, change settings that do not move secrets), and delete after a
//! dry run that says where every credential will go.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::definition::{self, CheckedManager};
use super::{workspace_or_default, ControlError, ControlPlane};
use crate::access::{Action, Caller, Scope};
use crate::config::LOCAL_MANAGER_ID;
use crate::manager::descriptor;
use crate::metadata::{ManagerRecord, ManagerSource, ManagerState};
use crate::routing::Source;

/// `POST /v1/secretsmanagers`. Deliberately not `Debug`: `auth` holds access details.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateManager {
    #[serde(default)]
    pub workspace: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub settings: Map<String, Value>,
    #[serde(default, deserialize_with = "auth_object")]
    pub auth: Map<String, Value>,
}

/// `PATCH /v1/secretsmanagers/{id}`: every part optional. Not `Debug`, like `CreateManager`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchManager {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub settings: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "optional_auth_object")]
    pub auth: Option<Map<String, Value>>,
}

/// `auth` must be an object. serde's own type error quotes what it got, and here that is an
/// access detail (`"auth": "<token>"`), so any other shape gets a fixed message.
fn auth_object<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    match Value::deserialize(d)? {
        Value::Object(map) => Ok(map),
        _ => Err(serde::de::Error::custom(
            "`auth` must be an object of access details",
        )),
    }
}

fn optional_auth_object<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Map<String, Value>>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(map)),
        _ => Err(serde::de::Error::custom(
            "`auth` must be an object of access details",
        )),
    }
}

/// A manager as the API shows it: which access details are set, never their values.
#[derive(Debug, Clone, Serialize)]
pub struct ManagerView {
    pub id: String,
    pub workspace: Option<String>,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub prefix: String,
    pub settings: Map<String, Value>,
    pub auth_keys_set: Vec<String>,
    /// `api`, `file`, or `builtin` (the local encrypted store).
    pub source: &'static str,
    pub read_only: bool,
    pub compare_and_swap: bool,
    /// `active`, or `retiring` (deleted; its credentials are moving out).
    pub state: &'static str,
    /// Whether this instance could build it (an API manager whose access details stopped
    /// working is listed but not loaded).
    pub loaded: bool,
    pub credentials: u64,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
}

/// What deleting a manager would do (`?dry_run=true`), and does.
#[derive(Debug, Clone, Serialize)]
pub struct DeletePlan {
    pub id: String,
    pub credentials: u64,
    /// How many go to which fallback.
    pub moves: Vec<PlannedTarget>,
    /// Of those, pinned to this manager: they fall back along the chain too.
    pub pinned: u64,
    /// Held by a read-only manager (Composio connected accounts): they cannot move.
    pub cannot_move: u64,
    /// What happens to those: `refused` (the delete is refused while they exist) or
    /// `deleted` (their references are deleted, with `?credentials=delete`).
    pub cannot_move_action: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlannedTarget {
    pub target: String,
    pub reason: crate::routing::RouteReason,
    pub count: u64,
}

const MAX_NAME: usize = 128;

impl ControlPlane {
    pub(super) fn require(
        &self,
        caller: &Caller,
        action: Action,
        workspace: &str,
    ) -> Result<(), ControlError> {
        // A workspace the caller cannot see is answered like one without such a manager.
        if !self
            .service
            .allows(caller, Action::View, Scope::workspace(workspace))
        {
            return Err(ControlError::NotFound);
        }
        if !self
            .service
            .allows(caller, action, Scope::workspace(workspace))
        {
            return Err(ControlError::Forbidden);
        }
        Ok(())
    }

    pub async fn create_manager(
        &self,
        caller: &Caller,
        body: CreateManager,
    ) -> Result<ManagerView, ControlError> {
        let workspace = workspace_or_default(body.workspace)?;
        if !self
            .service
            .allows(caller, Action::Admin, Scope::workspace(&workspace))
        {
            return Err(ControlError::Forbidden);
        }
        let CheckedManager {
            id,
            descriptor,
            prefix,
            auth,
        } = definition::check_create(
            body.id,
            &body.name,
            &body.kind,
            body.prefix,
            &body.settings,
            body.auth,
        )?;
        let runtime = self.service.runtime();
        if runtime.topology.manager(&id).is_some()
            || self.service.metadata().manager_get(&id).await?.is_some()
        {
            return Err(ControlError::Conflict(format!(
                "a secrets manager with id `{id}` exists"
            )));
        }
        let now = crate::time::now_unix();
        let mut record = ManagerRecord {
            id: id.clone(),
            workspace: workspace.clone(),
            name: body.name,
            kind: descriptor.kind.to_owned(),
            prefix,
            settings: body.settings,
            auth_keys: auth.field_names().map(str::to_owned).collect(),
            auth: None,
            source: ManagerSource::Api,
            state: ManagerState::Active,
            row_version: 1,
            created_at: now,
            updated_at: now,
        };
        self.probe(&record, &auth).await?;
        record.auth =
            (!auth.is_empty()).then(|| definition::seal(&self.keys, &workspace, &id, 1, &auth));
        match self.service.metadata().manager_insert(&record).await {
            Err(crate::metadata::MetadataError::AlreadyExists) => {
                return Err(ControlError::Conflict(format!(
                    "a secrets manager with id `{id}` exists"
                )))
            }
            other => other?,
        }
        tracing::info!(manager = %id, workspace = %workspace, kind = %record.kind, "secrets manager created");
        self.refresh().await?;
        self.view(&id).await
    }

    /// Builds the manager from `record` with `auth` and makes one authenticated call.
    pub(super) async fn probe(
        &self,
        record: &ManagerRecord,
        auth: &crate::secret::SecretFields,
    ) -> Result<(), ControlError> {
        let config = definition::manager_config(record, auth.clone());
        let manager = match crate::manager::build(&config).await {
            Ok(m) => m,
            // Missing or conflicting keys, bad URLs: the request's fault.
            Err(crate::config::ConfigError::Invalid { key, reason }) => {
                let key = key
                    .strip_prefix(&format!("secrets_manager.{}.", record.id))
                    .unwrap_or(&key)
                    .to_owned();
                return Err(ControlError::invalid(key, reason));
            }
            Err(e) => return Err(ControlError::Probe(e.to_string())),
        };
        let timeout = self.service.runtime().config.manager_timeout;
        match tokio::time::timeout(timeout, manager.probe()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ControlError::Probe(e.to_string())),
            Err(_) => Err(ControlError::Probe(
                "the secrets manager did not answer in time".into(),
            )),
        }
    }

    pub async fn list_managers(
        &self,
        caller: &Caller,
        workspace: Option<&str>,
    ) -> Result<Vec<ManagerView>, ControlError> {
        let mut views = vec![local_view()];
        let counts = self.service.metadata().count_by_manager().await?;
        // The local store is every workspace's: its count is for those who see them all.
        if self
            .service
            .allows(caller, Action::View, Scope::EVERY_WORKSPACE)
        {
            views[0].credentials = counts.get(LOCAL_MANAGER_ID).copied().unwrap_or(0);
        }
        let runtime = self.service.runtime();
        let rows = self.service.metadata().managers().await?;
        for entry in runtime.topology.managers() {
            if workspace.is_some_and(|w| w != entry.workspace)
                || !self
                    .service
                    .allows(caller, Action::View, Scope::workspace(&entry.workspace))
            {
                continue;
            }
            let row = rows.iter().find(|r| r.id == entry.id);
            views.push(self.view_of(&runtime, entry, row, &counts));
        }
        Ok(views)
    }

    pub async fn get_manager(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<ManagerView, ControlError> {
        if id == LOCAL_MANAGER_ID {
            let mut view = local_view();
            if self
                .service
                .allows(caller, Action::View, Scope::EVERY_WORKSPACE)
            {
                view.credentials = self
                    .service
                    .metadata()
                    .count_by_manager()
                    .await?
                    .get(id)
                    .copied()
                    .unwrap_or(0);
            }
            return Ok(view);
        }
        let workspace = self.workspace_of(id).await?;
        self.require(caller, Action::View, &workspace)?;
        self.view(id).await
    }

    pub(super) async fn workspace_of(&self, id: &str) -> Result<String, ControlError> {
        if let Some(entry) = self.service.runtime().topology.manager(id) {
            return Ok(entry.workspace.clone());
        }
        match self.service.metadata().manager_get(id).await? {
            Some(row) => Ok(row.workspace),
            None => Err(ControlError::NotFound),
        }
    }

    pub(super) async fn view(&self, id: &str) -> Result<ManagerView, ControlError> {
        let runtime = self.service.runtime();
        let entry = runtime.topology.manager(id).ok_or(ControlError::NotFound)?;
        let row = self.service.metadata().manager_get(id).await?;
        let counts = self.service.metadata().count_by_manager().await?;
        Ok(self.view_of(&runtime, entry, row.as_ref(), &counts))
    }

    fn view_of(
        &self,
        runtime: &crate::service::Runtime,
        entry: &crate::routing::ManagerEntry,
        row: Option<&ManagerRecord>,
        counts: &std::collections::HashMap<String, u64>,
    ) -> ManagerView {
        let instance = runtime.registry.get(&entry.id);
        let caps = instance.map(|m| m.describe().capabilities);
        let (name, settings, auth_keys_set, created_at, updated_at) = match row {
            Some(r) => (
                r.name.clone(),
                r.settings.clone(),
                r.auth_keys.clone(),
                Some(crate::time::rfc3339(r.created_at)),
                Some(crate::time::rfc3339(r.updated_at)),
            ),
            None => {
                let (settings, auth_keys) = runtime
                    .config
                    .manager(&entry.id)
                    .map(file_settings)
                    .unwrap_or_default();
                (entry.id.clone(), settings, auth_keys, None, None)
            }
        };
        ManagerView {
            id: entry.id.clone(),
            workspace: Some(entry.workspace.clone()),
            name,
            kind: entry.kind.clone(),
            prefix: entry.prefix.clone(),
            settings,
            auth_keys_set,
            source: match entry.source {
                Source::Api => "api",
                Source::File => "file",
            },
            read_only: caps.map_or(entry.read_only, |c| c.read_only),
            compare_and_swap: caps.is_some_and(|c| c.compare_and_swap),
            state: if entry.retiring { "retiring" } else { "active" },
            loaded: instance.is_some(),
            credentials: counts.get(&entry.id).copied().unwrap_or(0),
            created_at,
            updated_at,
        }
    }
}

/// The non-secret settings of a file manager, and which of its secret keys are set.
fn file_settings(manager: &crate::config::ManagerConfig) -> (Map<String, Value>, Vec<String>) {
    let Some(descriptor) = descriptor::find(&manager.kind) else {
        return Default::default();
    };
    let mut settings = Map::new();
    let mut secret = Vec::new();
    for (key, value) in &manager.settings {
        match descriptor.key(key) {
            Some(k) if k.secret => secret.push(key.clone()),
            _ if value.is_table() => {
                // A nested table (AppRole): its secret keys are listed, the rest shown.
                let mut inner = Map::new();
                for (k, v) in value.as_table().into_iter().flatten() {
                    let dotted = format!("{key}.{k}");
                    if descriptor.key(&dotted).is_some_and(|d| d.secret) {
                        secret.push(dotted);
                    } else {
                        inner.insert(k.clone(), serde_json::to_value(v).unwrap_or(Value::Null));
                    }
                }
                settings.insert(key.clone(), Value::Object(inner));
            }
            _ => {
                settings.insert(
                    key.clone(),
                    serde_json::to_value(value).unwrap_or(Value::Null),
                );
            }
        }
    }
    (settings, secret)
}

fn local_view() -> ManagerView {
    ManagerView {
        id: LOCAL_MANAGER_ID.to_owned(),
        workspace: None,
        name: "local encrypted store".to_owned(),
        kind: "local".to_owned(),
        prefix: String::new(),
        settings: Map::new(),
        auth_keys_set: Vec::new(),
        source: "builtin",
        read_only: false,
        compare_and_swap: true,
        state: "active",
        loaded: true,
        credentials: 0,
        created_at: None,
        updated_at: None,
    }
}

pub(crate) fn check_name(name: &str) -> Result<(), ControlError> {
    if name.trim().is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(ControlError::invalid("name", "1-128 printable characters"));
    }
    Ok(())
}

pub(super) fn check_prefix(prefix: &str) -> Result<(), ControlError> {
    if prefix.len() > 256 || prefix.chars().any(char::is_control) {
        return Err(ControlError::invalid(
            "prefix",
            "at most 256 printable characters",
        ));
    }
    Ok(())
}
