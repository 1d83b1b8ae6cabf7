//! The credential cache: a TTL cache bounded by capacity ([`map`]), single-flight loading so a
//! burst of cold reads costs one store call, invalidation that a racing load cannot undo,
//! reloads that replace an entry a caller knows is out of date ([`Cache::reload`]), and bounded
//! stale-if-error.
//!
//! Freshness decisions use `tokio::time::Instant`, so tests drive them with paused time; entries
//! past their stale limit are dropped (and their bodies wiped) by [`Cache::sweep`], which the
//! daemon runs every second.
//!
//! What a load produces ([`Loaded`]) is turned into a compact [`Entry`] as it enters the cache:
//! a small head and the response body rendered once ([`view`]).

mod entry;
mod map;
pub mod view;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::time::Instant;

use crate::metadata::CredentialRecord;
use crate::secret::SecretFields;
use entry::Places;
use map::Map;

pub use entry::Entry;

/// What a load produces: the credential's metadata and its secret fields.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub record: Arc<CredentialRecord>,
    pub secrets: SecretFields,
    /// The moment the value stops being valid (token expiry); the cache never serves past it.
    pub valid_until: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Stale,
    /// A caller asked for the current value (`Cache-Control: no-cache`): read from the store,
    /// whatever the cache held, and put in its place.
    Bypass,
    /// A bypass within `cache.bypass_interval` of the last one for the credential: answered
    /// with the value that one loaded (the cached entry), without a store read.
    BypassLimited,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Bypass => "bypass",
            CacheStatus::BypassLimited => "bypass-limited",
        }
    }
}

/// A load failure the cache can classify: only transient ones may be papered over with a
/// stale value.
pub trait LoadFailure: Clone + Send + Sync + 'static {
    fn allows_stale(&self) -> bool;
}

type Flight<E> = Shared<BoxFuture<'static, Result<Arc<Entry>, E>>>;

/// A load under way, and whether it is a reload that ignores what is cached ([`Cache::reload`]):
/// a reload never joins an ordinary load, which may have started before the value changed.
struct InFlight<E> {
    flight: Flight<E>,
    reload: bool,
}

pub struct Cache<E: LoadFailure> {
    entries: Arc<Map>,
    inflight: Arc<Mutex<HashMap<String, InFlight<E>>>>,
    /// Bumped by every invalidation; a load that started before one does not insert its result.
    generation: Arc<AtomicU64>,
    /// The workspace, environment and manager names entries share.
    places: Arc<Places>,
    ttl: Duration,
    stale_grace: Duration,
}

/// What the cache holds for a key right now.
pub enum Lookup {
    Fresh(Arc<Entry>),
    /// Nothing fresh: a load is needed. An entry past its TTL is kept for stale-if-error.
    Expired(Option<Arc<Entry>>),
}

