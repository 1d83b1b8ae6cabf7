//! The use cases behind the API: create, resolve, change and delete credentials, list what a
//! manager holds, and clean up copies that a crash, move or delete left behind.
//!
//! Every write follows one journaled pattern so a crash at any point loses nothing and leaves
//! no copy unaccounted for: journal the copy that may be abandoned, write the store, switch the
//! metadata row (compare-and-swap on its version) in the same transaction that settles the
//! journal, then delete what was abandoned.

mod refresh;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::time::Instant;

pub use refresh::{Refreshed, Trigger};

use crate::access::{Action, Caller, Policy};
use crate::cache::{Cache, CacheStatus, Entry, LoadFailure, Loaded};
use crate::config::{is_valid_name, Config};
use crate::manager::local::Keyring;
use crate::manager::{ListRequest, ManagerError, Page, PutRequest, Registry, SecretsManager};
use crate::metadata::{
    ClientAuth, CredentialRecord, JournalEntry, JournalKind, Location, Metadata, MetadataError,
    OAuthDescription,
};
use crate::metrics::Metrics;
use crate::routing::{route, Route};
use crate::secret::SecretFields;

/// Largest metadata object accepted, serialised.
const MAX_METADATA_BYTES: usize = 16 * 1024;
/// Retry-After suggested when a store is down and nothing is cached.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a use case failed. Details are for logs; the API maps each variant to a fixed message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("credential not found")]
    NotFound,
    #[error("caller is not allowed to do this")]
    Forbidden,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the credential changed concurrently")]
    Conflict,
    #[error("secrets manager `{manager}` is read-only")]
    ReadOnly { manager: String },
    #[error("no secrets manager `{0}` is configured")]
    UnknownManager(String),
    #[error("secrets manager `{manager}` unavailable: {detail}")]
    Unavailable {
        manager: String,
        detail: String,
        retry_after: Duration,
    },
    #[error("secrets manager `{manager}` refused the request: {detail}")]
    ManagerFailed { manager: String, detail: String },
    #[error("the secret recorded for this credential is missing from secrets manager `{manager}`")]
    SecretMissing { manager: String },
    #[error("metadata database: {0}")]
    Metadata(String),
    #[error("the refresh token was rejected; the credential needs re-authorisation")]
    NeedsReauth,
    #[error("the credential cannot be refreshed: {0}")]
    NotRefreshable(String),
    #[error("the access token expired and could not be refreshed: {detail}")]
    TokenUnavailable {
        detail: String,
        retry_after: Duration,
    },
    #[error("secrets manager `{manager}` holds this credential in a state that cannot be used: {reason}")]
    Unusable { manager: String, reason: String },
}

impl LoadFailure for ServiceError {
    fn allows_stale(&self) -> bool {
        matches!(
            self,
            ServiceError::Unavailable { .. } | ServiceError::Metadata(_)
        )
    }
}

impl From<MetadataError> for ServiceError {
    fn from(e: MetadataError) -> Self {
        match e {
            MetadataError::Conflict => ServiceError::Conflict,
            other => ServiceError::Metadata(other.to_string()),
        }
    }
}

fn manager_failure(manager: &str, e: ManagerError) -> ServiceError {
    let manager = manager.to_owned();
    match e {
        ManagerError::Conflict => ServiceError::Conflict,
        ManagerError::ReadOnly => ServiceError::ReadOnly { manager },
        ManagerError::NotFound => ServiceError::SecretMissing { manager },
        ManagerError::Throttled { retry_after } => ServiceError::Unavailable {
            manager,
            detail: "throttled".into(),
            retry_after: retry_after.unwrap_or(UNAVAILABLE_RETRY_AFTER),
        },
        e @ (ManagerError::Transient(_) | ManagerError::Timeout) => ServiceError::Unavailable {
            manager,
            detail: e.to_string(),
            retry_after: UNAVAILABLE_RETRY_AFTER,
        },
        ManagerError::Unusable(reason) => ServiceError::Unusable { manager, reason },
        e @ (ManagerError::Denied(_) | ManagerError::Permanent(_)) => ServiceError::ManagerFailed {
            manager,
            detail: e.to_string(),
        },
    }
}

/// The configuration in force and everything built from it; swapped whole on reload.
pub struct Runtime {
    pub config: Arc<Config>,
    pub registry: Registry,
    pub policy: Policy,
}

