//! Reads: resolving a credential (through the cache) or a batch of them, listing what a
//! secrets manager holds, and where the routing chain puts an environment.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;

use super::error::manager_failure;
use super::{call_manager, Service, ServiceError};
use crate::access::{Action, Caller, Scope};
use crate::cache::{CacheStatus, Entry, Loaded, Lookup};
use crate::config::{is_valid_name, DEFAULT_WORKSPACE};
use crate::manager::{ListRequest, ManagerError, Page};
use crate::metadata::EventKind;
use crate::routing::Route;

/// The most credentials one batch read may ask for.
pub const MAX_BATCH: usize = 100;

/// How many of a batch's credentials are resolved at a time (cache hits take no time; misses
/// are loads from a secrets manager, each bounded by its timeout).
const BATCH_LOADS: usize = 16;

impl Service {
    /// Resolves a credential, from the cache when fresh. Access is checked against the
    /// credential's workspace and environment before anything is returned, and before a
    /// secrets manager is asked when nothing is cached. A fresh entry costs one cache lookup.
    pub async fn get(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        self.resolve(caller, id, Action::Read).await
    }

    /// [`Self::get`] for `action`: `Read` hands the secret to the caller, `Use` applies it to
    /// a call through the egress proxy (the caller never sees it).
    pub async fn resolve(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        action: Action,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        if !self.allows(caller, action, Scope::ANY) {
            return Err(ServiceError::Forbidden);
        }
        if !is_valid_name(id) {
            return Err(ServiceError::NotFound);
        }
        let (entry, status) = match self.cache.lookup(id) {
            Lookup::Fresh(entry) => (entry, CacheStatus::Hit),
            // Boxed: a miss's state would otherwise make every read's future larger.
            Lookup::Expired(_) => Box::pin(self.load_checked(caller, id, action)).await?,
        };
        self.metrics.cache_result(status.as_str()).inc();
        self.check_entry_access(caller, &entry, action)?;
        self.checked_token(id, entry, status).await
    }

    /// Resolves up to [`MAX_BATCH`] credentials for one caller, each exactly as [`Self::get`]
    /// would (an id the caller may not read is not found, like one that does not exist), in
    /// the order asked. Misses load [`BATCH_LOADS`] at a time, through the cache's single
    /// flight. The whole request is refused if the caller may read nothing at all, or if an id
    /// is malformed or repeated (the detail names its position, never the id).
    pub async fn get_many(
        self: &Arc<Self>,
        caller: &Caller,
        ids: &[String],
    ) -> Result<Vec<Result<(Arc<Entry>, CacheStatus), ServiceError>>, ServiceError> {
        if !self.allows(caller, Action::Read, Scope::ANY) {
            return Err(ServiceError::Forbidden);
        }
        if ids.is_empty() || ids.len() > MAX_BATCH {
            return Err(ServiceError::Invalid(format!(
                "`ids` must hold 1 to {MAX_BATCH} credential ids"
            )));
        }
        let mut seen = std::collections::HashMap::with_capacity(ids.len());
        for (position, id) in ids.iter().enumerate() {
            if !is_valid_name(id) {
                return Err(ServiceError::Invalid(format!(
                    "`ids[{position}]` is not a credential id"
                )));
            }
            if let Some(first) = seen.insert(id.as_str(), position) {
                return Err(ServiceError::Invalid(format!(
                    "`ids[{position}]` repeats `ids[{first}]`"
                )));
            }
        }
        // The reads made up front, not in a `map` over the stream: a closure there makes the
        // future's `Send` depend on a higher-ranked lifetime the compiler cannot prove.
        let reads: Vec<_> = ids.iter().map(|id| self.get(caller, id)).collect();
        Ok(futures::stream::iter(reads)
            .buffered(BATCH_LOADS)
            .collect()
            .await)
    }

    /// A read the cache could not answer: access is checked against the metadata database's
    /// row before a secrets manager is asked.
    async fn load_checked(
        self: &Arc<Self>,
        caller: &Caller,
        id: &str,
        action: Action,
    ) -> Result<(Arc<Entry>, CacheStatus), ServiceError> {
        let (since, record) = self.readable_row(caller, id, action).await?;
        // Looked up again: a read of the same id may have loaded it meanwhile, and loading it
        // a second time is what single flight is there to prevent.
        // The row just read starts the load: reading it again would add a second trip to the
        // metadata database to every cold read.
        self.cache
            .get_or_load_since(id, Some(since), || {
                self.loader_from(id.to_owned(), Some(record))
            })
            .await
    }

