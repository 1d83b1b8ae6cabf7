//! Instances sharing the PostgreSQL database: their heartbeats, and the change feed that tells
//! each instance what the others changed (a credential, so it drops its cached copy; the
//! control plane, so it reloads it).
//!
//! The feed is a table, `changes`, that writers append to inside the transaction of the change
//! and that every instance polls every `store.poll_interval` from the last number it saw. A
//! table, not `LISTEN`: `LISTEN` needs a session of its own per instance, which PgBouncer in
//! transaction mode cannot give and which costs PostgreSQL a connection per instance. Numbers
//! come from a sequence, so they are handed out at insert, not at commit: a number below the
//! highest seen that is missing (a *hole*) may still commit. A hole is asked for at every poll
//! for [`HOLE_WAIT`], then at every slow check (every [`SLOW_CHECK`]) until half the feed's
//! retention has passed: a writer that rolled back, or numbers a restarted server skipped,
//! leave holes that never fill; a commit that stalled is heard late rather than never.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::pool::Pool;
use super::{db_err, PostgresMetadata, NOW_MS};
use crate::metadata::{FleetRows, Invalidation, MetadataError};

/// Changes are kept this long; an instance that could not read the feed for half of it drops
/// its whole cache once it can again, since what it missed may be gone.
const CHANGES_RETENTION: Duration = Duration::from_secs(600);
/// How long a hole is asked for at every poll: longer than the tail of any writing
/// transaction (the change row is the last statement before its commit).
const HOLE_WAIT: Duration = Duration::from_secs(30);
/// How often older holes are asked for, the feed checked for a sequence that went backwards
/// (a restored backup), and, now and then, old rows pruned.
const SLOW_CHECK: Duration = Duration::from_secs(30);
/// Each instance prunes about this often (at a random phase; an advisory lock keeps two
/// from pruning at once): 1,000 instances delete twice a second at most, mostly nothing.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// An instance row not refreshed for this long is deleted by the next heartbeat of another.
const FORGET_INSTANCES_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Key of the advisory lock a pruner holds.
const PRUNE_LOCK: i64 = 0x6372_6564_6368_6773; // "credchgs"
/// More holes than this at once (a feed far ahead after an outage): drop everything instead.
const MAX_HOLES: i64 = 10_000;
/// Rows read per query; a full page is followed at once by the next.
const PAGE: i64 = 512;
/// A new instance reads this many changes before the newest: one committed just after it
/// started but numbered before the newest would otherwise be skipped.
const LOOK_BACK: i64 = 256;
/// A feed read that takes longer than this is abandoned, with its connection (a half-open
/// TCP connection would otherwise stop invalidations until the kernel gives up on it).
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a change is about.
#[derive(Clone, Copy)]
pub(super) enum Change<'a> {
    Credential(&'a str),
    Control,
}

/// Appends `change` to the feed inside `tx`; call it last before the commit, so the number it
/// takes is a hole for as short a time as possible.
pub(super) async fn change_insert(
    tx: &tokio_postgres::Transaction<'_>,
    change: Change<'_>,
    origin: &str,
) -> Result<(), MetadataError> {
    let (kind, subject) = match change {
        Change::Credential(id) => ("credential", id),
        Change::Control => ("control", ""),
    };
    tx.execute_typed(
        &format!(
            "INSERT INTO changes (kind, subject, origin, at_ms) VALUES ($1, $2, $3, {NOW_MS})"
        ),
        params![&kind, &subject, &origin],
    )
    .await
    .map(drop)
    .map_err(db_err)
}

/// Where an instance is in the feed.
#[derive(Debug)]
pub(super) struct Cursor {
    /// Every number below this was seen, or is a hole.
    next: i64,
    /// Each hole with when it was first missed.
    holes: BTreeMap<i64, Instant>,
}

/// One feed row.
#[derive(Debug)]
pub(super) struct Row {
    seq: i64,
    kind: String,
    subject: String,
    origin: String,
}