impl<E: LoadFailure> Cache<E> {
    pub fn new(
        ttl: Duration,
        capacity: u64,
        stale_grace: Duration,
        evictions: Option<prometheus::IntCounter>,
    ) -> Self {
        Self {
            entries: Arc::new(Map::new(capacity, evictions)),
            inflight: Arc::default(),
            generation: Arc::default(),
            places: Arc::default(),
            ttl,
            stale_grace,
        }
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Drops the entries nothing may serve any more (past their stale limit), wiping their
    /// secrets; returns how many.
    pub fn sweep(&self) -> usize {
        self.entries.sweep(Instant::now())
    }

    /// Returns the cached value for `key` if fresh; otherwise loads it (once, however many
    /// callers ask at the same time). If that load fails transiently and a stale value is still
    /// within its grace, returns that, marked `Stale`.
    pub async fn get_or_load<F, Fut>(
        &self,
        key: &str,
        load: F,
    ) -> Result<(Arc<Entry>, CacheStatus), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded, E>> + Send + 'static,
    {
        self.get_or_load_since(key, None, load).await
    }

    /// The invalidation count now: taken before reading what a load will start from (see
    /// [`Self::get_or_load_since`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// As [`Self::get_or_load`], for a load that starts from something read when the
    /// invalidation count was `since` (a credential row read before this call): an
    /// invalidation after that moment keeps its result out of the cache, as it does for a
    /// load that reads everything itself.
    pub async fn get_or_load_since<F, Fut>(
        &self,
        key: &str,
        since: Option<u64>,
        load: F,
    ) -> Result<(Arc<Entry>, CacheStatus), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded, E>> + Send + 'static,
    {
        match self.lookup(key) {
            Lookup::Fresh(entry) => Ok((entry, CacheStatus::Hit)),
            Lookup::Expired(previous) => self.load(key, previous, since, load).await,
        }
    }

    /// One look at the cache: the fresh value, or what is left for stale-if-error.
    pub fn lookup(&self, key: &str) -> Lookup {
        let now = Instant::now();
        match self.entries.get(key, now) {
            Some(entry) if now < entry.fresh_until => Lookup::Fresh(entry),
            previous => Lookup::Expired(previous),
        }
    }

    /// The load half of [`Self::get_or_load`], after a lookup found nothing fresh: loads `key`
    /// (once for every caller asking at the same time); if that fails transiently, serves
    /// `previous` as `Stale` while it is within its grace.
    async fn load<F, Fut>(
        &self,
        key: &str,
        previous: Option<Arc<Entry>>,
        since: Option<u64>,
        load: F,
    ) -> Result<(Arc<Entry>, CacheStatus), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded, E>> + Send + 'static,
    {
        match self.load_once(key, since, load).await {
            Ok(entry) => Ok((entry, CacheStatus::Miss)),
            Err(e) => match previous {
                Some(entry) if e.allows_stale() && Instant::now() < entry.stale_until => {
                    Ok((entry, CacheStatus::Stale))
                }
                _ => Err(e),
            },
        }
    }

    /// Only the cached value, if fresh (used where a load is not wanted).
    pub fn peek(&self, key: &str) -> Option<Arc<Entry>> {
        match self.lookup(key) {
            Lookup::Fresh(entry) => Some(entry),
            Lookup::Expired(_) => None,
        }
    }

    async fn load_once<F, Fut>(
        &self,
        key: &str,
        since: Option<u64>,
        load: F,
    ) -> Result<Arc<Entry>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded, E>> + Send + 'static,
    {
        let flight = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(key) {
                Some(f) => f.flight.clone(),
                None => {
                    // A flight that ended between the caller's lookup and this lock has put
                    // its value in (flights insert under this lock): no second load for it.
                    let now = Instant::now();
                    if let Some(entry) = self.entries.get(key, now).filter(|e| now < e.fresh_until)
                    {
                        return Ok(entry);
                    }
                    let since = since.unwrap_or_else(|| self.generation.load(Ordering::Acquire));
                    let flight = self.start_flight(key.to_owned(), since, false, load());
                    inflight.insert(
                        key.to_owned(),
                        InFlight {
                            flight: flight.clone(),
                            reload: false,
                        },
                    );
                    flight
                }
            }
        };
        self.land(key, flight).await
    }

    /// Awaits `flight` and takes it out of the in-flight table, unless another has replaced it.
    async fn land(&self, key: &str, flight: Flight<E>) -> Result<Arc<Entry>, E> {
        let result = flight.clone().await;
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(key).is_some_and(|f| f.flight.ptr_eq(&flight)) {
            inflight.remove(key);
        }
        result
    }