/// `POST /v1/credentials`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub environment: String,
    #[serde(default)]
    pub integration_type: Option<String>,
    #[serde(default)]
    pub secrets_manager_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub secrets: Option<SecretFields>,
    #[serde(default)]
    pub oauth: Option<OAuthInput>,
    /// For read-only managers: the id of the account there (e.g. a Composio connected account).
    #[serde(default)]
    pub external_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthInput {
    pub token_url: String,
    pub client_id: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 3339 or Unix seconds.
    #[serde(default)]
    pub expires_at: Option<serde_json::Value>,
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

/// `PATCH /v1/credentials/{id}`. `secrets_manager_id: null` unpins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    #[serde(default)]
    pub secrets: Option<SecretFields>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub secrets_manager_id: Option<Option<String>>,
    #[serde(default)]
    pub expires_at: Option<serde_json::Value>,
}

fn explicit_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Per-credential mutual exclusion for writers in this process, so a write, a move and the
/// journal sweeper never interleave on one credential.
#[derive(Default)]
struct KeyedLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_owned(), Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }
}

pub struct Service {
    runtime: Arc<ArcSwap<Runtime>>,
    metadata: Arc<dyn Metadata>,
    cache: Cache<ServiceError>,
    metrics: Arc<Metrics>,
    locks: KeyedLocks,
    keys: Arc<Keyring>,
    oauth: refresh::OAuthState,
    /// This process among the instances sharing the metadata database.
    instance: String,
}

/// How often an instance says it is alive, and after how long without that it is not.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
pub const INSTANCE_LIVENESS: Duration = Duration::from_secs(10);

/// What a background move did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveOutcome {
    Moved,
    /// Already where the chain says (another process, or a write, moved it).
    InPlace,
    /// Deleted meanwhile.
    Gone,
    /// The source or target is read-only: never moved.
    ReadOnly,
    /// Another instance is moving it.
    Claimed,
}

/// How long a move claim lasts unless renewed (it is, while the move runs): a crashed
/// mover's claims are taken over after this.
const MOVE_CLAIM_TTL: Duration = Duration::from_secs(5);

/// What a write answers: never the secrets.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub record: CredentialRecord,
}

