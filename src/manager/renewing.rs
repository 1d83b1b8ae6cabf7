//! Access that renews itself. Every configured manager is wrapped so that a request the store
//! refuses for want of access (`Denied`: a revoked Vault token, an Entra token Key Vault no
//! longer accepts, AWS keys rotated out) builds the manager afresh — re-reading its access
//! details from their files, logging in again, asking for a new token — and is retried once on
//! the new client. Renewals are single-flight and back off per manager while the fresh access is
//! refused too, so a secret that is wrong for good does not turn every request into a login.
//! Files holding access details are also watched: when their content changes the manager is
//! rebuilt before the store has to refuse anything. Requests in flight finish on the client they
//! started with.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{
    ListRequest, ManagerError, ManagerInfo, Page, Purge, PutRequest, SecretsManager, Versioned,
};
use crate::config::{ConfigError, ManagerConfig};

/// Told the outcome of every renewal (for a metric): `renewed`, `refused_again`, `backed_off`,
/// `rotated` or `build_failed`.
pub type Observer = Arc<dyn Fn(&'static str) + Send + Sync>;

/// An observer counting into `credproxy_backend_access_renewals_total` under the manager's
/// metric `label` (its id for the file's managers, `api:{type}` for the API's).
pub fn counting(metrics: Arc<crate::metrics::Metrics>, label: String) -> Observer {
    Arc::new(move |outcome| {
        metrics
            .access_renewals
            .with_label_values(&[&label, outcome])
            .inc()
    })
}

/// The wait after the first renewal whose fresh access was refused too; doubles up to `MAX`.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

struct Current {
    manager: Arc<dyn SecretsManager>,
    generation: u64,
}

struct State {
    /// Renewals in a row whose fresh access was refused as well (or that could not build).
    refusals: u32,
    /// The client generation a refusal was last counted for: requests refused together on
    /// one fresh client count once.
    counted: Option<u64>,
    /// No renewal before this, after refusals.
    not_before: Option<Instant>,
}

pub struct Renewing {
    config: ManagerConfig,
    current: ArcSwap<Current>,
    generation: AtomicU64,
    state: tokio::sync::Mutex<State>,
    /// SHA-256 over the files holding access details, as last built from.
    files: std::sync::Mutex<[u8; 32]>,
    observer: Observer,
}

/// Builds `config`'s manager wrapped in `Renewing`.
pub async fn build(
    config: &ManagerConfig,
    observer: Observer,
) -> Result<Arc<dyn SecretsManager>, ConfigError> {
    let fingerprint = fingerprint(&access_files(&config.settings));
    let manager = super::build(config).await?;
    Ok(Arc::new(Renewing {
        config: config.clone(),
        current: ArcSwap::from_pointee(Current {
            manager,
            generation: 0,
        }),
        generation: AtomicU64::new(0),
        state: tokio::sync::Mutex::new(State {
            refusals: 0,
            counted: None,
            not_before: None,
        }),
        files: std::sync::Mutex::new(fingerprint),
        observer,
    }))
}

/// The files a manager's settings read access details from (`{ file = "/path" }`, at any
/// depth).
fn access_files(settings: &toml::Table) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for value in settings.values() {
        if let toml::Value::Table(t) = value {
            match (t.len(), t.get("file")) {
                (1, Some(toml::Value::String(path))) => out.push(PathBuf::from(path)),
                _ => out.extend(access_files(t)),
            }
        }
    }
    out
}

/// A digest of the files' contents; a file that cannot be read counts as empty (a symlink swap
/// in progress reads as a change, and the next check settles it).
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
    let mut digest = Sha256::new();
    for path in files {
        let content = zeroize::Zeroizing::new(std::fs::read(path).unwrap_or_default());
        digest.update((content.len() as u64).to_be_bytes());
        digest.update(&*content);
    }
    digest.finalize().into()
}

impl State {
    /// One more failed renewal: the next waits twice as long (1 s up to 5 min).
    fn back_off(&mut self) -> Duration {
        self.refusals = self.refusals.saturating_add(1);
        let wait = BACKOFF_MIN
            .saturating_mul(1 << self.refusals.saturating_sub(1).min(16))
            .min(BACKOFF_MAX);
        self.not_before = Some(Instant::now() + wait);
        wait
    }
}

/// What stands in for a client whose access details were rotated to something that cannot
/// even be built: the old client must not go on using a value that was rotated out.
struct Unusable {
    info: ManagerInfo,
    reason: String,
}

#[async_trait]
impl SecretsManager for Unusable {
    fn describe(&self) -> ManagerInfo {
        self.info.clone()
    }

    async fn get(&self, _: &str, _: Option<&str>) -> Result<Versioned, ManagerError> {
        Err(ManagerError::Denied(self.reason.clone()))
    }

    async fn put(&self, _: PutRequest<'_>) -> Result<String, ManagerError> {
        Err(ManagerError::Denied(self.reason.clone()))
    }

    async fn delete(&self, _: &str) -> Result<(), ManagerError> {
        Err(ManagerError::Denied(self.reason.clone()))
    }

    async fn list(&self, _: ListRequest) -> Result<Page, ManagerError> {
        Err(ManagerError::Denied(self.reason.clone()))
    }
}