/// The feed's newest number (0 when empty).
async fn newest(pool: &Pool) -> Result<i64, MetadataError> {
    let conn = pool.get().await?;
    let read = conn.query_typed_one("SELECT COALESCE(MAX(seq), 0) FROM changes", &[]);
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(row) => row.map_err(db_err)?.try_get(0).map_err(db_err),
        Err(_) => {
            conn.discard();
            Err(MetadataError::Database(
                "the change feed did not answer".into(),
            ))
        }
    }
}

impl Cursor {
    /// Starts just before the newest change.
    pub(super) async fn start(pool: &Pool) -> Result<Self, MetadataError> {
        Ok(Self::at(newest(pool).await? - LOOK_BACK + 1))
    }

    fn at(next: i64) -> Self {
        Self {
            next: next.max(1),
            holes: BTreeMap::new(),
        }
    }

    /// Takes in a page of rows (in `seq` order); answers those not seen before, and whether
    /// so many are missing that everything must be dropped.
    pub(super) fn advance(&mut self, rows: Vec<Row>, now: Instant) -> (Vec<Row>, bool) {
        let mut overflow = false;
        let mut fresh = Vec::with_capacity(rows.len());
        for row in rows {
            if row.seq < self.next {
                if self.holes.remove(&row.seq).is_none() {
                    continue;
                }
            } else {
                if row.seq - self.next > MAX_HOLES || overflow {
                    overflow = true;
                    self.holes.clear();
                } else {
                    for missing in self.next..row.seq {
                        self.holes.insert(missing, now);
                    }
                }
                self.next = row.seq + 1;
            }
            fresh.push(row);
        }
        self.holes
            .retain(|_, since| now.duration_since(*since) < CHANGES_RETENTION / 2);
        if self.holes.len() as i64 > MAX_HOLES {
            self.holes.clear();
            overflow = true;
        }
        (fresh, overflow)
    }

    /// The holes to ask for: the young ones always, the old ones only at a slow check.
    fn wanted(&self, now: Instant, slow: bool) -> Vec<i64> {
        self.holes
            .iter()
            .filter(|(_, since)| slow || now.duration_since(**since) < HOLE_WAIT)
            .map(|(seq, _)| *seq)
            .collect()
    }

    /// One page of rows after the cursor, and in the holes asked for.
    async fn read(&self, pool: &Pool, holes: &[i64]) -> Result<Vec<Row>, MetadataError> {
        let conn = pool.get().await?;
        let read = async {
            if holes.is_empty() {
                conn.query_typed(
                    "SELECT seq, kind, subject, origin FROM changes WHERE seq >= $1 ORDER BY seq LIMIT $2",
                    params![&self.next, &PAGE],
                )
                .await
            } else {
                let holes = holes.to_vec();
                conn.query_typed(
                    "SELECT seq, kind, subject, origin FROM changes WHERE seq >= $1 OR seq = ANY($3) \
                     ORDER BY seq LIMIT $2",
                    params![&self.next, &PAGE, &holes],
                )
                .await
            }
        };
        let rows = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(rows) => rows.map_err(db_err)?,
            Err(_) => {
                conn.discard();
                return Err(MetadataError::Database(
                    "the change feed did not answer".into(),
                ));
            }
        };
        rows.iter()
            .map(|r| {
                Ok(Row {
                    seq: r.try_get(0).map_err(db_err)?,
                    kind: r.try_get(1).map_err(db_err)?,
                    subject: r.try_get(2).map_err(db_err)?,
                    origin: r.try_get(3).map_err(db_err)?,
                })
            })
            .collect()
    }
}

/// Deletes changes older than the retention, unless another instance is doing it.
async fn prune(pool: &Pool) -> Result<u64, MetadataError> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await.map_err(db_err)?;
    let mine: bool = tx
        .query_typed_one("SELECT pg_try_advisory_xact_lock($1)", params![&PRUNE_LOCK])
        .await
        .map_err(db_err)?
        .try_get(0)
        .map_err(db_err)?;
    if !mine {
        return Ok(0);
    }
    let keep = CHANGES_RETENTION.as_millis() as i64;
    let removed = tx
        .execute_typed(
            &format!("DELETE FROM changes WHERE at_ms < {NOW_MS} - $1"),
            params![&keep],
        )
        .await
        .map_err(db_err)?;
    tx.commit().await.map_err(db_err)?;
    Ok(removed)
}