impl Service {
    pub fn new(
        runtime: Runtime,
        metadata: Arc<dyn Metadata>,
        metrics: Arc<Metrics>,
        keys: Arc<Keyring>,
    ) -> Self {
        let oauth = refresh::OAuthState::new(&runtime.config.oauth);
        let c = &runtime.config.cache;
        let cache = Cache::new(
            c.ttl,
            c.capacity,
            c.stale_if_error,
            Some(metrics.cache_evictions.clone()),
        );
        Self {
            runtime: Arc::new(ArcSwap::from_pointee(runtime)),
            metadata,
            cache,
            metrics,
            locks: KeyedLocks::default(),
            keys,
            oauth,
            instance: uuid::Uuid::new_v4().to_string(),
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Records this instance as alive with the routing configuration it runs now.
    pub async fn heartbeat(&self) -> Result<(), ServiceError> {
        let hash = self.runtime.load().config.routing_hash();
        Ok(self
            .metadata
            .instance_heartbeat(&self.instance, &hash)
            .await?)
    }

    pub async fn leave_fleet(&self) {
        let _ = self.metadata.instance_remove(&self.instance).await;
    }

    /// Puts a reloaded configuration in force. Requests already running finish with the
    /// runtime they started with.
    pub fn swap_runtime(&self, runtime: Runtime) {
        self.runtime.store(Arc::new(runtime));
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn metadata(&self) -> &Arc<dyn Metadata> {
        &self.metadata
    }

    pub fn allows(&self, caller: &Caller, action: Action, environment: Option<&str>) -> bool {
        self.runtime
            .load()
            .policy
            .allows(caller, action, environment)
    }

    /// Keeps this instance's cache coherent with others sharing the metadata database: drops
    /// what they changed, everything after a lost connection. Runs until `stop`.
    pub async fn follow_invalidations(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(mut changes) = self.metadata.invalidations() else {
            return;
        };
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let change = tokio::select! {
                c = changes.recv() => c,
                _ = stop.changed() => return,
            };
            match change {
                Ok(crate::metadata::Invalidation::Credential(id)) => {
                    self.metrics
                        .invalidations
                        .with_label_values(&["credential"])
                        .inc();
                    self.cache.invalidate(&id);
                }
                Ok(crate::metadata::Invalidation::All) | Err(RecvError::Lagged(_)) => {
                    self.metrics.invalidations.with_label_values(&["all"]).inc();
                    self.cache.invalidate_all();
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    pub fn refresh_cache_gauge(&self) {
        self.metrics
            .cache_entries
            .set(self.cache.entry_count() as i64);
    }

    fn manager(
        runtime: &Runtime,
        manager_id: &str,
    ) -> Result<Arc<dyn SecretsManager>, ServiceError> {
        runtime
            .registry
            .get(manager_id)
            .cloned()
            .ok_or_else(|| ServiceError::UnknownManager(manager_id.to_owned()))
    }

    /// Runs one store call with the configured timeout and records it in the metrics.
    async fn call<T>(
        &self,
        manager_id: &str,
        operation: &'static str,
        fut: impl Future<Output = Result<T, ManagerError>>,
    ) -> Result<T, ManagerError> {
        let timeout = self.runtime.load().config.manager_timeout;
        call_manager(&self.metrics, timeout, manager_id, operation, fut).await
    }

    fn secret_name(runtime: &Runtime, manager_id: &str, environment: &str, id: &str) -> String {
        let prefix = runtime
            .config
            .manager(manager_id)
            .map(|m| m.prefix.as_str())
            .unwrap_or("");
        format!("{prefix}{environment}/{id}")
    }

    // -----------------------------------------------------------------------------------------
    // Reads
    // -----------------------------------------------------------------------------------------

    /// Resolves a credential, from the cache when fresh. Access is checked against the
    /// credential's environment before anything is returned.
    pub async fn get(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        if !self.allows(caller, Action::Read, None) {
            return Err(ServiceError::Forbidden);
        }
        if !is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        let (entry, status) = self
            .cache
            .get_or_load(id, || self.loader(id.to_owned()))
            .await?;
        self.metrics
            .cache_requests
            .with_label_values(&[status.as_str()])
            .inc();
        if !self.allows(caller, Action::Read, Some(&entry.loaded.record.environment)) {
            return Err(ServiceError::Forbidden);
        }
        self.checked_token(id, entry, status).await
    }

    fn loader(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Loaded, ServiceError>> + Send + 'static {
        let metadata = Arc::clone(&self.metadata);
        let runtimes = Arc::clone(&self.runtime);
        let metrics = Arc::clone(&self.metrics);
        async move {
            let mut record = metadata
                .get_credential(&id)
                .await?
                .ok_or(ServiceError::NotFound)?;
            let mut attempts = 0;
            let read = loop {
                // Loaded per attempt: a reload may have brought the store the row now names.
                let runtime = runtimes.load();
                let timeout = runtime.config.manager_timeout;
                let backend = Self::manager(&runtime, &record.location.manager_id)?;
                let loc = &record.location;
                let read = call_manager(
                    &metrics,
                    timeout,
                    &loc.manager_id,
                    "get",
                    backend.get(&loc.name, loc.version.as_deref()),
                )
                .await;
                match read {
                    Ok(read) => break read,
                    // A move (or write) may have switched the location and deleted the copy
                    // between reading the row and reading the store: follow the new row.
                    Err(ManagerError::NotFound) if attempts < 3 => {
                        attempts += 1;
                        let fresh = metadata
                            .get_credential(&id)
                            .await?
                            .ok_or(ServiceError::NotFound)?;
                        if fresh.location == record.location {
                            return Err(manager_failure(
                                &record.location.manager_id,
                                ManagerError::NotFound,
                            ));
                        }
                        record = fresh;
                    }
                    Err(e) => return Err(manager_failure(&record.location.manager_id, e)),
                }
            };
            let valid_until = earliest(
                record.expires_at.map(crate::time::from_unix),
                read.expires_in.map(|d| SystemTime::now() + d),
            );
            Ok(Loaded {
                record: Arc::new(record),
                secrets: read.value,
                valid_until,
            })
        }
    }

    /// Lists what a manager itself holds (not only what credproxy wrote there).
    pub async fn list_manager_secrets(
        &self,
        caller: &Caller,
        manager_id: &str,
        request: ListRequest,
    ) -> Result<Page, ServiceError> {
        if !self.allows(caller, Action::Admin, None) {
            return Err(ServiceError::Forbidden);
        }
        let backend = Self::manager(&self.runtime(), manager_id)?;
        self.call(manager_id, "list", backend.list(request))
            .await
            .map_err(|e| manager_failure(manager_id, e))
    }

    pub fn route_for(&self, environment: &str, pin: Option<&str>) -> Route {
        let runtime = self.runtime.load();
        route(
            &runtime.config.routing,
            &runtime.config.managers,
            environment,
            pin,
        )
    }

    // -----------------------------------------------------------------------------------------
    // Writes
    // -----------------------------------------------------------------------------------------

    pub async fn create(
        &self,
        caller: &Caller,
        request: CreateRequest,
    ) -> Result<WriteOutcome, ServiceError> {
        let environment = request.environment;
        if !is_valid_name(&environment) {
            return Err(ServiceError::Invalid(
                "`environment` must be 1-128 letters, digits, `-`, `_` or `.`".into(),
            ));
        }
        if !self.allows(caller, Action::Write, Some(&environment)) {
            return Err(ServiceError::Forbidden);
        }
        let integration_type = request.integration_type.unwrap_or_default();
        if integration_type.is_empty()
            || integration_type.len() > 128
            || integration_type.chars().any(char::is_control)
        {
            return Err(ServiceError::Invalid(
                "`integration_type` must be 1-128 printable characters".into(),
            ));
        }
        let metadata = request.metadata.unwrap_or_default();
        check_metadata(&metadata)?;
        let (oauth, expires_at) = match request.oauth {
            Some(o) => {
                let expires_at = o.expires_at.as_ref().map(parse_expiry).transpose()?;
                (Some(check_oauth(o)?), expires_at)
            }
            None => (None, None),
        };

        let runtime = self.runtime();
        let pin = request.secrets_manager_id;
        if let Some(pin) = &pin {
            Self::manager(&runtime, pin)?;
        }
        let target = route(
            &runtime.config.routing,
            &runtime.config.managers,
            &environment,
            pin.as_deref(),
        );
        let backend = Self::manager(&runtime, &target.manager_id)?;
        let read_only = backend.describe().capabilities.read_only;
        let id = uuid::Uuid::new_v4().to_string();
        let now = crate::time::now_unix();
        let mut record = CredentialRecord {
            id: id.clone(),
            environment: environment.clone(),
            integration_type,
            metadata,
            oauth,
            pinned_manager: pin,
            location: Location {
                manager_id: target.manager_id.clone(),
                name: String::new(),
                version: None,
            },
            expires_at,
            needs_reauth: false,
            row_version: 1,
            created_at: now,
            updated_at: now,
        };

        if read_only {
            // Registration by reference: the account lives in the read-only store already.
            if request.secrets.is_some() {
                return Err(ServiceError::ReadOnly {
                    manager: target.manager_id,
                });
            }
            let external_id = request
                .external_id
                .filter(|e| is_valid_name(e))
                .ok_or_else(|| {
                    ServiceError::Invalid(
                        "a read-only manager needs `external_id` (the account id there)".into(),
                    )
                })?;
            let read = self
                .call(&target.manager_id, "get", backend.get(&external_id, None))
                .await
                .map_err(|e| match e {
                    ManagerError::NotFound => {
                        ServiceError::Invalid("`external_id` does not exist in that manager".into())
                    }
                    e => manager_failure(&target.manager_id, e),
                })?;
            record.location.name = external_id;
            self.metadata.create_credential(&record, 0).await?;
            self.cache.replace(
                &id,
                Loaded {
                    record: Arc::new(record.clone()),
                    secrets: read.value,
                    valid_until: read.expires_in.map(|d| SystemTime::now() + d),
                },
            );
            return Ok(WriteOutcome { record });
        }

        if request.external_id.is_some() {
            return Err(ServiceError::Invalid(
                "`external_id` is only for read-only managers".into(),
            ));
        }
        let secrets = request.secrets.filter(|s| !s.is_empty()).ok_or_else(|| {
            ServiceError::Invalid("`secrets` must hold at least one field".into())
        })?;
        let _guard = self.locks.lock(&id).await;
        let name = Self::secret_name(&runtime, &target.manager_id, &environment, &id);
        let journal_id = self.journal(&id, &target.manager_id, &name).await?;
        let written = self
            .call(
                &target.manager_id,
                "put",
                backend.put(PutRequest {
                    name: &name,
                    value: &secrets,
                    expected_version: None,
                    idempotency_key: &write_token(),
                }),
            )
            .await;
        let version = match written {
            Ok(v) => v,
            Err(e) => {
                // The write may have landed anyway (a timeout); the journal entry makes sure
                // the sweeper removes whatever is there.
                return Err(manager_failure(&target.manager_id, e));
            }
        };
        record.location.name = name;
        record.location.version = Some(version);
        self.metadata.create_credential(&record, journal_id).await?;
        self.cache.replace(
            &id,
            Loaded {
                record: Arc::new(record.clone()),
                secrets,
                valid_until: expires_at.map(crate::time::from_unix),
            },
        );
        Ok(WriteOutcome { record })
    }

    pub async fn patch(
        &self,
        caller: &Caller,
        id: &str,
        request: PatchRequest,
    ) -> Result<WriteOutcome, ServiceError> {
        if !is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        if !self.allows(caller, Action::Write, None) {
            return Err(ServiceError::Forbidden);
        }
        if let Some(m) = &request.metadata {
            check_metadata(m)?;
        }
        let new_expiry = request.expires_at.as_ref().map(parse_expiry).transpose()?;
        let _guard = self.locks.lock(id).await;
        let current = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        if !self.allows(caller, Action::Write, Some(&current.environment)) {
            return Err(ServiceError::Forbidden);
        }
        let runtime = self.runtime();
        let mut next = current.clone();
        if let Some(pin) = request.secrets_manager_id {
            if let Some(p) = &pin {
                Self::manager(&runtime, p)?;
            }
            next.pinned_manager = pin;
        }
        if let Some(m) = request.metadata {
            next.metadata = m;
        }
        if let Some(e) = new_expiry {
            next.expires_at = Some(e);
        }
        if request.secrets.is_some() {
            // New secrets are how a user re-authorises: refreshing may be tried again.
            next.needs_reauth = false;
        }
        next.row_version += 1;
        next.updated_at = crate::time::now_unix();

        let target = route(
            &runtime.config.routing,
            &runtime.config.managers,
            &next.environment,
            next.pinned_manager.as_deref(),
        );
        let moving = target.manager_id != current.location.manager_id;
        let source = Self::manager(&runtime, &current.location.manager_id).ok();
        let source_read_only = source
            .as_ref()
            .is_some_and(|b| b.describe().capabilities.read_only);
        if source_read_only && (moving || request.secrets.is_some()) {
            return Err(ServiceError::ReadOnly {
                manager: current.location.manager_id,
            });
        }
        let target_backend = Self::manager(&runtime, &target.manager_id)?;
        if moving && target_backend.describe().capabilities.read_only {
            return Err(ServiceError::ReadOnly {
                manager: target.manager_id,
            });
        }

        if !moving && request.secrets.is_none() {
            self.metadata
                .update_credential(&next, current.row_version, None)
                .await?;
            self.cache.invalidate(id);
            return Ok(WriteOutcome { record: next });
        }

        // The new value is the stored one with the patched fields laid over it.
        let source = source
            .ok_or_else(|| ServiceError::UnknownManager(current.location.manager_id.clone()))?;
        let loc = &current.location;
        let mut value = self
            .call(
                &loc.manager_id,
                "get",
                source.get(&loc.name, loc.version.as_deref()),
            )
            .await
            .map_err(|e| manager_failure(&loc.manager_id, e))?
            .value;
        if let Some(patch) = request.secrets {
            value.merge(patch);
        }

        if moving {
            self.move_to(
                &runtime,
                current,
                next,
                &target.manager_id,
                &target_backend,
                &value,
            )
            .await
        } else {
            let next = self
                .write_in_place(&current, next, &target_backend, value)
                .await?;
            Ok(WriteOutcome { record: next })
        }
    }

    /// Writes a new version of a credential's secret to the store it is already in (with
    /// compare-and-swap on the recorded version where the store has it), then switches the
    /// row from `current` to `next` and replaces the cached entry. Caller holds the lock.
    async fn write_in_place(
        &self,
        current: &CredentialRecord,
        mut next: CredentialRecord,
        backend: &Arc<dyn SecretsManager>,
        value: SecretFields,
    ) -> Result<CredentialRecord, ServiceError> {
        let id = current.id.as_str();
        let loc = &current.location;
        let caps = backend.describe().capabilities;
        let idempotency_key = write_token();
        let put = |expected_version| {
            self.call(
                &loc.manager_id,
                "put",
                backend.put(PutRequest {
                    name: &loc.name,
                    value: &value,
                    expected_version,
                    idempotency_key: &idempotency_key,
                }),
            )
        };
        let expected = if caps.compare_and_swap {
            loc.version.as_deref()
        } else {
            None
        };
        // Marks a version that may land without being recorded (a timeout, a crash).
        let intent = self
            .journal_kind(JournalKind::Version, id, &loc.manager_id, &loc.name)
            .await?;
        let version = match put(expected).await {
            Err(ManagerError::Conflict) => {
                // The store moved past the recorded version. If an earlier write of ours
                // left an unrecorded version (its intent is still journaled) and the row
                // is unchanged, writing over that version loses nothing. Otherwise
                // someone else wrote to the store: report the conflict, never overwrite.
                let fresh = self
                    .metadata
                    .get_credential(id)
                    .await?
                    .ok_or(ServiceError::NotFound)?;
                let ours = self.earlier_intents(id, intent).await?;
                if fresh.row_version != current.row_version || ours.is_empty() {
                    let _ = self.metadata.journal_remove(intent).await;
                    return Err(ServiceError::Conflict);
                }
                put(None).await
            }
            other => other,
        }
        .map_err(|e| manager_failure(&loc.manager_id, e))?;
        next.location.version = Some(version);
        self.metadata
            .update_credential(&next, current.row_version, None)
            .await?;
        for entry in self
            .earlier_intents(id, intent)
            .await?
            .into_iter()
            .chain([intent])
        {
            self.metadata.journal_remove(entry).await?;
        }
        self.cache.replace(
            id,
            Loaded {
                record: Arc::new(next.clone()),
                secrets: value,
                valid_until: next.expires_at.map(crate::time::from_unix),
            },
        );
        Ok(next)
    }

    /// Copies a credential to another store, verifies the copy, switches the recorded
    /// location, and deletes the old copy. Caller holds the credential's lock.
    async fn move_to(
        &self,
        runtime: &Runtime,
        current: CredentialRecord,
        mut next: CredentialRecord,
        target_id: &str,
        target: &Arc<dyn SecretsManager>,
        value: &SecretFields,
    ) -> Result<WriteOutcome, ServiceError> {
        let id = current.id.clone();
        let name = Self::secret_name(runtime, target_id, &next.environment, &id);
        let journal_id = self.journal(&id, target_id, &name).await?;
        let version = self
            .call(
                target_id,
                "put",
                target.put(PutRequest {
                    name: &name,
                    value,
                    expected_version: None,
                    idempotency_key: &write_token(),
                }),
            )
            .await
            .map_err(|e| manager_failure(target_id, e))?;
        let copy = self
            .call(target_id, "get", target.get(&name, Some(&version)))
            .await
            .map_err(|e| manager_failure(target_id, e))?;
        if &copy.value != value {
            return Err(ServiceError::ManagerFailed {
                manager: target_id.to_owned(),
                detail: "read-back after copy differs from what was written".into(),
            });
        }
        next.location = Location {
            manager_id: target_id.to_owned(),
            name,
            version: Some(version),
        };
        let abandoned = JournalEntry {
            id: 0,
            kind: JournalKind::Copy,
            credential_id: id.clone(),
            manager_id: current.location.manager_id.clone(),
            name: current.location.name.clone(),
            created_at: crate::time::now_unix(),
        };
        let old_entry = self
            .metadata
            .update_credential(&next, current.row_version, Some(&abandoned))
            .await?;
        self.metadata.journal_remove(journal_id).await?;
        self.cache.replace(
            &id,
            Loaded {
                record: Arc::new(next.clone()),
                secrets: value.clone(),
                valid_until: next.expires_at.map(crate::time::from_unix),
            },
        );
        if let Some(entry_id) = old_entry {
            let entry = JournalEntry {
                id: entry_id,
                ..abandoned
            };
            self.settle(runtime, &entry).await;
        }
        Ok(WriteOutcome { record: next })
    }

    /// Moves one credential to where the routing chain now puts it (background migration):
    /// read, copy, read back and compare, switch the row with compare-and-swap, delete the
    /// old copy — each step journaled, under the credential's lock so writes and refreshes in
    /// this process wait, and a write from another process makes the switch fail and the
    /// move retry from the newer value.
    pub async fn migrate_one(&self, id: &str) -> Result<MoveOutcome, ServiceError> {
        let _guard = self.locks.lock(id).await;
        // One mover per credential across every process sharing the database: a claim that
        // expires on its own if its holder dies, so another instance takes the move over.
        let claim = format!("move:{id}");
        let holder = uuid::Uuid::new_v4().to_string();
        if !self
            .metadata
            .lease_acquire(&claim, &holder, MOVE_CLAIM_TTL)
            .await?
        {
            self.metrics.move_claims.with_label_values(&["busy"]).inc();
            return Ok(MoveOutcome::Claimed);
        }
        self.metrics.move_claims.with_label_values(&["taken"]).inc();
        let moved = {
            let work = self.migrate_claimed(id);
            let renew = self.renew_lease(&claim, &holder, MOVE_CLAIM_TTL);
            tokio::pin!(work, renew);
            tokio::select! {
                r = &mut work => r,
                () = &mut renew => work.await,
            }
        };
        if let Err(e) = self.metadata.lease_release(&claim, &holder).await {
            tracing::debug!(credential = id, error = %e, "could not release a move claim; it expires");
        }
        moved
    }

    async fn migrate_claimed(&self, id: &str) -> Result<MoveOutcome, ServiceError> {
        let runtime = self.runtime();
        let Some(current) = self.metadata.get_credential(id).await? else {
            return Ok(MoveOutcome::Gone);
        };
        let target = route(
            &runtime.config.routing,
            &runtime.config.managers,
            &current.environment,
            current.pinned_manager.as_deref(),
        );
        if target.manager_id == current.location.manager_id {
            return Ok(MoveOutcome::InPlace);
        }
        let source = Self::manager(&runtime, &current.location.manager_id)?;
        let target_backend = Self::manager(&runtime, &target.manager_id)?;
        if source.describe().capabilities.read_only
            || target_backend.describe().capabilities.read_only
        {
            return Ok(MoveOutcome::ReadOnly);
        }
        let loc = &current.location;
        let value = self
            .call(
                &loc.manager_id,
                "get",
                source.get(&loc.name, loc.version.as_deref()),
            )
            .await
            .map_err(|e| manager_failure(&loc.manager_id, e))?
            .value;
        let mut next = current.clone();
        next.row_version += 1;
        next.updated_at = crate::time::now_unix();
        self.move_to(
            &runtime,
            current,
            next,
            &target.manager_id,
            &target_backend,
            &value,
        )
        .await?;
        Ok(MoveOutcome::Moved)
    }

    /// Drops stores kept after their manager was removed from the configuration once no
    /// credential and no journal entry refers to them any more. Returns the ids dropped.
    pub async fn prune_retired(&self) -> Result<Vec<String>, ServiceError> {
        let runtime = self.runtime();
        let mut retired = Vec::new();
        for id in runtime.registry.ids() {
            if id != crate::config::LOCAL_MANAGER_ID
                && runtime.config.manager(id).is_none()
                && !self.metadata.manager_in_use(id).await?
            {
                retired.push(id.to_owned());
            }
        }
        if retired.is_empty() {
            return Ok(retired);
        }
        let mut registry = runtime.registry.clone();
        for id in &retired {
            registry.remove(id);
        }
        // Only if no reload happened meanwhile; otherwise the next pass prunes.
        let next = Arc::new(Runtime {
            config: Arc::clone(&runtime.config),
            registry,
            policy: runtime.policy.clone(),
        });
        let previous = self.runtime.compare_and_swap(&runtime, next);
        if !Arc::ptr_eq(&previous, &runtime) {
            return Ok(Vec::new());
        }
        Ok(retired)
    }

    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<(), ServiceError> {
        if !is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        if !self.allows(caller, Action::Write, None) {
            return Err(ServiceError::Forbidden);
        }
        let _guard = self.locks.lock(id).await;
        let current = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        if !self.allows(caller, Action::Write, Some(&current.environment)) {
            return Err(ServiceError::Forbidden);
        }
        let runtime = self.runtime();
        // For a read-only store only the reference goes; `settle` never deletes there.
        let abandoned = JournalEntry {
            id: 0,
            kind: JournalKind::Copy,
            credential_id: id.to_owned(),
            manager_id: current.location.manager_id.clone(),
            name: current.location.name.clone(),
            created_at: crate::time::now_unix(),
        };
        let entry_id = self
            .metadata
            .delete_credential(id, current.row_version, &abandoned)
            .await?;
        self.cache.invalidate(id);
        self.settle(
            &runtime,
            &JournalEntry {
                id: entry_id,
                ..abandoned
            },
        )
        .await;
        Ok(())
    }

    async fn journal(
        &self,
        credential_id: &str,
        manager_id: &str,
        name: &str,
    ) -> Result<i64, ServiceError> {
        self.journal_kind(JournalKind::Copy, credential_id, manager_id, name)
            .await
    }

    async fn journal_kind(
        &self,
        kind: JournalKind,
        credential_id: &str,
        manager_id: &str,
        name: &str,
    ) -> Result<i64, ServiceError> {
        Ok(self
            .metadata
            .journal_add(&JournalEntry {
                id: 0,
                kind,
                credential_id: credential_id.to_owned(),
                manager_id: manager_id.to_owned(),
                name: name.to_owned(),
                created_at: crate::time::now_unix(),
            })
            .await?)
    }

    /// Version intents of `credential_id` other than `current`: writes that may have landed
    /// unrecorded.
    async fn earlier_intents(
        &self,
        credential_id: &str,
        current: i64,
    ) -> Result<Vec<i64>, ServiceError> {
        Ok(self
            .metadata
            .journal_list()
            .await?
            .into_iter()
            .filter(|e| {
                e.kind == JournalKind::Version
                    && e.credential_id == credential_id
                    && e.id != current
            })
            .map(|e| e.id)
            .collect())
    }

    /// Deletes a journaled copy unless a credential refers to it, then clears the entry. A
    /// failure leaves the entry for the sweeper. Caller holds the credential's lock.
    async fn settle(&self, runtime: &Runtime, entry: &JournalEntry) -> bool {
        let settled = async {
            if entry.kind == JournalKind::Version {
                // Never a reason to delete anything; dropped once its credential is gone.
                if self
                    .metadata
                    .get_credential(&entry.credential_id)
                    .await?
                    .is_none()
                {
                    self.metadata.journal_remove(entry.id).await?;
                }
                return Ok::<bool, ServiceError>(true);
            }
            if self
                .metadata
                .location_in_use(&entry.manager_id, &entry.name)
                .await?
            {
                self.metadata.journal_remove(entry.id).await?;
                return Ok::<bool, ServiceError>(true);
            }
            let Ok(backend) = Self::manager(runtime, &entry.manager_id) else {
                return Ok(false);
            };
            if backend.describe().capabilities.read_only {
                self.metadata.journal_remove(entry.id).await?;
                return Ok(true);
            }
            self.call(&entry.manager_id, "delete", backend.delete(&entry.name))
                .await
                .map_err(|e| manager_failure(&entry.manager_id, e))?;
            self.metadata.journal_remove(entry.id).await?;
            Ok(true)
        }
        .await;
        match settled {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(credential = %entry.credential_id, manager = %entry.manager_id, error = %e,
                    "could not remove an abandoned secret copy yet; will retry");
                false
            }
        }
    }

    /// Settles journal entries older than `min_age` (younger ones may belong to a write in
    /// flight in another process). Returns how many remain.
    pub async fn sweep_journal(&self, min_age: Duration) -> Result<usize, ServiceError> {
        let entries = self.metadata.journal_list().await?;
        let runtime = self.runtime();
        let cutoff = crate::time::now_unix() - min_age.as_secs() as i64;
        let mut remaining = 0;
        for entry in entries {
            if entry.created_at > cutoff {
                remaining += 1;
                continue;
            }
            let _guard = self.locks.lock(&entry.credential_id).await;
            if !self.settle(&runtime, &entry).await {
                remaining += 1;
            }
        }
        self.metrics.journal_pending.set(remaining as i64);
        Ok(remaining)
    }
}

pub(crate) async fn call_manager<T>(
    metrics: &Metrics,
    timeout: Duration,
    manager_id: &str,
    operation: &'static str,
    fut: impl Future<Output = Result<T, ManagerError>>,
) -> Result<T, ManagerError> {
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ManagerError::Timeout),
    };
    let outcome = match &result {
        Ok(_) => "success",
        Err(e) => e.outcome(),
    };
    metrics
        .backend_requests
        .with_label_values(&[manager_id, operation, outcome])
        .inc();
    metrics
        .backend_duration
        .with_label_values(&[manager_id, operation])
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        tracing::debug!(manager = manager_id, operation, error = %e, "secrets manager call failed");
    }
    result
}

fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn check_metadata(m: &serde_json::Map<String, serde_json::Value>) -> Result<(), ServiceError> {
    let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(ServiceError::Invalid(format!(
            "`metadata` is larger than {MAX_METADATA_BYTES} bytes"
        )));
    }
    Ok(())
}

fn check_oauth(o: OAuthInput) -> Result<OAuthDescription, ServiceError> {
    check_token_url(&o.token_url)?;
    if o.client_id.is_empty() || o.client_id.len() > 512 {
        return Err(ServiceError::Invalid(
            "`oauth.client_id` must be 1-512 characters".into(),
        ));
    }
    Ok(OAuthDescription {
        token_url: o.token_url,
        client_id: o.client_id,
        scopes: o.scopes,
        client_auth: o.client_auth.unwrap_or_default(),
    })
}

/// The client secret and refresh token go to this URL: HTTPS only, except to this host itself
/// (a local token endpoint or a test server), and no credentials or fragment in the URL.
fn check_token_url(raw: &str) -> Result<(), ServiceError> {
    let invalid = |why: &str| ServiceError::Invalid(format!("`oauth.token_url` {why}"));
    if raw.len() > 2048 {
        return Err(invalid("is longer than 2048 characters"));
    }
    let url = url::Url::parse(raw).map_err(|_| invalid("is not a valid URL"))?;
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(invalid("must not carry credentials or a fragment"));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(invalid(
            "must use https (plain http only to a loopback address)",
        )),
        _ => Err(invalid("must be an https URL")),
    }
}

fn parse_expiry(v: &serde_json::Value) -> Result<i64, ServiceError> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => crate::time::parse_rfc3339(s),
        _ => None,
    }
    .ok_or_else(|| ServiceError::Invalid("`expires_at` must be RFC 3339 or Unix seconds".into()))
}

/// A fresh idempotency token per logical write (AWS wants 32-64 characters). A token reused
/// for a different value is an error there, so it is never derived from the row version.
fn write_token() -> String {
    uuid::Uuid::new_v4().to_string()
}
