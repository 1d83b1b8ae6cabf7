//! Background migration: after a reload (and at every start, which is how an interrupted
//! migration resumes), plan which credentials are no longer where the routing chain puts
//! them, and move them with per-store concurrency and rate limits, retrying failures with
//! back-off. The move of one credential is the service's (`Service::migrate_one`); this
//! module owns the plan, the pacing and the progress report.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;

mod plan;

pub use plan::{plan, plan_one, summarize, PlannedMove};

use crate::config::MigrationConfig;
use crate::routing::Topology;
use crate::service::{MoveOutcome, Service, ServiceError};

/// When moves another instance claimed are looked at again (a crashed claimant's claim has
/// expired by then).
const CLAIM_RECHECK: Duration = Duration::from_secs(6);
/// How soon the fleet is asked again while instances disagree on the configuration.
const FLEET_RECHECK: Duration = Duration::from_secs(2);
/// Moves waiting this long for the control plane to be applied here are logged as a warning.
const CONTROL_BEHIND_WARN: Duration = Duration::from_secs(60);
/// Failures listed in the status at most.
const MAX_LISTED_FAILURES: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct PairStatus {
    pub source: String,
    pub target: String,
    pub pending: usize,
    pub moved: u64,
    pub failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailureStatus {
    pub id: String,
    pub source: String,
    pub target: String,
    pub error: String,
    pub attempts: u32,
    pub retry_in_seconds: u64,
}

/// `GET /v1/migrations`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationStatus {
    /// `idle`, `pending` (planned, not started), `moving`, or `waiting_for_fleet` (instances
    /// sharing the database run different routing configurations; nothing moves until they
    /// agree).
    pub state: &'static str,
    pub planned_at: Option<String>,
    pub pending: usize,
    pub moves: Vec<PairStatus>,
    pub failures: Vec<FailureStatus>,
}

struct Failure {
    source: String,
    target: String,
    error: String,
    attempts: u32,
    retry_at: Instant,
}

#[derive(Default)]
struct State {
    moving: bool,
    /// Other routing configurations live instances run (moves wait until it is 0).
    waiting_for: usize,
    /// Since when the database's control version has been ahead of the one applied here.
    control_behind_since: Option<std::time::Instant>,
    /// Some moves were claimed by another instance during this pass.
    recheck: bool,
    planned_at: Option<i64>,
    /// Reloads that woke the migrator: a pass that began before the last one planned with the
    /// routing that reload replaced.
    wakes: u64,
    /// (source, target) → ids still to move.
    pending: BTreeMap<(String, String), Vec<String>>,
    moved: BTreeMap<(String, String), u64>,
    failures: HashMap<String, Failure>,
    /// The label pairs `credproxy_migration_pending` was last set for, so that a pair that
    /// is done goes back to 0.
    published: BTreeMap<(String, String), i64>,
}

/// Makes `planned` the moves the status shows as pending, planned now.
fn set_plan(
    state: &mut State,
    planned: &[PlannedMove],
    metrics: &crate::metrics::Metrics,
    topology: &Topology,
) {
    state.pending.clear();
    for m in planned {
        state
            .pending
            .entry((m.source.clone(), m.target.clone()))
            .or_default()
            .push(m.id.clone());
    }
    state.planned_at = Some(crate::time::now_unix());
    publish_pending(state, metrics, topology);
}

/// Sets `credproxy_migration_pending` from `state.pending`, summed per label pair (managers
/// created through the API share one label per type).
fn publish_pending(state: &mut State, metrics: &crate::metrics::Metrics, topology: &Topology) {
    let mut sums: BTreeMap<(String, String), i64> = BTreeMap::new();
    for ((source, target), ids) in &state.pending {
        let key = (topology.metric_label(source), topology.metric_label(target));
        *sums.entry(key).or_default() += ids.len() as i64;
    }
    for key in state.published.keys() {
        if !sums.contains_key(key) {
            metrics
                .migration_pending
                .with_label_values(&[&key.0, &key.1])
                .set(0);
        }
    }
    for (key, n) in &sums {
        metrics
            .migration_pending
            .with_label_values(&[&key.0, &key.1])
            .set(*n);
    }
    state.published = sums;
}

/// Limits per store: moves in flight and moves started per second.
struct StoreLimit {
    slots: Semaphore,
    next_start: Mutex<Instant>,
    interval: Option<Duration>,
}

impl StoreLimit {
    fn new(config: &MigrationConfig) -> Self {
        Self {
            slots: Semaphore::new(config.concurrency),
            next_start: Mutex::new(Instant::now()),
            interval: (config.rate > 0).then(|| Duration::from_secs(1) / config.rate),
        }
    }

