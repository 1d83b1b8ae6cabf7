//! What each secrets-manager type is, said once: its capabilities, the keys it accepts (which
//! of them are secret, their labels and instructions), and how to check and build one. Config
//! validation, error messages, `GET /v1/secretsmanagers/instructions` and the capabilities a
//! built manager reports all read this table, so they cannot drift apart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{Capabilities, ManagerInfo, SecretsManager};
use crate::config::{ConfigError, ManagerConfig};

/// What `build` returns: the manager, once its access details have been read.
pub type BuildFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Arc<dyn SecretsManager>, ConfigError>> + Send + 'a>>;

/// One key of a manager type's settings. A dotted name (`approle.role_id`) is a key of a
/// nested table; it is required only when its table is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub required: bool,
    /// An access detail: given as `{ env = "VAR" }` or `{ file = "/path" }` in the file, never
    /// inline, never logged, and (through the API) stored only sealed.
    pub secret: bool,
    pub label: &'static str,
    pub instructions: &'static str,
    /// Decides where the secrets are (region, account, vault, mount, project, prefix): a
    /// manager whose value changes would no longer find what it wrote, so changing it is
    /// refused; create a manager and route to it instead, which moves the credentials.
    pub locates: bool,
}

/// Everything about one manager type.
pub struct Descriptor {
    /// The `type` in config and API (`aws`, `hashicorp`...), also its cargo feature.
    pub kind: &'static str,
    pub read_only: bool,
    pub compare_and_swap: bool,
    /// The provider's advice on how often one secret may be updated, where it gives one.
    pub advised_min_write_interval: Option<Duration>,
    /// The type's own keys; the shared `prefix` is added by `keys()`.
    pub keys: &'static [Key],
    /// The type's value rules (URLs, ranges, keys that go together), run after the key check.
    pub check_values: fn(&ManagerConfig) -> Result<(), ConfigError>,
    /// Builds a manager; reads the access details it refers to now.
    pub build: for<'a> fn(&'a ManagerConfig) -> BuildFuture<'a>,
}

/// The key every type shares.
pub const PREFIX: Key = Key {
    name: "prefix",
    required: false,
    secret: false,
    locates: true,
    label: "Name prefix (optional)",
    instructions: "What the names of the secrets credproxy writes start with (default \
                   credproxy/), so that an IAM or Vault policy can grant exactly that prefix.",
};

/// The types built into this binary.
pub static TYPES: &[&Descriptor] = &[
    #[cfg(feature = "aws")]
    &super::aws::DESCRIPTOR,
    #[cfg(feature = "azure")]
    &super::azure::DESCRIPTOR,
    #[cfg(feature = "gcp")]
    &super::gcp::DESCRIPTOR,
    #[cfg(feature = "hashicorp")]
    &super::hashicorp::DESCRIPTOR,
    #[cfg(feature = "composio")]
    &super::composio::DESCRIPTOR,
];

/// Every type credproxy has, built in or not: only to say which cargo feature a refused type
/// needs.
const ALL_KINDS: [&str; 5] = ["aws", "azure", "gcp", "hashicorp", "composio"];

/// The descriptor of a type built into this binary.
pub fn find(kind: &str) -> Option<&'static Descriptor> {
    TYPES.iter().copied().find(|d| d.kind == kind)
}

/// The descriptor of `manager`'s type, or the error that names its `type` key.
pub fn of(manager: &ManagerConfig) -> Result<&'static Descriptor, ConfigError> {
    if let Some(d) = find(&manager.kind) {
        return Ok(d);
    }
    if let Some(kind) = ALL_KINDS.into_iter().find(|k| *k == manager.kind) {
        return Err(ConfigError::BackendNotBuilt {
            id: manager.id.clone(),
            kind,
        });
    }
    let built: Vec<&str> = TYPES.iter().map(|d| d.kind).collect();
    Err(ConfigError::Invalid {
        key: format!("secrets_manager.{}.type", manager.id),
        reason: format!(
            "unknown type `{}` (this binary has: {})",
            manager.kind,
            built.join(", ")
        ),
    })
}

impl Descriptor {
    /// The type's keys and the shared ones.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.keys.iter().chain(std::iter::once(&PREFIX))
    }

    pub fn key(&self, name: &str) -> Option<&Key> {
        self.keys().find(|k| k.name == name)
    }

    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: self.read_only,
            compare_and_swap: self.compare_and_swap,
        }
    }

    pub fn info(&self, id: &str) -> ManagerInfo {
        ManagerInfo {
            id: id.to_owned(),
            kind: self.kind,
            capabilities: self.capabilities(),
        }
    }

    /// Checks a manager's settings: every key described, every required key present, then
    /// the type's value rules. Reads no secret.
    pub fn check(&self, manager: &ManagerConfig) -> Result<(), ConfigError> {
        self.check_keys(manager, "", &manager.settings)?;
        (self.check_values)(manager)
    }

    /// `table` is the settings table at `path` (`""` or `"approle."`).
    fn check_keys(
        &self,
        manager: &ManagerConfig,
        path: &str,
        table: &toml::Table,
    ) -> Result<(), ConfigError> {
        let own: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.name.starts_with(path))
            .collect();
        // The names one level down from `path`: leaf keys and nested tables.
        let mut level: Vec<&str> = own
            .iter()
            .map(|k| {
                let rest = &k.name[path.len()..];
                rest.split('.').next().unwrap_or(rest)
            })
            .collect();
        level.dedup();
        for (name, value) in table {
            let full = format!("{path}{name}");
            if self.keys.iter().any(|k| k.name == full) {
                continue;
            }
            let nested = format!("{full}.");
            if level.contains(&name.as_str()) {
                let Some(inner) = value.as_table() else {
                    return Err(super::setting_error(manager, &full, "expected a table"));
                };
                self.check_keys(manager, &nested, inner)?;
                continue;
            }
            let mut accepted: Vec<&str> = level.clone();
            if path.is_empty() {
                accepted.push(PREFIX.name);
            }
            return Err(super::setting_error(
                manager,
                &full,
                format!(
                    "unknown key; a `{}` manager accepts {}",
                    self.kind,
                    accepted.join(", ")
                ),
            ));
        }
        for key in own.iter().filter(|k| k.required) {
            let rest = &key.name[path.len()..];
            if !rest.contains('.') && !table.contains_key(rest) {
                return Err(super::setting_error(
                    manager,
                    key.name,
                    format!("missing: {} ({})", key.label, key.instructions),
                ));
            }
        }
        Ok(())
    }
}