impl Renewing {
    fn now(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// Runs `call` on the current client; if the store refuses access, renews (or waits for a
    /// renewal another request started) and runs it once more on the fresh client.
    async fn with_renewal<T, F, Fut>(&self, call: F) -> Result<T, ManagerError>
    where
        F: Fn(Arc<dyn SecretsManager>) -> Fut,
        Fut: Future<Output = Result<T, ManagerError>>,
    {
        let current = self.now();
        let refused = match call(Arc::clone(&current.manager)).await {
            Err(ManagerError::Denied(reason)) => reason,
            other => return other,
        };
        let Some(fresh) = self.renew(current.generation, &refused).await else {
            return Err(ManagerError::Denied(refused));
        };
        let result = call(Arc::clone(&fresh.manager)).await;
        let mut state = self.state.lock().await;
        match &result {
            Err(ManagerError::Denied(_)) if state.counted == Some(fresh.generation) => {}
            Err(ManagerError::Denied(reason)) => {
                state.counted = Some(fresh.generation);
                let wait = state.back_off();
                (self.observer)("refused_again");
                tracing::warn!(
                    manager = %self.config.id,
                    error = %reason,
                    next_renewal_in = ?wait,
                    "the secrets manager refused freshly renewed access too; check its access details"
                );
            }
            _ => {
                state.refusals = 0;
                state.not_before = None;
            }
        }
        result
    }

    /// A fresh client, unless one was made since `seen` (then that one), or renewals are backing
    /// off, or the manager cannot be built.
    async fn renew(&self, seen: u64, refused: &str) -> Option<Arc<Current>> {
        let mut state = self.state.lock().await;
        let current = self.now();
        if current.generation != seen {
            return Some(current);
        }
        if state.not_before.is_some_and(|t| Instant::now() < t) {
            (self.observer)("backed_off");
            return None;
        }
        tracing::info!(manager = %self.config.id, error = %refused,
            "the secrets manager refused access; renewing it (new token or login, access details re-read)");
        let fresh = self.rebuild("renewed").await;
        if fresh.is_none() {
            state.back_off();
        }
        fresh
    }

    /// Builds the manager again from its configuration and swaps it in. The caller holds
    /// `state`, so one rebuild runs at a time.
    async fn rebuild(&self, outcome: &'static str) -> Option<Arc<Current>> {
        let files = access_files(&self.config.settings);
        let fingerprint = fingerprint(&files);
        match super::build(&self.config).await {
            Ok(manager) => {
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                let fresh = Arc::new(Current {
                    manager,
                    generation,
                });
                self.current.store(Arc::clone(&fresh));
                *self.files.lock().unwrap_or_else(|p| p.into_inner()) = fingerprint;
                (self.observer)(outcome);
                Some(fresh)
            }
            Err(e) => {
                (self.observer)("build_failed");
                tracing::warn!(manager = %self.config.id, error = %e,
                    "cannot build the secrets manager with its current access details; keeping the previous client");
                None
            }
        }
    }
}

#[async_trait]
impl SecretsManager for Renewing {
    fn describe(&self) -> ManagerInfo {
        self.now().manager.describe()
    }

    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError> {
        self.with_renewal(|m| async move { m.get(name, version).await })
            .await
    }

    async fn put(&self, request: PutRequest<'_>) -> Result<String, ManagerError> {
        self.with_renewal(|m| async move { m.put(request).await })
            .await
    }

    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        self.with_renewal(|m| async move { m.delete(name).await })
            .await
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        self.with_renewal(|m| {
            let request = request.clone();
            async move { m.list(request).await }
        })
        .await
    }

    async fn probe(&self) -> Result<(), ManagerError> {
        self.with_renewal(|m| async move { m.probe().await }).await
    }

    fn purges_after_delete(&self) -> bool {
        self.now().manager.purges_after_delete()
    }

    /// Not renewed on a refusal: a purge refused for want of the purge permission (Key
    /// Vault's 403) says nothing about the access itself, and renewing on it would put the
    /// manager's renewals into back-off for every other call. Access that really expired is
    /// renewed by the next read or write; the purge is tried again later anyway.
    async fn purge_deleted(&self, name: &str) -> Result<Purge, ManagerError> {
        self.now().manager.purge_deleted(name).await
    }

    async fn renew_if_rotated(&self) {
        let files = access_files(&self.config.settings);
        if files.is_empty() {
            return;
        }
        let now = fingerprint(&files);
        if *self.files.lock().unwrap_or_else(|p| p.into_inner()) == now {
            return;
        }
        let mut state = self.state.lock().await;
        tracing::info!(manager = %self.config.id,
            "a file holding the secrets manager's access details changed; rebuilding its client");
        if self.rebuild("rotated").await.is_some() {
            // New access details deserve a renewal at once if the store refuses them.
            state.refusals = 0;
            state.not_before = None;
        } else {
            // The old value was rotated out: calls are refused until the files hold something
            // that builds (checked again when they change, or when a refusal renews).
            *self.files.lock().unwrap_or_else(|p| p.into_inner()) = now;
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            let info = self.now().manager.describe();
            self.current.store(Arc::new(Current {
                manager: Arc::new(Unusable {
                    info,
                    reason: "its access details were rotated to a value that cannot be used; see the daemon's log".into(),
                }),
                generation,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_files_are_found_at_any_depth_and_only_as_file_references() {
        let settings: toml::Table = toml::from_str(
            r#"
address = "http://127.0.0.1:8200"
ca_file = "/etc/ca.pem"
token = { file = "/run/token" }
[approle]
role_id = { env = "ROLE" }
secret_id = { file = "/run/secret-id" }
"#,
        )
        .unwrap();
        let mut files = access_files(&settings);
        files.sort();
        assert_eq!(
            files,
            vec![PathBuf::from("/run/secret-id"), PathBuf::from("/run/token")]
        );
    }
}