    /// The credential's row, if `caller` may read it, and the cache's invalidation count taken
    /// before it was read: an invalidation (a write, a delete, another instance's change)
    /// landing after that moment must keep a load started from this row out of the cache.
    pub(super) async fn readable_row(
        &self,
        caller: &Caller,
        id: &str,
        action: Action,
    ) -> Result<(u64, crate::metadata::CredentialRecord), ServiceError> {
        let since = self.cache.generation();
        let record = self
            .metadata
            .get_credential(id)
            .await?
            .ok_or(ServiceError::NotFound)?;
        self.check_access(caller, action, &record)?;
        Ok((since, record))
    }

    pub(super) fn loader(
        &self,
        id: String,
    ) -> impl Future<Output = Result<Loaded, ServiceError>> + Send + 'static {
        self.loader_from(id, None)
    }

    /// Loads `id` starting from `row` when the caller has just read it, else from a fresh read.
    pub(super) fn loader_from(
        &self,
        id: String,
        row: Option<crate::metadata::CredentialRecord>,
    ) -> impl Future<Output = Result<Loaded, ServiceError>> + Send + 'static {
        let metadata = Arc::clone(&self.metadata);
        let runtimes = Arc::clone(&self.runtime);
        let metrics = Arc::clone(&self.metrics);
        let events = self.events.clone();
        async move {
            let mut record = match row {
                Some(row) => row,
                None => metadata
                    .get_credential(&id)
                    .await?
                    .ok_or(ServiceError::NotFound)?,
            };
            let mut attempts = 0;
            let (read, read_only) = loop {
                // Loaded per attempt: a reload may have brought the manager the row now names.
                let runtime = runtimes.load();
                let timeout = runtime.config.manager_timeout;
                let manager = Self::manager(&runtime, &record.location.manager_id)?;
                let loc = &record.location;
                let read = call_manager(
                    &metrics,
                    timeout,
                    &loc.manager_id,
                    &runtime.topology.metric_label(&loc.manager_id),
                    "get",
                    manager.get(&loc.name, loc.version.as_deref()),
                )
                .await;
                match read {
                    Ok(read) => break (read, manager.describe().capabilities.read_only),
                    // A move (or write) may have switched the location and deleted the copy
                    // between reading the row and reading the manager: follow the new row.
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
                    Err(ManagerError::AccountInactive(reason)) => {
                        // The account behind it (a Composio connected account) is no longer
                        // usable: its user has to reconnect it, and the platform is told.
                        let config = runtime.config.events.clone();
                        drop(runtime);
                        if let Err(e) = events
                            .flag(
                                &config,
                                record.clone(),
                                true,
                                EventKind::AccountInactive,
                                &reason,
                            )
                            .await
                        {
                            tracing::warn!(credential = %id, error = %e, "could not record that the credential's account is unusable");
                        }
                        return Err(manager_failure(
                            &record.location.manager_id,
                            ManagerError::AccountInactive(reason),
                        ));
                    }
                    Err(e) => return Err(manager_failure(&record.location.manager_id, e)),
                }
            };
            if record.needs_reauth && read_only {
                // A store credproxy never writes to set the flag only for an unusable
                // account, and it has just handed the credential out: usable again.
                let config = runtimes.load().config.events.clone();
                match events
                    .flag(
                        &config,
                        record.clone(),
                        false,
                        EventKind::AccountActive,
                        "the account is usable again",
                    )
                    .await
                {
                    Ok(now) => record = now,
                    Err(e) => {
                        tracing::warn!(credential = %id, error = %e, "could not record that the credential's account is usable again")
                    }
                }
            }
            let valid_until = earliest(
                record.expires_at_ms.map(crate::time::from_unix_ms),
                read.expires_in.map(crate::time::from_now),
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
        let runtime = self.runtime();
        // A manager of a workspace the caller cannot see is answered like one that does not
        // exist.
        let entry = runtime.topology.manager(manager_id);
        if entry.is_none() && manager_id != crate::config::LOCAL_MANAGER_ID {
            return Err(ServiceError::UnknownManager(manager_id.to_owned()));
        }
        let workspace = entry.map_or(DEFAULT_WORKSPACE, |m| m.workspace.as_str());
        if !self.allows(caller, Action::View, Scope::workspace(workspace)) {
            return Err(ServiceError::UnknownManager(manager_id.to_owned()));
        }
        if !self.allows(caller, Action::Admin, Scope::workspace(workspace)) {
            return Err(ServiceError::Forbidden);
        }
        let manager = Self::manager(&runtime, manager_id)?;
        self.call(manager_id, "list", manager.list(request))
            .await
            .map_err(|e| manager_failure(manager_id, e))
    }

    pub fn route_for(&self, workspace: &str, environment: &str, pin: Option<&str>) -> Route {
        self.runtime
            .load()
            .topology
            .route(workspace, environment, pin)
    }
}

pub(super) fn earliest(a: Option<SystemTime>, b: Option<SystemTime>) -> Option<SystemTime> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