    /// Loads `key` whatever the cache holds, and puts the result in place of the cached entry
    /// (a caller that knows the cached value is out of date). Concurrent reloads of one key
    /// share one load; ordinary reads that find nothing fresh join it too. The load reads
    /// everything it starts from itself: if an invalidation comes after it starts, the entry is
    /// dropped instead of replaced, so the cache never keeps the value this reload was meant
    /// to replace. A failed reload leaves the cache as it was.
    pub async fn reload<F, Fut>(&self, key: &str, load: F) -> Result<Arc<Entry>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Loaded, E>> + Send + 'static,
    {
        let flight = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match inflight.get(key).filter(|f| f.reload) {
                Some(f) => f.flight.clone(),
                None => {
                    let since = self.generation.load(Ordering::Acquire);
                    let flight = self.start_flight(key.to_owned(), since, true, load());
                    inflight.insert(
                        key.to_owned(),
                        InFlight {
                            flight: flight.clone(),
                            reload: true,
                        },
                    );
                    flight
                }
            }
        };
        self.land(key, flight).await
    }

    /// The result of the reload of `key` under way, if there is one.
    pub async fn join_reload(&self, key: &str) -> Option<Result<Arc<Entry>, E>> {
        let flight = {
            let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            inflight
                .get(key)
                .filter(|f| f.reload)
                .map(|f| f.flight.clone())
        }?;
        Some(self.land(key, flight).await)
    }

    /// The shared future of one load of `key`, started from what was read when the
    /// invalidation count was `since`. Its result is inserted only if no invalidation came
    /// since (checked under the lock `invalidate` takes, so an invalidation either
    /// happens-before the check and the insert is skipped, or comes after and removes it). A
    /// `reload` also drops the cached entry when it cannot insert (the caller knows that entry
    /// is out of date), and counts as an invalidation itself: ordinary loads still in flight
    /// started before its read, and their older values must not land over it.
    fn start_flight<Fut>(&self, key: String, since: u64, reload: bool, load: Fut) -> Flight<E>
    where
        Fut: Future<Output = Result<Loaded, E>> + Send + 'static,
    {
        let generation = Arc::clone(&self.generation);
        let inflight = Arc::clone(&self.inflight);
        let entries = Arc::clone(&self.entries);
        let places = Arc::clone(&self.places);
        let (ttl, grace) = (self.ttl, self.stale_grace);
        async move {
            let loaded = load.await?;
            let entry = Arc::new(Entry::new(&loaded, &places, ttl, grace));
            let guard = inflight.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let dropped = if generation.load(Ordering::Acquire) == since && entry.fresh_until > now
            {
                entries.insert(&key, Arc::clone(&entry), now)
            } else if reload {
                entries.remove(&key)
            } else {
                None
            };
            if reload {
                generation.fetch_add(1, Ordering::AcqRel);
            }
            // A dropped body is wiped after the lock every cache miss takes is let go.
            drop(guard);
            drop(dropped);
            Ok(entry)
        }
        .boxed()
        .shared()
    }

    /// Replaces the cached value after a write this process made (the written value is the
    /// newest, so readers need not go to the store for it).
    pub fn replace(&self, key: &str, loaded: Loaded) {
        let entry = Entry::new(&loaded, &self.places, self.ttl, self.stale_grace);
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        inflight.remove(key);
        let now = Instant::now();
        let dropped = if entry.fresh_until > now {
            self.entries.insert(key, Arc::new(entry), now)
        } else {
            self.entries.remove(key)
        };
        drop(inflight);
        drop(dropped);
    }

    pub fn invalidate(&self, key: &str) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        inflight.remove(key);
        let dropped = self.entries.remove(key);
        drop(inflight);
        drop(dropped);
    }

    pub fn invalidate_all(&self) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        inflight.clear();
        let dropped = self.entries.clear();
        // Wiping every body takes a while; cache misses need the lock meanwhile.
        drop(inflight);
        drop(dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::Location;
    use crate::secret::SecretString;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug, Clone, PartialEq)]
    enum Fail {
        Down,
        Gone,
    }

    impl LoadFailure for Fail {
        fn allows_stale(&self) -> bool {
            *self == Fail::Down
        }
    }

    /// A credential row of `workspace` and `environment` (shared by the cache's tests).
    pub(super) fn record(workspace: &str, environment: &str) -> CredentialRecord {
        CredentialRecord {
            id: "c".into(),
            workspace: workspace.into(),
            environment: environment.into(),
            integration_type: "t".into(),
            metadata: Default::default(),
            oauth: None,
            pinned_manager: None,
            location: Location {
                manager_id: "local".into(),
                name: "n".into(),
                version: None,
            },
            expires_at_ms: None,
            token_at_ms: None,
            needs_reauth: false,
            row_version: 1,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn loaded(value: &str, valid_for: Option<Duration>) -> Loaded {
        let mut secrets = SecretFields::new();
        secrets.insert("token", SecretString::from(value));
        Loaded {
            record: Arc::new(record("default", "P")),
            secrets,
            valid_until: valid_for.map(crate::time::from_now),
        }
    }

    fn cache() -> Cache<Fail> {
        Cache::new(Duration::from_secs(60), 100, Duration::from_secs(30), None)
    }

    fn value(e: &Arc<Entry>) -> String {
        let body: serde_json::Value = serde_json::from_slice(&view::body(e, None, false)).unwrap();
        body["secrets"]["token"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn concurrent_cold_reads_hit_the_store_once() {
        let cache = Arc::new(cache());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_load("c", move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok(loaded("v", None))
                    })
                    .await
                    .map(|(e, s)| (value(&e), s))
            }));
        }
        // Single-threaded test runtime: yielding lets every spawned task run until it waits
        // on the flight, so all 16 have joined before the load is released.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap().0, "v");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let (_, status) = cache
            .get_or_load("c", || async { Err(Fail::Gone) })
            .await
            .unwrap();
        assert_eq!(status, CacheStatus::Hit);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_ttl() {
        let cache = cache();
        cache
            .get_or_load("c", || async { Ok(loaded("one", None)) })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(59)).await;
        let (e, s) = cache
            .get_or_load("c", || async { Ok(loaded("two", None)) })
            .await
            .unwrap();
        assert_eq!((value(&e).as_str(), s), ("one", CacheStatus::Hit));
        tokio::time::advance(Duration::from_secs(2)).await;
        let (e, s) = cache
            .get_or_load("c", || async { Ok(loaded("two", None)) })
            .await
            .unwrap();
        assert_eq!((value(&e).as_str(), s), ("two", CacheStatus::Miss));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failure_serves_stale_only_within_the_grace() {
        let cache = cache();
        cache
            .get_or_load("c", || async { Ok(loaded("old", None)) })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        let (e, s) = cache
            .get_or_load("c", || async { Err(Fail::Down) })
            .await
            .unwrap();
        assert_eq!((value(&e).as_str(), s), ("old", CacheStatus::Stale));
        // A permanent failure is never hidden.
        assert_eq!(
            cache
                .get_or_load("c", || async { Err(Fail::Gone) })
                .await
                .unwrap_err(),
            Fail::Gone
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(
            cache
                .get_or_load("c", || async { Err(Fail::Down) })
                .await
                .unwrap_err(),
            Fail::Down
        );
    }

    #[tokio::test]
    async fn entry_lifetime_never_passes_token_expiry() {
        let cache = cache();
        let (_, s) = cache
            .get_or_load("c", || async {
                Ok(loaded("t", Some(Duration::from_millis(300))))
            })
            .await
            .unwrap();
        assert_eq!(s, CacheStatus::Miss);
        assert!(cache.peek("c").is_some());
        // Real time here: token expiry is wall-clock. Poll rather than sleep a fixed amount.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while cache.peek("c").is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "entry outlived its token"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // And a store outage cannot resurrect it as stale.
        assert_eq!(
            cache
                .get_or_load("c", || async { Err(Fail::Down) })
                .await
                .unwrap_err(),
            Fail::Down
        );
        // An already expired token is not cached at all.
        cache
            .get_or_load("d", || async { Ok(loaded("t", Some(Duration::ZERO))) })
            .await
            .unwrap();
        assert!(cache.peek("d").is_none());
    }

    #[tokio::test]
    async fn invalidation_beats_a_load_that_started_before_it() {
        let cache = Arc::new(cache());
        let gate = Arc::new(tokio::sync::Notify::new());
        let (c2, g2) = (cache.clone(), gate.clone());
        let slow = tokio::spawn(async move {
            c2.get_or_load("c", move || async move {
                g2.notified().await;
                Ok(loaded("before-write", None))
            })
            .await
            .map(|(e, _)| value(&e))
        });
        while cache.inflight.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        cache.invalidate("c");
        gate.notify_one();
        assert_eq!(slow.await.unwrap().unwrap(), "before-write");
        assert!(
            cache.peek("c").is_none(),
            "a stale load must not repopulate after a write"
        );
        let (e, s) = cache
            .get_or_load("c", || async { Ok(loaded("after-write", None)) })
            .await
            .unwrap();
        assert_eq!((value(&e).as_str(), s), ("after-write", CacheStatus::Miss));
    }

    #[tokio::test]
    async fn an_invalidation_after_the_row_was_read_keeps_the_load_out_of_the_cache() {
        let cache = cache();
        // The row is read (generation taken), then a write invalidates, then the load starts
        // from the row read before it: its answer is served to this caller but not cached.
        let since = cache.generation();
        cache.invalidate("c");
        let (e, s) = cache
            .get_or_load_since("c", Some(since), || async {
                Ok(loaded("from-the-old-row", None))
            })
            .await
            .unwrap();
        assert_eq!(
            (value(&e).as_str(), s),
            ("from-the-old-row", CacheStatus::Miss)
        );
        assert!(
            cache.peek("c").is_none(),
            "the old row's value is not cached"
        );
        // Without an invalidation in between the load is cached as usual.
        let since = cache.generation();
        cache
            .get_or_load_since("c", Some(since), || async { Ok(loaded("current", None)) })
            .await
            .unwrap();
        assert_eq!(
            cache.peek("c").map(|e| value(&e)).as_deref(),
            Some("current")
        );
    }

    #[tokio::test]
    async fn a_reload_replaces_a_fresh_entry_and_concurrent_reloads_load_once() {
        let cache = Arc::new(cache());
        cache
            .get_or_load("c", || async { Ok(loaded("old", None)) })
            .await
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .reload("c", move || async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Ok(loaded("new", None))
                    })
                    .await
                    .map(|e| value(&e))
            }));
        }
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        // Plain reads keep the fresh entry while the reload runs.
        assert_eq!(cache.peek("c").map(|e| value(&e)).as_deref(), Some("old"));
        gate.notify_one();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "new");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.peek("c").map(|e| value(&e)).as_deref(), Some("new"));
        // A failed reload leaves the entry as it was.
        assert_eq!(
            cache
                .reload("c", || async { Err(Fail::Down) })
                .await
                .unwrap_err(),
            Fail::Down
        );
        assert_eq!(cache.peek("c").map(|e| value(&e)).as_deref(), Some("new"));
    }

    #[tokio::test]
    async fn a_plain_load_that_started_before_a_reload_does_not_land_over_it() {
        let cache = Arc::new(cache());
        let gate = Arc::new(tokio::sync::Notify::new());
        let (c2, g2) = (cache.clone(), gate.clone());
        let slow = tokio::spawn(async move {
            c2.get_or_load("c", move || async move {
                g2.notified().await;
                Ok(loaded("older", None))
            })
            .await
            .map(|(e, _)| value(&e))
        });
        while cache.inflight.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        cache
            .reload("c", || async { Ok(loaded("current", None)) })
            .await
            .unwrap();
        gate.notify_one();
        assert_eq!(slow.await.unwrap().unwrap(), "older");
        assert_eq!(
            cache.peek("c").map(|e| value(&e)).as_deref(),
            Some("current")
        );
        // A reload overtaken by an invalidation (a write) drops the entry, so the value it was
        // meant to replace is not served either.
        let (c3, gate) = (cache.clone(), Arc::new(tokio::sync::Notify::new()));
        let g3 = gate.clone();
        let reload = tokio::spawn(async move {
            c3.reload("c", move || async move {
                g3.notified().await;
                Ok(loaded("from-an-old-row", None))
            })
            .await
            .map(|e| value(&e))
        });
        while cache.inflight.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        cache.invalidate("other");
        gate.notify_one();
        assert_eq!(reload.await.unwrap().unwrap(), "from-an-old-row");
        assert!(cache.peek("c").is_none());
    }
}
