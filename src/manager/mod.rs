//! The `SecretsManager` trait every secrets store implements, its error enum, and the registry of
//! configured stores. One file (and, for external managers, one cargo feature) per store type.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
#[cfg(feature = "composio")]
pub mod composio;
#[cfg(feature = "gcp")]
pub mod gcp;
#[cfg(feature = "hashicorp")]
pub mod hashicorp;
pub mod local;
#[cfg(any(feature = "azure", feature = "gcp"))]
pub mod names;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

use crate::config::{ConfigError, ManagerConfig, ManagerKind};
use crate::secret::SecretFields;

/// What went wrong talking to a store, classified for decisions (retry, serve stale, 404...).
/// `detail` strings are for operators' logs only and never reach a response or a metric.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("secret not found")]
    NotFound,
    #[error("access denied by the store: {0}")]
    Denied(String),
    #[error("throttled by the store")]
    Throttled { retry_after: Option<Duration> },
    #[error("store unavailable: {0}")]
    Transient(String),
    #[error("store did not answer in time")]
    Timeout,
    #[error("the stored version changed since it was read")]
    Conflict,
    #[error("the store is read-only")]
    ReadOnly,
    #[error("store refused the request: {0}")]
    Permanent(String),
    /// The store answered, but what it holds must not be handed out (a masked value, an
    /// account that is not active). The reason names no secret.
    #[error("{0}")]
    Unusable(String),
}

impl ManagerError {
    /// Worth retrying later, and worth serving a stale cached value meanwhile.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ManagerError::Transient(_) | ManagerError::Timeout | ManagerError::Throttled { .. }
        )
    }

    /// A closed-set label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            ManagerError::NotFound => "not_found",
            ManagerError::Denied(_) => "denied",
            ManagerError::Throttled { .. } => "throttled",
            ManagerError::Transient(_) => "unavailable",
            ManagerError::Timeout => "timeout",
            ManagerError::Conflict => "conflict",
            ManagerError::ReadOnly => "read_only",
            ManagerError::Permanent(_) => "error",
            ManagerError::Unusable(_) => "unusable",
        }
    }
}

/// A secret as read from a store, with the store's version id for it.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub value: SecretFields,
    pub version: String,
    /// Seconds until the token expires, for stores that know it (Composio's `expires_in`).
    pub expires_in: Option<Duration>,
}

#[derive(Debug)]
pub struct PutRequest<'a> {
    /// The logical name (`{prefix}{environment}/{credential id}`); a store maps it to its own
    /// alphabet if it has to.
    pub name: &'a str,
    pub value: &'a SecretFields,
    /// Compare-and-swap: fail with `Conflict` unless this is the current version. `None` for
    /// a first write. Stores without CAS ignore it.
    pub expected_version: Option<&'a str>,
    /// The same key on a retried write makes it idempotent where the store supports that.
    pub idempotency_key: &'a str,
}

#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    pub query: Option<String>,
    pub offset: usize,
    pub limit: usize,
}

/// One entry of a store's own listing, for `GET /v1/secretsmanagers/secrets`.
#[derive(Debug, Clone, Serialize)]
pub struct SecretSummary {
    pub id: String,
    pub name: String,
    pub description: String,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub created_at: Option<SystemTime>,
    #[serde(serialize_with = "crate::time::serialize_opt_rfc3339")]
    pub updated_at: Option<SystemTime>,
}

/// Applies a listing request's query, offset and limit to entries a store hands over in its
/// own pages, for stores that cannot filter or skip on their side.
#[allow(dead_code)] // unused when no backend that needs it is compiled in
pub(crate) struct Window<'a> {
    request: &'a ListRequest,
    skipped: usize,
    items: Vec<SecretSummary>,
}

#[allow(dead_code)]
impl<'a> Window<'a> {
    pub(crate) fn new(request: &'a ListRequest) -> Self {
        Self {
            request,
            skipped: 0,
            items: Vec::new(),
        }
    }

