//! A secrets manager's definition as the API gives it and the database keeps it: the body's
//! `settings` and `auth` checked against the type's descriptor (secret keys only in `auth`,
//! the others only in `settings`), the auth values sealed under the master key and bound to
//! the workspace, the manager id and the auth version, and the `ManagerConfig` a manager is
//! built from.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::managers::{check_name, check_prefix};
use super::ControlError;
use crate::config::{is_valid_name, ManagerConfig, SealedAuth, DEFAULT_PREFIX, LOCAL_MANAGER_ID};
use crate::manager::descriptor::{self, Descriptor};
use crate::manager::local::Keyring;
use crate::metadata::{ManagerRecord, SealedRecord};
use crate::secret::{SecretFields, SecretString};

/// The sealed access details of a manager are bound to this name, so a row's ciphertext
/// cannot be moved to another manager or workspace.
fn auth_name(workspace: &str, id: &str) -> String {
    format!("manager-auth/{workspace}/{id}")
}

/// Seals `auth` for manager `id` of `workspace` at `version`. The row stores the manager id
/// as the record's name; the binding to the workspace is in the ciphertext's associated data.
pub(super) fn seal(
    keys: &Keyring,
    workspace: &str,
    id: &str,
    version: i64,
    auth: &SecretFields,
) -> SealedRecord {
    let mut sealed = keys.seal_record(&auth_name(workspace, id), version, &auth.to_json());
    sealed.name = id.to_owned();
    sealed
}

/// The row's sealed access details with their data key wrapped by the current master key, if
/// another key wraps it now (master key rotation); the ciphertext is unchanged.
pub(super) fn rewrapped(
    keys: &Keyring,
    record: &ManagerRecord,
) -> Result<Option<SealedRecord>, ControlError> {
    let Some(sealed) = &record.auth else {
        return Ok(None);
    };
    if sealed.key_id == keys.current_id() {
        return Ok(None);
    }
    let mut bound = sealed.clone();
    bound.name = auth_name(&record.workspace, &record.id);
    let mut rewrapped = keys
        .rewrap(&bound)
        .map_err(|e| ControlError::Sealed(format!("manager {}: {e}", record.id)))?;
    rewrapped.name = record.id.clone();
    Ok(Some(rewrapped))
}

/// Opens a row's sealed access details.
pub(super) fn open(keys: &Keyring, record: &ManagerRecord) -> Result<SecretFields, ControlError> {
    let Some(sealed) = &record.auth else {
        return Ok(SecretFields::new());
    };
    let mut sealed = sealed.clone();
    sealed.name = auth_name(&record.workspace, &record.id);
    let plain = keys
        .open_record(&sealed)
        .map_err(|e| ControlError::Sealed(format!("manager {}: {e}", record.id)))?;
    SecretFields::from_json(&plain).map_err(|_| {
        ControlError::Sealed(format!("manager {}: access details unreadable", record.id))
    })
}

/// A create body's parts that need no runtime to check, checked.
pub(crate) struct CheckedManager {
    pub id: String,
    pub descriptor: &'static Descriptor,
    pub prefix: String,
    pub auth: SecretFields,
}