    /// Waits for this store's next start slot.
    async fn pace(&self) {
        let Some(interval) = self.interval else {
            return;
        };
        let at = {
            let mut next = self.next_start.lock().unwrap_or_else(|p| p.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

pub struct Migrator {
    service: Arc<Service>,
    wake: Notify,
    state: Mutex<State>,
}

impl Migrator {
    pub fn new(service: Arc<Service>) -> Self {
        Self {
            service,
            wake: Notify::new(),
            state: Mutex::new(State::default()),
        }
    }

    /// Asks for a new pass (after a reload), showing `planned` as pending until it starts so
    /// that nobody reads "idle" in between.
    pub fn wake(&self, planned: &[PlannedMove]) {
        {
            let mut state = self.state();
            state.wakes += 1;
            let runtime = self.service.runtime();
            set_plan(
                &mut state,
                planned,
                self.service.metrics(),
                &runtime.topology,
            );
        }
        self.wake.notify_one();
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self, with_ids: bool) -> MigrationStatus {
        let state = self.state();
        let now = Instant::now();
        let mut pairs: BTreeMap<(String, String), PairStatus> = BTreeMap::new();
        let mut entry = |k: &(String, String)| {
            pairs
                .entry(k.clone())
                .or_insert_with(|| PairStatus {
                    source: k.0.clone(),
                    target: k.1.clone(),
                    pending: 0,
                    moved: 0,
                    failed: 0,
                    ids: with_ids.then(Vec::new),
                })
                .clone()
        };
        for k in state.pending.keys().chain(state.moved.keys()) {
            entry(k);
        }
        for (k, ids) in &state.pending {
            let p = pairs.get_mut(k).expect("entry made above");
            p.pending = ids.len();
            if let Some(list) = p.ids.as_mut() {
                list.extend(ids.iter().cloned());
            }
        }
        for (k, n) in &state.moved {
            pairs.get_mut(k).expect("entry made above").moved = *n;
        }
        let mut failures: Vec<FailureStatus> = state
            .failures
            .iter()
            .map(|(id, f)| FailureStatus {
                id: id.clone(),
                source: f.source.clone(),
                target: f.target.clone(),
                error: f.error.clone(),
                attempts: f.attempts,
                retry_in_seconds: f.retry_at.saturating_duration_since(now).as_secs(),
            })
            .collect();
        for f in &failures {
            if let Some(p) = pairs.get_mut(&(f.source.clone(), f.target.clone())) {
                p.failed += 1;
            }
        }
        failures.sort_by(|a, b| a.id.cmp(&b.id));
        failures.truncate(MAX_LISTED_FAILURES);
        MigrationStatus {
            state: if state.waiting_for > 0 {
                "waiting_for_fleet"
            } else if state.moving {
                "moving"
            } else if state.pending.values().any(|ids| !ids.is_empty()) {
                // Planned by a reload; the pass has not started (or is backing off).
                "pending"
            } else {
                "idle"
            },
            planned_at: state.planned_at.map(crate::time::rfc3339),
            pending: state.pending.values().map(Vec::len).sum(),
            moves: pairs.into_values().collect(),
            failures,
        }
    }

    /// Plans and moves until `stop`; re-plans on every wake and when a failed move is due.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let retry = match self.pass(&stop).await {
                Ok(retry) => retry,
                Err(e) => {
                    tracing::warn!(error = %e, "migration pass failed; will retry");
                    Some(self.service.runtime().config.migration.retry_min)
                }
            };
            if *stop.borrow() {
                return;
            }
            let sleep = retry.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// One plan and the moves it calls for. Returns when the earliest failed move may be
    /// retried, if any failed.
    async fn pass(&self, stop: &watch::Receiver<bool>) -> Result<Option<Duration>, ServiceError> {
        // Read before the runtime: a reload swaps the runtime, then wakes.
        let wakes = self.state().wakes;
        let runtime = self.service.runtime();
        let config = Arc::clone(&runtime.config);
        // Never on an older control plane than the database's: another instance just changed
        // it, and this one applies the change (and wakes the migrator) within a poll interval.
        // Moving meanwhile would move credentials back to where the old routing put them.
        let control = self.service.metadata().control_version().await?;
        if runtime.control_version >= 0 && control != runtime.control_version {
            let mut state = self.state();
            let since = *state
                .control_behind_since
                .get_or_insert_with(std::time::Instant::now);
            // Applying takes a poll interval; longer means it keeps failing (its log says why).
            if since.elapsed() > CONTROL_BEHIND_WARN {
                state.control_behind_since = Some(std::time::Instant::now());
                tracing::warn!(
                    applied = runtime.control_version,
                    database = control,
                    "moves wait: the control plane changed and this instance has not applied it yet"
                );
            }
            return Ok(Some(FLEET_RECHECK));
        }
        self.state().control_behind_since = None;
        // Instances sharing the database move only what they all agree on: during a rolling
        // config change, one that runs the old routing would move credentials straight back.
        let configs = self
            .service
            .metadata()
            .live_config_hashes(config.storage.fleet.liveness())
            .await?;
        let mine = runtime.epoch();
        let disagree = configs.iter().filter(|h| **h != mine).count();
        self.state().waiting_for = disagree;
        self.service
            .metrics()
            .fleet_other_routing_configs
            .set(disagree as i64);
        if disagree > 0 {
            tracing::info!(other_configurations = disagree, "waiting for every instance to run this routing configuration before moving credentials");
            return Ok(Some(FLEET_RECHECK));
        }
        let read_only = |id: &str| {
            runtime
                .registry
                .get(id)
                .is_some_and(|b| b.describe().capabilities.read_only)
        };
        let moves = plan(
            self.service.metadata().as_ref(),
            &runtime.topology,
            &read_only,
        )
        .await?;
        let metrics = self.service.metrics();
        {
            let mut state = self.state();
            // A reload came while this pass planned with the routing it replaced: its plan is
            // stale (its moves are skipped below) and the reload's stays what the status
            // shows; replacing it would show "idle" until the pass the reload woke runs, right
            // after this one.
            if state.wakes == wakes {
                state
                    .failures
                    .retain(|id, _| moves.iter().any(|m| &m.id == id));
                set_plan(&mut state, &moves, metrics, &runtime.topology);
            }
            state.moving = !moves.is_empty();
            state.recheck = false;
        }
        if !moves.is_empty() {
            for ((source, target), n) in summarize(&moves) {
                tracing::info!(%source, %target, credentials = n, "moving credentials to where the routing chain now puts them");
            }
        }

        let limits: HashMap<String, StoreLimit> = moves
            .iter()
            .flat_map(|m| [m.source.clone(), m.target.clone()])
            .map(|id| (id, StoreLimit::new(&config.migration)))
            .collect();
        let now = Instant::now();
        let due: Vec<&PlannedMove> = {
            let state = self.state();
            moves
                .iter()
                .filter(|m| state.failures.get(&m.id).is_none_or(|f| f.retry_at <= now))
                .collect()
        };
        let parallel = config.migration.concurrency * limits.len().max(1);
        futures::stream::iter(due)
            .for_each_concurrent(parallel, |m| {
                let limits = &limits;
                let migration = &config.migration;
                async move {
                    if *stop.borrow() {
                        return;
                    }
                    let (a, b) = (&limits[&m.source], &limits[&m.target]);
                    // Both permits, always in the same order, so two moves never deadlock.
                    let (first, second) = if m.source <= m.target { (a, b) } else { (b, a) };
                    let Ok(_p1) = first.slots.acquire().await else {
                        return;
                    };
                    let Ok(_p2) = second.slots.acquire().await else {
                        return;
                    };
                    a.pace().await;
                    b.pace().await;
                    // Checked last, after any wait: a reload since this pass planned means
                    // the fleet was asked to agree on another routing, which the pass it
                    // woke checks before moving anything.
                    if *stop.borrow() || self.state().wakes != wakes {
                        return;
                    }
                    let result = self.service.migrate_one(&m.id).await;
                    self.record(m, result, migration);
                }
            })
            .await;

        let (next_retry, done) = {
            let mut state = self.state();
            state.moving = false;
            let recheck = state.recheck.then_some(CLAIM_RECHECK);
            let next_retry = state
                .failures
                .values()
                .map(|f| f.retry_at.saturating_duration_since(Instant::now()))
                .chain(recheck)
                .min();
            (next_retry, state.pending.values().all(Vec::is_empty))
        };
        if done {
            match self.service.prune_retired().await {
                Ok(dropped) if !dropped.is_empty() => {
                    tracing::info!(stores = ?dropped, "removed managers hold no credentials any more; released them")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not check removed managers"),
            }
        }
        Ok(next_retry)
    }

    fn record(
        &self,
        m: &PlannedMove,
        result: Result<MoveOutcome, ServiceError>,
        config: &MigrationConfig,
    ) {
        let metrics = self.service.metrics();
        let key = (m.source.clone(), m.target.clone());
        let mut state = self.state();
        let outcome = match result {
            Ok(MoveOutcome::Claimed) => {
                // Another instance holds it: it stays pending here, and is looked at again
                // once a crashed claimant's claim would have expired.
                state.recheck = true;
                return;
            }
            Ok(outcome) => {
                state.failures.remove(&m.id);
                if let Some(ids) = state.pending.get_mut(&key) {
                    ids.retain(|id| id != &m.id);
                    let topology = &self.service.runtime().topology;
                    publish_pending(&mut state, metrics, topology);
                }
                match outcome {
                    MoveOutcome::Moved => {
                        *state.moved.entry(key.clone()).or_insert(0) += 1;
                        "moved"
                    }
                    _ => return,
                }
            }
            Err(e) => {
                let attempts = state.failures.get(&m.id).map(|f| f.attempts).unwrap_or(0) + 1;
                let wait = crate::time::backoff(config.retry_min, config.retry_max, attempts);
                tracing::warn!(credential = %m.id, source = %m.source, target = %m.target,
                    attempts, retry_in = ?wait, error = %e, "move failed; the credential stays readable where it is");
                state.failures.insert(
                    m.id.clone(),
                    Failure {
                        source: m.source.clone(),
                        target: m.target.clone(),
                        error: e.to_string(),
                        attempts,
                        retry_at: Instant::now() + wait,
                    },
                );
                "failed"
            }
        };
        let topology = &self.service.runtime().topology;
        metrics
            .migration_moves
            .with_label_values(&[
                &topology.metric_label(&key.0),
                &topology.metric_label(&key.1),
                outcome,
            ])
            .inc();
    }
}
