//! The use cases behind the API: create, resolve, change and delete credentials, list what a
//! manager holds, and clean up copies that a crash, move or delete left behind.

mod bypass;
mod error;
mod events;
mod failures;
mod input;
mod journal;
mod locks;
mod moves;
mod reads;
mod refresh;
mod writes;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

pub use error::ServiceError;
pub use events::EventPage;
pub(crate) use input::{check_fields, check_patch, check_scope, CreateFields};
pub use input::{CreateRequest, OAuthInput, PatchRequest};
pub use moves::MoveOutcome;
pub use refresh::{Refreshed, Trigger};
pub use writes::WriteOutcome;

use crate::access::{Action, Caller, Policy, Scope};
use crate::cache::{Cache, Entry};
use crate::config::{Config, DEFAULT_WORKSPACE};
use crate::manager::local::Keyring;
use crate::manager::{ManagerError, Registry, SecretsManager};
use crate::metadata::{CredentialRecord, Metadata};
use crate::metrics::Metrics;
use crate::routing::Topology;
use locks::KeyedLocks;

/// The configuration in force and everything built from it; swapped whole on reload.
pub struct Runtime {
    pub config: Arc<Config>,
    pub registry: Registry,
    pub policy: Policy,
    /// Every manager in force (file and API) and every workspace's routing.
    pub topology: Topology,
    /// The control plane's version `topology` was built from (-1 before the first build).
    pub control_version: i64,
}

impl Runtime {
    /// What instances of a fleet must agree on before anything moves: the managers and
    /// routing of the configuration file, which instances may run different versions of
    /// during a rollout. The control plane's rows are not in it: every instance reads the same
    /// ones and hears of a change within `store.poll_interval`, and none moves on an older
    /// control version than the database's (see `Migrator`), so a change through the API costs
    /// no write per instance.
    pub fn epoch(&self) -> String {
        Topology::from_config(&self.config).hash()
    }
}

pub struct Service {
    runtime: Arc<ArcSwap<Runtime>>,
    metadata: Arc<dyn Metadata>,
    cache: Cache<ServiceError>,
    metrics: Arc<Metrics>,
    locks: KeyedLocks,
    bypasses: bypass::BypassLimiter,
    keys: Arc<Keyring>,
    oauth: refresh::OAuthState,
    events: events::EventSink,
    /// Told when this instance records a purge, so its purger looks soon after.
    purge_recorded: Arc<tokio::sync::Notify>,
    /// This process among the instances sharing the metadata database.
    instance: String,
    /// The epoch last recorded by a heartbeat.
    recorded_epoch: tokio::sync::Mutex<Option<String>>,
}

/// While the metadata database refuses writes, the heartbeat is retried this often: its
/// success is what makes the instance ready again.
pub const HEARTBEAT_RETRY: Duration = Duration::from_secs(2);

impl Service {
    pub fn new(
        runtime: Runtime,
        metadata: Arc<dyn Metadata>,
        metrics: Arc<Metrics>,
        keys: Arc<Keyring>,
    ) -> Self {
        let oauth = refresh::OAuthState::new(&runtime.config.oauth);
        let c = &runtime.config.cache;
        let events = events::EventSink::new(Arc::clone(&metadata), Arc::clone(&metrics));
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
            bypasses: bypass::BypassLimiter::default(),
            keys,
            oauth,
            events,
            purge_recorded: Arc::default(),
            instance: uuid::Uuid::new_v4().to_string(),
            recorded_epoch: tokio::sync::Mutex::new(None),
        }
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Notified whenever this instance records an event that has a webhook to go to.
    pub fn events_recorded(&self) -> Arc<tokio::sync::Notify> {
        self.events.recorded_signal()
    }