/// One entry of `GET /v1/secretsmanagers/instructions`.
#[derive(Debug, Clone, Serialize)]
pub struct Instruction {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub key: &'static str,
    pub label: &'static str,
    pub instructions: &'static str,
    pub required: bool,
    pub secret: bool,
}

/// What each type built into this binary needs, and how to obtain it.
pub fn instructions() -> Vec<Instruction> {
    TYPES
        .iter()
        .flat_map(|d| {
            d.keys().map(|k| Instruction {
                kind: d.kind,
                key: k.name,
                label: k.label,
                instructions: k.instructions,
                required: k.required,
                secret: k.secret,
            })
        })
        .collect()
}

/// Test support: checks that the keys a type's settings struct accepts (as serde reports
/// them when it refuses an unknown one) are exactly the keys its descriptor describes, at the
/// top level and in each nested table.
#[cfg(test)]
pub(crate) fn assert_keys_match<T: serde::de::DeserializeOwned>(d: &Descriptor) {
    fn accepted<T: serde::de::DeserializeOwned>(table: toml::Table) -> Vec<String> {
        let message = match toml::Value::Table(table).try_into::<T>() {
            Ok(_) => panic!("an unknown key was accepted"),
            Err(e) => e.message().to_owned(),
        };
        let (_, expected) = message
            .split_once("expected")
            .unwrap_or_else(|| panic!("not an unknown-key error: {message}"));
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }
    let mut tops: Vec<String> = d
        .keys
        .iter()
        .map(|k| k.name.split('.').next().unwrap().to_owned())
        .collect();
    tops.dedup();
    let mut unknown = toml::Table::new();
    unknown.insert("zz_unknown".into(), toml::Value::Integer(1));
    let mut serde_top = accepted::<T>(unknown);
    serde_top.sort();
    let mut described = tops.clone();
    described.sort();
    assert_eq!(serde_top, described, "{}: top-level keys", d.kind);
    for parent in tops
        .iter()
        .filter(|t| d.keys.iter().any(|k| k.name.starts_with(&format!("{t}."))))
    {
        let mut inner = toml::Table::new();
        inner.insert("zz_unknown".into(), toml::Value::Integer(1));
        let mut outer = toml::Table::new();
        outer.insert(parent.clone(), toml::Value::Table(inner));
        let mut serde_inner = accepted::<T>(outer);
        serde_inner.sort();
        let mut described: Vec<String> = d
            .keys
            .iter()
            .filter_map(|k| k.name.strip_prefix(&format!("{parent}.")))
            .map(str::to_owned)
            .collect();
        described.sort();
        assert_eq!(serde_inner, described, "{}: keys of {parent}", d.kind);
    }
    for k in d.keys {
        assert!(
            !k.label.is_empty() && !k.instructions.is_empty(),
            "{}",
            k.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(kind: &str, settings: &str) -> ManagerConfig {
        ManagerConfig {
            id: "m".into(),
            kind: kind.into(),
            prefix: "credproxy/".into(),
            settings: toml::from_str(settings).unwrap(),
            auth: Default::default(),
        }
    }

    #[test]
    fn unknown_types_name_what_is_built() {
        let e = of(&manager("dropbox", "")).err().unwrap().to_string();
        assert!(e.contains("unknown type `dropbox`"), "{e}");
        assert!(e.contains("secrets_manager.m.type"), "{e}");
    }

    #[test]
    fn every_built_type_lists_its_keys_and_the_prefix() {
        let all = instructions();
        for d in TYPES {
            assert!(all.iter().any(|i| i.kind == d.kind && i.key == "prefix"));
            for k in d.keys {
                assert!(all.iter().any(|i| i.kind == d.kind && i.key == k.name));
            }
        }
    }

    #[cfg(feature = "hashicorp")]
    #[test]
    fn key_errors_name_the_key_and_what_is_accepted_never_a_value() {
        let d = find("hashicorp").unwrap();
        let e = d
            .check(&manager(
                "hashicorp",
                "address = \"http://x\"\ntoken = { env = \"T\" }\ntokn = \"hunter2\"",
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains("secrets_manager.m.tokn"), "{e}");
        assert!(e.contains("accepts address"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = d
            .check(&manager(
                "hashicorp",
                "address = \"http://x\"\napprole = { role_id = { env = \"R\" }, secret = \"s3\" }",
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains("secrets_manager.m.approle.secret"), "{e}");
        assert!(!e.contains("s3"), "{e}");
        let e = d
            .check(&manager("hashicorp", "token = { env = \"T\" }"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("secrets_manager.m.address`: missing: Vault address"),
            "{e}"
        );
        let e = d
            .check(&manager(
                "hashicorp",
                "address = \"http://x\"\napprole = { role_id = { env = \"R\" } }",
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains("approle.secret_id`: missing"), "{e}");
    }
}
