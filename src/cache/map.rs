//! The bounded map under the credential cache: shards of insertion-ordered hash maps behind
//! read-write locks, approximate least-recently-used eviction by sampling when a shard is full,
//! and a sweep that drops entries past their stale limit, so their secret bodies are wiped soon
//! after nothing may serve them.
//!
//! Why not a general-purpose cache crate (moka was here before): a read here is one shared lock
//! and at most one relaxed store, with no log of reads replayed later (the replays showed as
//! latency spikes under load), and an entry costs its key, an `Arc` and an index slot — about a
//! quarter of what moka's per-entry bookkeeping took.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use indexmap::IndexMap;
use tokio::time::Instant;

use super::Entry;

/// Entries looked at to choose one to evict: Redis's default, close enough to true LRU for a
/// cache whose misses cost one store call.
const SAMPLE: usize = 5;

/// Below this many entries per shard, fewer shards: little to spread, and lock contention is
/// not where a small cache's time goes.
const MIN_PER_SHARD: u64 = 256;
const MAX_SHARDS: u64 = 16;

pub(super) struct Map {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    /// The bound is on the whole map, not per shard: hashing never spreads keys exactly evenly,
    /// and a shard fuller than its share must not evict while the map has room. Concurrent
    /// inserts into different shards may pass it by one each.
    capacity: usize,
    len: AtomicUsize,
    /// The zero of the millisecond ticks entries record their last use in.
    epoch: Instant,
    /// Counts entries dropped for room or because they ran past their stale limit.
    evictions: Option<prometheus::IntCounter>,
}

struct Shard {
    entries: IndexMap<Box<str>, Arc<Entry>>,
    /// xorshift state for sampling; only touched under the write lock.
    rng: u64,
}

impl Map {
    pub(super) fn new(capacity: u64, evictions: Option<prometheus::IntCounter>) -> Self {
        let shards = (capacity / MIN_PER_SHARD)
            .clamp(1, MAX_SHARDS)
            .next_power_of_two();
        Map {
            shards: (0..shards)
                .map(|n| {
                    RwLock::new(Shard {
                        entries: IndexMap::new(),
                        rng: 0x9E37_79B9_7F4A_7C15 ^ (n + 1),
                    })
                })
                .collect(),
            hasher: RandomState::new(),
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
            len: AtomicUsize::new(0),
            epoch: Instant::now(),
            evictions,
        }
    }

    fn shard(&self, key: &str) -> &RwLock<Shard> {
        // The shard count is a power of two; the high bits are the ones the maps' own hashing
        // (a different key) is least correlated with.
        let hash = self.hasher.hash_one(key);
        &self.shards[(hash >> 32) as usize & (self.shards.len() - 1)]
    }

    fn tick(&self, now: Instant) -> u32 {
        // Wraps after 49 days; ages are compared with wrapping arithmetic.
        now.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// The entry for `key`, recorded as used at `now`.
    pub(super) fn get(&self, key: &str, now: Instant) -> Option<Arc<Entry>> {
        let shard = self
            .shard(key)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let entry = shard.entries.get(key)?;
        let tick = self.tick(now);
        // A hot entry read from every core would bounce its cache line on each store.
        if entry.last_used.load(Ordering::Relaxed) != tick {
            entry.last_used.store(tick, Ordering::Relaxed);
        }
        Some(Arc::clone(entry))
    }

    /// Puts `entry` under `key`, evicting a rarely used entry of its shard if the map is full.
    /// Returns the entry it replaced or evicted, for the caller to drop (wiping its body) once
    /// it holds no lock.
    #[must_use = "dropped entries are wiped where the caller holds no lock"]
    pub(super) fn insert(&self, key: &str, entry: Arc<Entry>, now: Instant) -> Option<Arc<Entry>> {
        if self.capacity == 0 {
            return Some(entry);
        }
        let tick = self.tick(now);
        entry.last_used.store(tick, Ordering::Relaxed);
        let dropped = {
            let mut shard = self
                .shard(key)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = shard.entries.get_mut(key) {
                Some(std::mem::replace(slot, entry))
            } else {
                let evicted = if self.len.load(Ordering::Relaxed) >= self.capacity {
                    shard.evict_one(tick, now)
                } else {
                    None
                };
                shard.entries.insert(key.into(), entry);
                if evicted.is_none() {
                    self.len.fetch_add(1, Ordering::Relaxed);
                }
                if evicted.is_some() {
                    if let Some(counter) = &self.evictions {
                        counter.inc();
                    }
                }
                evicted
            }
        };
        dropped
    }

    /// Removes `key`'s entry and returns it, for the caller to drop once it holds no lock.
    #[must_use = "dropped entries are wiped where the caller holds no lock"]
    pub(super) fn remove(&self, key: &str) -> Option<Arc<Entry>> {
        let removed = {
            let mut shard = self
                .shard(key)
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let removed = shard.entries.swap_remove(key);
            if removed.is_some() {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            removed
        };
        removed
    }

    /// Empties the map and returns what it held, for the caller to drop once it holds no lock
    /// (wiping every body takes a while).
    #[must_use = "dropped entries are wiped where the caller holds no lock"]
    pub(super) fn clear(&self) -> Vec<IndexMap<Box<str>, Arc<Entry>>> {
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
                let entries = std::mem::take(&mut shard.entries);
                self.len.fetch_sub(entries.len(), Ordering::Relaxed);
                entries
            })
            .collect()
    }

