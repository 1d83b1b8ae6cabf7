//! The `SecretsManager` trait every place secrets live implements (the external managers and
//! the local encrypted store), its error enum, the registry of configured managers, and the
//! table of manager types (`descriptor`). One module and one cargo feature per external type.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
#[cfg(feature = "composio")]
pub mod composio;
pub mod descriptor;
#[cfg(feature = "gcp")]
pub mod gcp;
#[cfg(feature = "hashicorp")]
pub mod hashicorp;
pub mod local;
// Always built: the fuzz targets check its round trip whatever backends they are built with.
pub mod names;
pub mod renewing;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

use crate::config::{ConfigError, ManagerConfig};
use crate::secret::SecretFields;

/// What went wrong talking to a secrets manager, classified for decisions (retry, serve stale, 404...).
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
    /// The account behind the credential is not usable (a Composio connected account that is
    /// not `ACTIVE`): only its user can fix that, by reconnecting it. Answered like
    /// `Unusable`; it is also what re-authorisation events report.
    #[error("{0}")]
    AccountInactive(String),
    /// The name is held by a deleted secret that credproxy may neither recover nor purge
    /// (Key Vault's soft delete). The reason names the refusals, never a value.
    #[error("the name is held by a deleted secret: {0}")]
    NameUnavailable(String),
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
            ManagerError::Unusable(_) | ManagerError::AccountInactive(_) => "unusable",
            ManagerError::NameUnavailable(_) => "name_unavailable",
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

/// What one attempt to purge a soft-deleted secret found ([`SecretsManager::purge_deleted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// Purged now.
    Purged,
    /// Nothing deleted is left under the name: purged already, recovered, or in use again.
    Gone,
    /// The delete is still in progress; ask again later.
    Waiting,
}

#[derive(Debug, Clone, Copy)]
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

    /// Whether a delete leaves a soft-deleted secret that is to be purged once the store has
    /// finished deleting it (Key Vault with `purge_on_delete`): whoever deletes records the
    /// name and calls [`purge_deleted`](Self::purge_deleted) later until it is done.
    fn purges_after_delete(&self) -> bool {
        false
    }

    /// One attempt to purge the soft-deleted secret `name`.
    async fn purge_deleted(&self, _name: &str) -> Result<Purge, ManagerError> {
        Ok(Purge::Gone)
    }

    /// A cheap authenticated call that proves the access details work, made before a manager
    /// given through the API is saved. By default: list one secret.
    async fn probe(&self) -> Result<(), ManagerError> {
        self.list(ListRequest {
            query: None,
            offset: 0,
            limit: 1,
        })
        .await
        .map(drop)
    }

    /// Rebuilds the client if the files holding its access details changed since it was
    /// built. Only the `renewing` wrapper, which every configured manager is built in, has
    /// anything to do.
    async fn renew_if_rotated(&self) {}
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
        .map_err(|e: toml::de::Error| {
            setting_error(manager, "", crate::secret::without_values(e.message()))
        })
}

/// Checks a manager's settings against its type's descriptor, without reading any secret.
pub fn check(manager: &ManagerConfig) -> Result<(), ConfigError> {
    descriptor::of(manager)?.check(manager)
}

/// Builds the manager for a configuration entry. Reads the access details it refers to
/// (environment variables, files) now.
pub async fn build(manager: &ManagerConfig) -> Result<Arc<dyn SecretsManager>, ConfigError> {
    let descriptor = descriptor::of(manager)?;
    descriptor.check(manager)?;
    (descriptor.build)(manager).await
}