/// Polls the feed every `interval` and turns other instances' changes into invalidations;
/// records in `read_at` when a read last succeeded.
/// While the database is unreachable cached values keep being served (nobody can write
/// meanwhile); after an outage longer than half the feed's retention, everything is dropped.
pub(super) async fn follow(
    pool: Arc<Pool>,
    out: broadcast::Sender<Invalidation>,
    read_at: Arc<std::sync::atomic::AtomicI64>,
    origin: String,
    interval: Duration,
    mut cursor: Cursor,
) {
    let mut last_read = Instant::now();
    let mut failing = false;
    let mut next_slow = Instant::now() + SLOW_CHECK;
    let mut next_prune = Instant::now() + PRUNE_EVERY.mul_f64(rand::random::<f64>());
    // A random phase, so a fleet started at once does not poll in step.
    tokio::time::sleep(interval.mul_f64(rand::random::<f64>())).await;
    loop {
        let now = Instant::now();
        let slow = now >= next_slow;
        if slow {
            next_slow = now + SLOW_CHECK;
            // A sequence behind the cursor (the database was restored from a backup): every
            // later change would be skipped.
            match newest(&pool).await {
                Ok(newest) if newest < cursor.next - 1 => {
                    tracing::warn!(
                        newest,
                        expected_at_least = cursor.next - 1,
                        "the change feed went backwards (a restored database?); dropping the whole cache"
                    );
                    cursor = Cursor::at(newest + 1);
                    let _ = out.send(Invalidation::All);
                }
                _ => {}
            }
            if now >= next_prune {
                next_prune = now + PRUNE_EVERY;
                match prune(&pool).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "pruned the change feed"),
                    Err(e) => tracing::debug!(error = %e, "could not prune the change feed"),
                }
            }
        }
        let holes = cursor.wanted(now, slow);
        loop {
            let rows = match cursor.read(&pool, &holes).await {
                Ok(rows) => rows,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "cannot read the PostgreSQL change feed; cached values are served meanwhile");
                        failing = true;
                    }
                    break;
                }
            };
            let now = Instant::now();
            read_at.store(
                crate::time::now_unix_ms(),
                std::sync::atomic::Ordering::Relaxed,
            );
            if failing {
                tracing::info!("reading the PostgreSQL change feed again");
                failing = false;
            }
            let full = rows.len() as i64 == PAGE;
            let (fresh, overflow) = cursor.advance(rows, now);
            if overflow || now.duration_since(last_read) > CHANGES_RETENTION / 2 {
                tracing::warn!("changes may have been missed; dropping the whole cache");
                let _ = out.send(Invalidation::All);
            }
            last_read = now;
            for row in fresh {
                if let Some(change) = invalidation(&row, &origin) {
                    let _ = out.send(change);
                }
            }
            if !full {
                break;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// What a change means to this instance: nothing for a credential it changed itself (its
/// cache is already up to date) or a kind this version does not know. Its own control-plane
/// changes count: not all of them go through an apply (a retired manager released by the
/// journal sweep), and an apply with nothing new is cheap.
fn invalidation(row: &Row, origin: &str) -> Option<Invalidation> {
    match row.kind.as_str() {
        "credential" if row.origin != origin => Some(Invalidation::Credential(row.subject.clone())),
        "control" => Some(Invalidation::Control),
        _ => None,
    }
}

#[async_trait]
impl FleetRows for PostgresMetadata {
    fn invalidations(&self) -> Option<broadcast::Receiver<Invalidation>> {
        Some(self.invalidations.subscribe())
    }

    async fn instance_heartbeat(&self, id: &str, config_hash: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        // Also forgets instances not heard from for a day (pods killed without leaving), in
        // the same statement: no extra round trip, and rarely anything to delete.
        let forget = FORGET_INSTANCES_AFTER.as_millis() as i64;
        conn.execute_typed(
            &format!(
                "WITH gone AS (DELETE FROM instances WHERE heartbeat_ms < {NOW_MS} - $3 AND id <> $1) \
                 INSERT INTO instances (id, config_hash, heartbeat_ms) VALUES ($1, $2, {NOW_MS}) \
                 ON CONFLICT (id) DO UPDATE SET config_hash = EXCLUDED.config_hash, heartbeat_ms = EXCLUDED.heartbeat_ms"
            ),
            params![&id, &config_hash, &forget],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn instance_remove(&self, id: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed("DELETE FROM instances WHERE id = $1", params![&id])
            .await
            .map(drop)
            .map_err(db_err)
    }

    async fn live_config_hashes(&self, max_age: Duration) -> Result<Vec<String>, MetadataError> {
        let conn = self.pool.get().await?;
        let age = max_age.as_millis() as i64;
        Ok(conn
            .query_typed(
                &format!("SELECT DISTINCT config_hash FROM instances WHERE heartbeat_ms >= {NOW_MS} - $1"),
                params![&age],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, origin: &str) -> Row {
        Row {
            seq,
            kind: "credential".into(),
            subject: format!("c{seq}"),
            origin: origin.into(),
        }
    }

    fn seqs(rows: &[Row]) -> Vec<i64> {
        rows.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn changes_become_invalidations_unless_this_instance_made_them() {
        assert_eq!(
            invalidation(&row(1, "other"), "me"),
            Some(Invalidation::Credential("c1".into()))
        );
        assert_eq!(invalidation(&row(1, "me"), "me"), None);
        let mut control = row(2, "me");
        control.kind = "control".into();
        assert_eq!(invalidation(&control, "me"), Some(Invalidation::Control));
        control.kind = "from-a-newer-version".into();
        assert_eq!(invalidation(&control, "me"), None);
    }

    #[test]
    fn a_number_committed_late_is_still_seen_once() {
        let t = Instant::now();
        let mut c = Cursor::at(1);
        let (fresh, overflow) = c.advance(vec![row(1, "a"), row(3, "a")], t);
        assert_eq!((seqs(&fresh), overflow), (vec![1, 3], false));
        assert_eq!(c.holes.keys().copied().collect::<Vec<_>>(), vec![2]);
        // 2 commits late; 3 comes back in the same page and is not told twice.
        let (fresh, _) = c.advance(vec![row(2, "a"), row(3, "a"), row(4, "a")], t);
        assert_eq!(seqs(&fresh), vec![2, 4]);
        assert!(c.holes.is_empty());
        let (fresh, _) = c.advance(vec![row(2, "a")], t);
        assert!(fresh.is_empty(), "seen once only");
    }

    #[test]
    fn a_hole_is_asked_for_less_often_then_given_up_and_a_huge_gap_drops_everything() {
        let t = Instant::now();
        let mut c = Cursor::at(1);
        c.advance(vec![row(5, "a")], t);
        assert_eq!(c.wanted(t, false), vec![1, 2, 3, 4]);
        let later = t + HOLE_WAIT;
        assert!(c.wanted(later, false).is_empty(), "not at every poll");
        assert_eq!(c.wanted(later, true), vec![1, 2, 3, 4], "at slow checks");
        // A commit that stalled past HOLE_WAIT is still heard.
        let (fresh, _) = c.advance(vec![row(2, "a")], later);
        assert_eq!(seqs(&fresh), vec![2]);
        c.advance(vec![], t + CHANGES_RETENTION / 2);
        assert!(
            c.holes.is_empty(),
            "rolled-back numbers are not asked for forever"
        );
        let (fresh, overflow) = c.advance(vec![row(6 + MAX_HOLES + 1, "a")], t);
        assert!(overflow);
        assert_eq!(fresh.len(), 1);
        assert!(c.holes.is_empty());
    }
}