    /// Offers the entry named `name` (built only if it is kept). `Some(page)` once the page is
    /// full and the store has more.
    pub(crate) fn offer(
        &mut self,
        name: &str,
        entry: impl FnOnce() -> SecretSummary,
    ) -> Option<Page> {
        if self
            .request
            .query
            .as_ref()
            .is_some_and(|q| !name.contains(q.as_str()))
        {
            return None;
        }
        if self.skipped < self.request.offset {
            self.skipped += 1;
            return None;
        }
        if self.items.len() == self.request.limit {
            return Some(Page {
                items: std::mem::take(&mut self.items),
                more: true,
            });
        }
        self.items.push(entry());
        None
    }

    /// The page once the store has no more.
    pub(crate) fn finish(self) -> Page {
        Page {
            items: self.items,
            more: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Page {
    pub items: Vec<SecretSummary>,
    /// Whether the store has more past this page.
    pub more: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Capabilities {
    pub read_only: bool,
    pub compare_and_swap: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ManagerInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub capabilities: Capabilities,
}

/// A secrets store. The required core is small; writes default to "read-only".
#[async_trait]
pub trait SecretsManager: Send + Sync + 'static {
    fn describe(&self) -> ManagerInfo;

    /// Reads `name` at `version`, or the current version when `None`.
    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError>;

    /// Writes a new version and returns its id.
    async fn put(&self, _request: PutRequest<'_>) -> Result<String, ManagerError> {
        Err(ManagerError::ReadOnly)
    }

    /// Removes every version of `name`. Deleting what is not there succeeds.
    async fn delete(&self, _name: &str) -> Result<(), ManagerError> {
        Err(ManagerError::ReadOnly)
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError>;
}

/// The configured stores by id, `local` always among them.
#[derive(Clone, Default)]
pub struct Registry {
    stores: HashMap<String, Arc<dyn SecretsManager>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, id: impl Into<String>, backend: Arc<dyn SecretsManager>) {
        self.stores.insert(id.into(), backend);
    }

    pub fn get(&self, id: &str) -> Option<&Arc<dyn SecretsManager>> {
        self.stores.get(id)
    }

    pub fn remove(&mut self, id: &str) -> Option<Arc<dyn SecretsManager>> {
        self.stores.remove(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.stores.keys().map(String::as_str)
    }
}

/// Checks a manager's type-specific keys. Each backend owns the keys it accepts; a type whose
/// backend is not compiled in is refused here, naming the cargo feature.
pub fn validate_settings(manager: &ManagerConfig) -> Result<(), ConfigError> {
    match manager.kind {
        #[cfg(feature = "aws")]
        ManagerKind::Aws => aws::parse_settings(manager).map(drop),
        #[cfg(feature = "hashicorp")]
        ManagerKind::Hashicorp => hashicorp::parse_settings(manager).map(drop),
        #[cfg(feature = "composio")]
        ManagerKind::Composio => composio::parse_settings(manager).map(drop),
        #[cfg(feature = "gcp")]
        ManagerKind::Gcp => gcp::parse_settings(manager).map(drop),
        #[cfg(feature = "azure")]
        ManagerKind::Azure => azure::parse_settings(manager).map(drop),
        #[allow(unreachable_patterns)] // reachable when a backend's feature is off
        _ => Err(not_built(manager)),
    }
}

/// A rejected manager setting, keyed `secrets_manager.{id}.{key}`.
#[allow(dead_code)] // unused when no external backend is compiled in
pub(crate) fn setting_error(
    manager: &ManagerConfig,
    key: &str,
    reason: impl Into<String>,
) -> ConfigError {
    let key = if key.is_empty() {
        format!("secrets_manager.{}", manager.id)
    } else {
        format!("secrets_manager.{}.{key}", manager.id)
    };
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// Deserialises a manager's type-specific keys into the backend's own settings type (which
/// rejects unknown keys).
#[allow(dead_code)] // unused when no external backend is compiled in
pub(crate) fn parse_table<T: serde::de::DeserializeOwned>(
    manager: &ManagerConfig,
) -> Result<T, ConfigError> {
    manager
        .settings
        .clone()
        .try_into()
        .map_err(|e: toml::de::Error| setting_error(manager, "", e.message().to_owned()))
}

fn not_built(manager: &ManagerConfig) -> ConfigError {
    ConfigError::BackendNotBuilt {
        id: manager.id.clone(),
        kind: manager.kind.as_str(),
    }
}

/// Builds the backend for a validated manager. Reads the access details it refers to
/// (environment variables, files) now.
pub async fn build(manager: &ManagerConfig) -> Result<Arc<dyn SecretsManager>, ConfigError> {
    match manager.kind {
        #[cfg(feature = "aws")]
        ManagerKind::Aws => aws::AwsManager::build(manager).await,
        #[cfg(feature = "hashicorp")]
        ManagerKind::Hashicorp => hashicorp::HashicorpManager::build(manager).await,
        #[cfg(feature = "composio")]
        ManagerKind::Composio => composio::ComposioManager::build(manager).await,
        #[cfg(feature = "gcp")]
        ManagerKind::Gcp => gcp::GcpManager::build(manager).await,
        #[cfg(feature = "azure")]
        ManagerKind::Azure => azure::AzureManager::build(manager).await,
        #[allow(unreachable_patterns)] // reachable when a backend's feature is off
        _ => Err(not_built(manager)),
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
}

/// What each manager type needs in its `[[secrets_manager]]` section, and how to obtain it.
pub fn instructions() -> Vec<Instruction> {
    let i = |kind: ManagerKind, key, label, instructions| Instruction {
        kind: kind.as_str(),
        key,
        label,
        instructions,
    };
    use ManagerKind::*;
    vec![
        i(Aws, "region", "AWS region", "The region of the Secrets Manager endpoint, e.g. eu-west-1."),
        i(Aws, "access_key_id", "Access key id (optional)", "An IAM user's access key id as { env = \"VAR\" } or { file = \"/path\" }; omit to use the SDK's default chain (pod identity, instance role)."),
        i(Aws, "secret_access_key", "Secret access key (optional)", "The matching secret access key, as { env } or { file }; never inline."),
        i(Aws, "role_arn", "Role to assume (optional)", "An IAM role ARN that allows secretsmanager:GetSecretValue, PutSecretValue, CreateSecret, DeleteSecret and ListSecrets on the prefix."),
        i(Aws, "endpoint", "Endpoint URL (optional)", "A VPC endpoint or a test server URL; omit for the public regional endpoint."),
        i(Azure, "vault_url", "Key Vault URL", "The vault's URI from the Azure portal overview, e.g. https://myvault.vault.azure.net."),
        i(Azure, "tenant_id", "Tenant id (optional)", "The Microsoft Entra tenant of the app registration; omit with client_id and client_secret to use managed identity."),
        i(Azure, "client_id", "Client id (optional)", "The app registration's application (client) id, granted the Key Vault Secrets Officer role."),
        i(Azure, "client_secret", "Client secret (optional)", "A client secret of that app registration, as { env } or { file }."),
        i(Azure, "purge_on_delete", "Purge on delete (optional)", "true to purge a deleted secret at once (needs the purge permission); otherwise Key Vault keeps it soft-deleted for its retention period."),
        i(Gcp, "project_id", "Project id", "The Google Cloud project that holds the secrets."),
        i(Gcp, "credentials", "Service account key (optional)", "A service-account JSON key with roles/secretmanager.admin, as { env } or { file }; omit to use the default chain (workload identity)."),
        i(Gcp, "endpoint", "Endpoint (optional)", "A regional or Private Service Connect endpoint; omit for https://secretmanager.googleapis.com."),
        i(Hashicorp, "address", "Vault address", "The Vault or OpenBao URL, e.g. https://vault.internal:8200."),
        i(Hashicorp, "mount", "KV mount", "The KV secrets engine mount (KV v2 by default), e.g. secret."),
        i(Hashicorp, "token", "Token (optional)", "A Vault token with a policy on the prefix, as { env } or { file }; or use approle."),
        i(Hashicorp, "approle", "AppRole (optional)", "role_id and secret_id of an AppRole (vault read auth/approle/role/NAME/role-id; vault write -f auth/approle/role/NAME/secret-id), each as { env } or { file }."),
        i(Composio, "api_key", "Composio API key", "A project API key from the Composio dashboard (Settings → API keys), as { env } or { file }. Composio is read-only: credproxy reads connected accounts and never writes or refreshes them."),
        i(Composio, "base_url", "Base URL (optional)", "Defaults to https://backend.composio.dev."),
    ]
}