/// The checks `create_manager` makes once the caller may create in the workspace: the id
/// (a fresh one when absent), the name, the type, the prefix, the settings and the access
/// details.
pub(crate) fn check_create(
    id: Option<String>,
    name: &str,
    kind: &str,
    prefix: Option<String>,
    settings: &Map<String, Value>,
    auth: Map<String, Value>,
) -> Result<CheckedManager, ControlError> {
    let id = match id {
        Some(id) => id,
        None => format!("m-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
    };
    if !is_valid_name(&id) {
        return Err(ControlError::invalid(
            "id",
            "1-128 letters, digits, `-`, `_` or `.`",
        ));
    }
    if id == LOCAL_MANAGER_ID {
        return Err(ControlError::invalid(
            "id",
            "`local` is the local encrypted store",
        ));
    }
    check_name(name)?;
    let descriptor = descriptor::find(kind).ok_or_else(|| {
        let built: Vec<&str> = descriptor::TYPES.iter().map(|d| d.kind).collect();
        ControlError::invalid(
            "type",
            format!("unknown type (this binary has: {})", built.join(", ")),
        )
    })?;
    let prefix = prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
    check_prefix(&prefix)?;
    check_settings(descriptor, settings)?;
    let auth = check_auth(descriptor, auth)?;
    Ok(CheckedManager {
        id,
        descriptor,
        prefix,
        auth,
    })
}

/// Flattens nested objects to dotted keys (`{"approle": {"role_id": ..}}` → `approle.role_id`).
fn flatten(prefix: &str, object: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
    for (k, v) in object {
        let key = format!("{prefix}{k}");
        match v {
            Value::Object(inner) => flatten(&format!("{key}."), inner, out),
            other => out.push((key, other.clone())),
        }
    }
}

/// Checks a body's `settings` (non-secret keys) against the descriptor. Errors name the key,
/// never a value.
pub(crate) fn check_settings(
    descriptor: &Descriptor,
    settings: &Map<String, Value>,
) -> Result<(), ControlError> {
    let mut flat = Vec::new();
    flatten("", settings, &mut flat);
    for (key, value) in &flat {
        let Some(spec) = descriptor.key(key) else {
            return Err(unknown(descriptor, &format!("settings.{key}")));
        };
        if spec.secret {
            return Err(ControlError::invalid(
                format!("settings.{key}"),
                "is an access detail: give it in `auth`, which is stored sealed",
            ));
        }
        if key == "prefix" {
            return Err(ControlError::invalid(
                "settings.prefix",
                "give the prefix as the top-level `prefix`",
            ));
        }
        if matches!(value, Value::Null | Value::Array(_)) {
            return Err(ControlError::invalid(
                format!("settings.{key}"),
                "expected a string, number or boolean",
            ));
        }
    }
    Ok(())
}

/// Checks a body's `auth` (secret keys, string values) and returns it as secret fields under
/// dotted names.
pub(crate) fn check_auth(
    descriptor: &Descriptor,
    auth: Map<String, Value>,
) -> Result<SecretFields, ControlError> {
    let mut flat = Vec::new();
    flatten("", &auth, &mut flat);
    let mut out = SecretFields::new();
    for (key, value) in flat {
        let Some(spec) = descriptor.key(&key) else {
            return Err(unknown(descriptor, &format!("auth.{key}")));
        };
        if !spec.secret {
            return Err(ControlError::invalid(
                format!("auth.{key}"),
                "is not an access detail: give it in `settings`",
            ));
        }
        let Value::String(s) = value else {
            return Err(ControlError::invalid(
                format!("auth.{key}"),
                "expected a string",
            ));
        };
        if s.trim().is_empty() {
            return Err(ControlError::invalid(format!("auth.{key}"), "is empty"));
        }
        out.insert(key, SecretString::new(s));
    }
    Ok(out)
}

fn unknown(descriptor: &Descriptor, key: &str) -> ControlError {
    let accepted: Vec<&str> = descriptor
        .keys()
        .filter(|k| k.name != "prefix")
        .map(|k| k.name)
        .collect();
    ControlError::invalid(
        key,
        format!(
            "unknown key; a `{}` manager accepts {}",
            descriptor.kind,
            accepted.join(", ")
        ),
    )
}

/// The settings a manager is built from: the row's non-secret settings, each secret key set
/// as `{ sealed = true }`, and the opened values beside them.
pub(super) fn manager_config(record: &ManagerRecord, auth: SecretFields) -> ManagerConfig {
    let mut settings = match json_to_toml(Value::Object(record.settings.clone())) {
        toml::Value::Table(t) => t,
        _ => toml::Table::new(),
    };
    for key in auth.field_names() {
        let mut table = &mut settings;
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().unwrap_or(key);
        for part in parts {
            let entry = table
                .entry(part.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            table = entry.as_table_mut().expect("a table was just put there");
        }
        let mut sealed = toml::Table::new();
        sealed.insert("sealed".into(), toml::Value::Boolean(true));
        table.insert(leaf.to_owned(), toml::Value::Table(sealed));
    }
    ManagerConfig {
        id: record.id.clone(),
        kind: record.kind.clone(),
        prefix: record.prefix.clone(),
        settings,
        auth: SealedAuth(Some(Arc::new(auth))),
    }
}

fn json_to_toml(v: Value) -> toml::Value {
    match v {
        Value::Bool(b) => toml::Value::Boolean(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => toml::Value::String(s),
        Value::Array(a) => toml::Value::Array(a.into_iter().map(json_to_toml).collect()),
        Value::Object(o) => {
            toml::Value::Table(o.into_iter().map(|(k, v)| (k, json_to_toml(v))).collect())
        }
        Value::Null => toml::Value::String(String::new()),
    }
}

/// The non-secret settings of a file manager as JSON, and its secret keys resolved now (from
/// their environment variables or files): what a retiring file manager is kept as.
pub(super) fn from_file(
    descriptor: &Descriptor,
    manager: &ManagerConfig,
) -> Result<(Map<String, Value>, SecretFields), ControlError> {
    let mut settings = Map::new();
    let mut auth = SecretFields::new();
    let mut flat = Vec::new();
    let as_json = serde_json::to_value(&manager.settings).unwrap_or(Value::Null);
    if let Value::Object(object) = as_json {
        flatten("", &object, &mut flat);
    }
    // A secret reference flattens to `key.env` / `key.file`: resolve it under its own key.
    let mut secret_keys: Vec<&str> = Vec::new();
    for (key, value) in flat {
        let base = key
            .strip_suffix(".env")
            .or_else(|| key.strip_suffix(".file"))
            .unwrap_or(&key);
        match descriptor.key(base) {
            Some(spec) if spec.secret => {
                if !secret_keys.contains(&spec.name) {
                    secret_keys.push(spec.name);
                }
            }
            _ => insert_dotted(&mut settings, &key, value),
        }
    }
    for key in secret_keys {
        let reference = lookup(&manager.settings, key)
            .and_then(|v| v.clone().try_into::<crate::config::SecretRef>().ok())
            .ok_or_else(|| ControlError::invalid(key, "not a secret reference"))?;
        auth.insert(key, manager.resolve(key, &reference)?);
    }
    Ok((settings, auth))
}

fn lookup<'a>(table: &'a toml::Table, dotted: &str) -> Option<&'a toml::Value> {
    let mut parts = dotted.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

fn insert_dotted(object: &mut Map<String, Value>, dotted: &str, value: Value) {
    match dotted.split_once('.') {
        None => {
            object.insert(dotted.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = object
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = entry {
                insert_dotted(inner, rest, value);
            }
        }
    }
}
