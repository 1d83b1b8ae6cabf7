//! The `hashicorp` settings: what a `[secrets_manager.ID]` table of that type may hold, the
//! descriptor that documents those keys, and the checks made before anything is built.

use serde::Deserialize;

use super::HashicorpManager;
use crate::config::{ConfigError, ManagerConfig, SecretRef};
use crate::manager::descriptor::{Descriptor, Key};
use crate::manager::{parse_table, setting_error};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashicorpSettings {
    pub address: String,
    pub namespace: Option<String>,
    #[serde(default = "default_mount")]
    pub mount: String,
    #[serde(default = "default_kv_version")]
    pub kv_version: u8,
    /// PEM file of the CA that signed Vault's certificate.
    pub ca_file: Option<String>,
    pub token: Option<SecretRef>,
    pub approle: Option<AppRoleSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRoleSettings {
    pub role_id: SecretRef,
    pub secret_id: SecretRef,
    #[serde(default = "default_approle_mount")]
    pub mount: String,
}

fn default_mount() -> String {
    "secret".into()
}
fn default_kv_version() -> u8 {
    2
}
fn default_approle_mount() -> String {
    "approle".into()
}

/// The `hashicorp` type, for the table in `descriptor`.
pub static DESCRIPTOR: Descriptor = Descriptor {
    kind: "hashicorp",
    read_only: false,
    compare_and_swap: true,
    advised_min_write_interval: None,
    keys: &[
    Key {
        name: "address",
        locates: true,
        required: true,
        secret: false,
        label: "Vault address",
        instructions: "The Vault or OpenBao URL, e.g. https://vault.internal:8200.",
    },
    Key {
        name: "namespace",
        locates: true,
        required: false,
        secret: false,
        label: "Namespace (optional)",
        instructions: "The Vault Enterprise or OpenBao namespace the mount lives in.",
    },
    Key {
        name: "mount",
        locates: true,
        required: false,
        secret: false,
        label: "KV mount (optional)",
        instructions: "The KV secrets engine mount, default secret.",
    },
    Key {
        name: "kv_version",
        locates: true,
        required: false,
        secret: false,
        label: "KV version (optional)",
        instructions: "1 or 2 (default 2); version 2 gives compare-and-swap writes.",
    },
    Key {
        name: "ca_file",
        locates: false,
        required: false,
        secret: false,
        label: "CA file (optional)",
        instructions: "A PEM file of the CA that signed Vault's certificate.",
    },
    Key {
        name: "token",
        locates: false,
        required: false,
        secret: true,
        label: "Token (optional)",
        instructions: "A Vault token with a policy on the prefix, as { env } or { file }; or use approle.",
    },
    Key {
        name: "approle.role_id",
        locates: false,
        required: true,
        secret: true,
        label: "AppRole role id",
        instructions: "The role id (vault read auth/approle/role/NAME/role-id), as { env } or { file }; give approle or token.",
    },
    Key {
        name: "approle.secret_id",
        locates: false,
        required: true,
        secret: true,
        label: "AppRole secret id",
        instructions: "A secret id (vault write -f auth/approle/role/NAME/secret-id), as { env } or { file }.",
    },
    Key {
        name: "approle.mount",
        locates: false,
        required: false,
        secret: false,
        label: "AppRole mount (optional)",
        instructions: "Where the AppRole auth method is mounted, default approle.",
    },
    ],
    check_values: |manager| parse_settings(manager).map(drop),
    build: |manager| Box::pin(HashicorpManager::build(manager)),
};

pub fn parse_settings(manager: &ManagerConfig) -> Result<HashicorpSettings, ConfigError> {
    let s: HashicorpSettings = parse_table(manager)?;
    if !(s.address.starts_with("https://") || s.address.starts_with("http://"))
        || url_invalid(&s.address)
    {
        return Err(setting_error(manager, "address", "must be an http(s) URL"));
    }
    if !matches!(s.kv_version, 1 | 2) {
        return Err(setting_error(manager, "kv_version", "1 or 2"));
    }
    if s.mount.is_empty() || s.mount.contains("..") {
        return Err(setting_error(manager, "mount", "must name a KV mount"));
    }
    if s.token.is_some() == s.approle.is_some() {
        return Err(setting_error(
            manager,
            "token",
            "give exactly one of token or approle",
        ));
    }
    Ok(s)
}

fn url_invalid(s: &str) -> bool {
    s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_describes_every_key_the_settings_accept() {
        crate::manager::descriptor::assert_keys_match::<HashicorpSettings>(&DESCRIPTOR);
    }
}