    pub(super) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Drops every entry past its stale limit (nothing may serve it any more). Shards are
    /// scanned under their read lock; only shards holding such entries are locked for writing.
    /// Returns how many were dropped.
    pub(super) fn sweep(&self, now: Instant) -> usize {
        let mut swept = 0;
        for shard in self.shards.iter() {
            let any = shard
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .entries
                .values()
                .any(|e| e.stale_until <= now);
            if !any {
                continue;
            }
            let mut dead = Vec::new();
            {
                let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
                shard.entries.retain(|_, e| {
                    if e.stale_until <= now {
                        dead.push(Arc::clone(e));
                        false
                    } else {
                        true
                    }
                });
                self.len.fetch_sub(dead.len(), Ordering::Relaxed);
            }
            swept += dead.len();
        }
        if swept > 0 {
            if let Some(counter) = &self.evictions {
                counter.inc_by(swept as u64);
            }
        }
        swept
    }
}

impl Shard {
    /// Removes the least recently used of a few sampled entries, preferring one nothing may
    /// serve any more.
    fn evict_one(&mut self, tick: u32, now: Instant) -> Option<Arc<Entry>> {
        let len = self.entries.len();
        if len == 0 {
            return None;
        }
        let mut victim = None;
        let mut oldest = 0u32;
        for _ in 0..SAMPLE.min(len) {
            let index = (self.next_random() % len as u64) as usize;
            let (_, entry) = self.entries.get_index(index)?;
            if entry.stale_until <= now {
                victim = Some(index);
                break;
            }
            let age = tick.wrapping_sub(entry.last_used.load(Ordering::Relaxed));
            if victim.is_none() || age > oldest {
                victim = Some(index);
                oldest = age;
            }
        }
        self.entries.swap_remove_index(victim?).map(|(_, e)| e)
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::Places;
    use crate::cache::Loaded;
    use crate::secret::SecretFields;
    use std::time::Duration;

    fn entry(places: &Places, ttl: Duration) -> Arc<Entry> {
        let loaded = Loaded {
            record: Arc::new(crate::cache::tests::record("default", "P")),
            secrets: SecretFields::new(),
            valid_until: None,
        };
        Arc::new(Entry::new(&loaded, places, ttl, Duration::ZERO))
    }

    #[test]
    fn a_small_capacity_is_one_exact_shard_and_a_large_one_is_sharded() {
        assert_eq!(Map::new(100, None).shards.len(), 1);
        assert_eq!(Map::new(10_000, None).shards.len(), 16);
        assert_eq!(Map::new(1000, None).shards.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_map_evicts_rarely_used_entries_and_keeps_hot_ones() {
        let places = Places::default();
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let map = Map::new(100, Some(evictions.clone()));
        let ttl = Duration::from_secs(3600);
        let _ = map.insert("hot", entry(&places, ttl), Instant::now());
        for n in 0..1000 {
            tokio::time::advance(Duration::from_millis(2)).await;
            map.get("hot", Instant::now()).unwrap();
            let _ = map.insert(&format!("k{n}"), entry(&places, ttl), Instant::now());
            assert!(map.len() <= 100);
        }
        assert_eq!(map.len(), 100);
        assert_eq!(evictions.get(), 901);
        assert!(
            map.get("hot", Instant::now()).is_some(),
            "the hot entry was evicted"
        );
        // Most survivors are recent: sampling approximates LRU.
        let recent = (900..1000)
            .filter(|n| map.get(&format!("k{n}"), Instant::now()).is_some())
            .count();
        assert!(recent > 50, "{recent} of the last 100 inserts survive");
    }

    #[test]
    fn a_sharded_map_fills_to_its_capacity_before_it_evicts() {
        let places = Places::default();
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let map = Map::new(10_000, Some(evictions.clone()));
        let ttl = Duration::from_secs(60);
        for n in 0..10_000 {
            let _ = map.insert(&format!("k{n}"), entry(&places, ttl), Instant::now());
        }
        assert_eq!((map.len(), evictions.get()), (10_000, 0));
        let _ = map.insert("one more", entry(&places, ttl), Instant::now());
        assert_eq!((map.len(), evictions.get()), (10_000, 1));
        let held: usize = map
            .shards
            .iter()
            .map(|s| s.read().unwrap().entries.len())
            .sum();
        assert_eq!(held, 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_drops_only_entries_past_their_stale_limit_and_wipes_them() {
        let places = Places::default();
        let map = Map::new(10_000, None);
        let short = entry(&places, Duration::from_secs(1));
        let weak = Arc::downgrade(&short);
        let _ = map.insert("short", short, Instant::now());
        for n in 0..100 {
            let _ = map.insert(
                &format!("long{n}"),
                entry(&places, Duration::from_secs(60)),
                Instant::now(),
            );
        }
        assert_eq!(map.sweep(Instant::now()), 0);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(map.sweep(Instant::now()), 1);
        assert!(
            weak.upgrade().is_none(),
            "the swept entry (and its body) was dropped"
        );
        assert_eq!(map.len(), 100);
        assert!(map.get("short", Instant::now()).is_none());
    }

    #[test]
    fn replace_remove_and_clear() {
        let places = Places::default();
        let map = Map::new(10, None);
        let ttl = Duration::from_secs(60);
        let first = entry(&places, ttl);
        let second = entry(&places, ttl);
        let _ = map.insert("a", Arc::clone(&first), Instant::now());
        let _ = map.insert("a", Arc::clone(&second), Instant::now());
        assert!(Arc::ptr_eq(&map.get("a", Instant::now()).unwrap(), &second));
        assert_eq!(
            Arc::strong_count(&first),
            1,
            "the replaced entry was let go"
        );
        let _ = map.insert("b", entry(&places, ttl), Instant::now());
        let _ = map.remove("a");
        assert_eq!(map.len(), 1);
        let _ = map.clear();
        assert_eq!(map.len(), 0);
        let zero = Map::new(0, None);
        let _ = zero.insert("a", second, Instant::now());
        assert_eq!(zero.len(), 0, "a capacity of 0 caches nothing");
    }
}
