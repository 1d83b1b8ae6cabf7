//! The `azure` settings: what a `[secrets_manager.ID]` table of that type may hold, the
//! descriptor that documents those keys, and the checks made before anything is built.

use serde::Deserialize;

use super::AzureManager;
use crate::config::{ConfigError, ManagerConfig, SecretRef};
use crate::manager::descriptor::{Descriptor, Key};
use crate::manager::{parse_table, setting_error};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    pub vault_url: String,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretRef>,
    /// Microsoft Entra authority (sovereign clouds, tests).
    pub authority_host: Option<String>,
    /// Purge after the soft delete, so the name can be reused at once.
    #[serde(default)]
    pub purge_on_delete: bool,
    /// Extra CA certificates (PEM) to trust, for private endpoints behind a TLS proxy.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The `azure` type, for the table in `descriptor`.
pub static DESCRIPTOR: Descriptor = Descriptor {
    kind: "azure",
    read_only: false,
    compare_and_swap: false,
    advised_min_write_interval: None,
    keys: &[
    Key {
        name: "vault_url",
        locates: true,
        required: true,
        secret: false,
        label: "Key Vault URL",
        instructions: "The vault's URI from the Azure portal overview, e.g. https://myvault.vault.azure.net.",
    },
    Key {
        name: "tenant_id",
        locates: false,
        required: false,
        secret: false,
        label: "Tenant id (optional)",
        instructions: "The Microsoft Entra tenant of the app registration; omit with client_id and client_secret to use workload or managed identity.",
    },
    Key {
        name: "client_id",
        locates: false,
        required: false,
        secret: false,
        label: "Client id (optional)",
        instructions: "The app registration's application (client) id, granted the Key Vault Secrets Officer role.",
    },
    Key {
        name: "client_secret",
        locates: false,
        required: false,
        secret: true,
        label: "Client secret (optional)",
        instructions: "A client secret of that app registration, as { env } or { file }.",
    },
    Key {
        name: "authority_host",
        locates: true,
        required: false,
        secret: false,
        label: "Authority host (optional)",
        instructions: "The Microsoft Entra authority for sovereign clouds, e.g. https://login.microsoftonline.us; defaults to https://login.microsoftonline.com.",
    },
    Key {
        name: "purge_on_delete",
        locates: false,
        required: false,
        secret: false,
        label: "Purge on delete (optional)",
        instructions: "true to purge a deleted secret at once (needs the purge permission); otherwise Key Vault keeps it soft-deleted for its retention period.",
    },
    Key {
        name: "ca_file",
        locates: false,
        required: false,
        secret: false,
        label: "CA file (optional)",
        instructions: "A PEM file of extra CA certificates to trust, for private endpoints behind a TLS proxy.",
    },
    ],
    check_values: |manager| parse_settings(manager).map(drop),
    build: |manager| Box::pin(AzureManager::build(manager)),
};

pub fn parse_settings(manager: &ManagerConfig) -> Result<AzureSettings, ConfigError> {
    let s: AzureSettings = parse_table(manager)?;
    let https = |v: &str| url::Url::parse(v).is_ok_and(|u| u.scheme() == "https");
    if !https(&s.vault_url) {
        return Err(setting_error(
            manager,
            "vault_url",
            "must be the vault's https URL, e.g. https://myvault.vault.azure.net",
        ));
    }
    if let Some(a) = &s.authority_host {
        if !https(a) {
            return Err(setting_error(
                manager,
                "authority_host",
                "must be an https URL",
            ));
        }
    }
    let secret_parts = [
        s.tenant_id.is_some(),
        s.client_id.is_some(),
        s.client_secret.is_some(),
    ];
    if s.client_secret.is_some() && secret_parts.contains(&false) {
        return Err(setting_error(
            manager,
            "client_secret",
            "give tenant_id, client_id and client_secret together, or none for managed identity",
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_describes_every_key_the_settings_accept() {
        crate::manager::descriptor::assert_keys_match::<AzureSettings>(&DESCRIPTOR);
    }
}