    /// Notified whenever this instance records a purge of a soft-deleted secret.
    pub fn purge_recorded(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.purge_recorded)
    }

    pub fn instance_id(&self) -> &str {
        &self.instance
    }

    /// Records this instance as alive with the routing configuration it runs now.
    pub async fn heartbeat(&self) -> Result<(), ServiceError> {
        // One at a time, the epoch read under the lock: a periodic heartbeat that read the old
        // epoch must not land after a reload recorded the new one.
        let mut recorded = self.recorded_epoch.lock().await;
        let epoch = self.runtime.load().epoch();
        self.metadata
            .instance_heartbeat(&self.instance, &epoch)
            .await?;
        *recorded = Some(epoch);
        Ok(())
    }

    /// Records the routing configuration this instance runs if it is not the one last
    /// recorded (after a reload or a control-plane change); otherwise writes nothing.
    pub async fn record_epoch(&self) -> Result<(), ServiceError> {
        let epoch = self.runtime.load().epoch();
        if self.recorded_epoch.lock().await.as_ref() == Some(&epoch) {
            return Ok(());
        }
        self.heartbeat().await
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

    pub fn allows(&self, caller: &Caller, action: Action, scope: Scope<'_>) -> bool {
        self.runtime.load().policy.allows(caller, action, scope)
    }

    /// Whether `caller` may do `action` on `record`. A caller no rule lets see the record (its
    /// workspace or its environment) is told it does not exist, exactly as for an id that does
    /// not: no answer reveals what another workspace or environment holds. A caller that sees
    /// it but may not do `action` (read it with only the `use` right, say) is told `Forbidden`.
    fn check_access(
        &self,
        caller: &Caller,
        action: Action,
        record: &CredentialRecord,
    ) -> Result<(), ServiceError> {
        self.check_access_in(caller, action, &record.workspace, &record.environment)
    }

    /// `check_access` for a cached credential, read or used.
    fn check_entry_access(
        &self,
        caller: &Caller,
        entry: &Entry,
        action: Action,
    ) -> Result<(), ServiceError> {
        self.check_access_in(caller, action, entry.workspace(), entry.environment())
    }

    fn check_access_in(
        &self,
        caller: &Caller,
        action: Action,
        workspace: &str,
        environment: &str,
    ) -> Result<(), ServiceError> {
        let policy = &self.runtime.load().policy;
        let scope = Scope::credential(workspace, environment);
        if !policy.allows(caller, Action::View, scope) {
            return Err(ServiceError::NotFound);
        }
        if !policy.allows(caller, action, scope) {
            return Err(ServiceError::Forbidden);
        }
        Ok(())
    }

    /// Keeps this instance's cache coherent with others sharing the metadata database: drops
    /// what they changed, everything after a lost connection. Runs until `stop`.
    /// Drops what other instances changed from the cache. `changes` is subscribed by the
    /// caller before it spawns this, so nothing sent in between is missed.
    pub async fn follow_invalidations(
        &self,
        changes: Option<tokio::sync::broadcast::Receiver<crate::metadata::Invalidation>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let Some(mut changes) = changes else {
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
                // The control plane is not followed yet; its reload is wired separately.
                Ok(crate::metadata::Invalidation::Control) => {}
                Ok(crate::metadata::Invalidation::All) | Err(RecvError::Lagged(_)) => {
                    self.metrics.invalidations.with_label_values(&["all"]).inc();
                    self.cache.invalidate_all();
                }
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Drops cached credentials past their stale limit (see [`Cache::sweep`]), and bypass
    /// times that no longer limit anything.
    pub fn sweep_cache(&self) {
        let interval = self.runtime.load().config.cache.bypass_interval;
        self.bypasses
            .forget_older_than(interval, tokio::time::Instant::now());
        let swept = self.cache.sweep();
        if swept > 0 {
            tracing::debug!(swept, "dropped expired credentials from the cache");
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
            .ok_or_else(|| ServiceError::ManagerNotLoaded(manager_id.to_owned()))
    }

    /// Runs one secrets manager call with the configured timeout and records it in the metrics.
    async fn call<T>(
        &self,
        manager_id: &str,
        operation: &'static str,
        fut: impl Future<Output = Result<T, ManagerError>>,
    ) -> Result<T, ManagerError> {
        let runtime = self.runtime.load();
        let label = runtime.topology.metric_label(manager_id);
        let timeout = runtime.config.manager_timeout;
        drop(runtime);
        call_manager(&self.metrics, timeout, manager_id, &label, operation, fut).await
    }

    /// The name a credential's secret gets in `manager_id`: `{prefix}{environment}/{id}` in the
    /// `default` workspace (as before workspaces existed), `{prefix}workspaces/{workspace}/
    /// {environment}/{id}` in any other, so that workspaces sharing a manager never collide
    /// and a policy can grant one workspace by name prefix.
    fn secret_name(
        runtime: &Runtime,
        manager_id: &str,
        workspace: &str,
        environment: &str,
        id: &str,
    ) -> String {
        let prefix = runtime
            .topology
            .manager(manager_id)
            .map(|m| m.prefix.as_str())
            .unwrap_or("");
        secret_name(prefix, workspace, environment, id)
    }
}

/// `Service::secret_name` for a manager with `prefix`.
pub(crate) fn secret_name(prefix: &str, workspace: &str, environment: &str, id: &str) -> String {
    if workspace == DEFAULT_WORKSPACE {
        format!("{prefix}{environment}/{id}")
    } else {
        format!("{prefix}workspaces/{workspace}/{environment}/{id}")
    }
}

/// `label` is the manager's metric label (`Topology::metric_label`).
pub(crate) async fn call_manager<T>(
    metrics: &Metrics,
    timeout: Duration,
    manager_id: &str,
    label: &str,
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
        .with_label_values(&[label, operation, outcome])
        .inc();
    metrics
        .backend_duration
        .with_label_values(&[label, operation])
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        failures::log(manager_id, operation, e);
    }
    result
}
