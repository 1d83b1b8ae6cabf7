//! The PostgreSQL metadata database, for fleet mode: many credproxy instances share one
//! database. The schema is created or upgraded at start under an advisory lock (so instances
//! starting together do not race), and every change of a credential row is appended to the
//! change feed so the other instances drop their cached copy; so is every change of the
//! control plane (secrets managers and routing), so they reload it. Nothing here needs a
//! session of its own (no `LISTEN`, no session locks, no named prepared statements), so
//! PgBouncer in transaction mode can pool the connections. This module owns opening the
//! database; the connection pool, the feed and each role's rows are in the files named after
//! them.

#[macro_use]
mod params;
mod control;
mod credentials;
mod events;
mod fleet;
mod journal;
mod leases;
mod pending;
mod pool;
mod purges;
mod sealed;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio_postgres::{Config, Row};

use self::fleet::{follow, Cursor};
use self::pool::{tls_for, Pool};
use super::codec::Columns;
use super::schema::{self, Dialect};
use super::{Fault, Invalidation, Liveness, MetadataError, SCHEMA_VERSION};
use crate::config::FleetConfig;

/// Key of the advisory lock held while the schema is created or upgraded.
const SCHEMA_LOCK: i64 = 0x6372_6564_7072_7879; // "credprxy"

/// How PostgreSQL spells the shared schema.
const DIALECT: Dialect = Dialect {
    int: "BIGINT",
    bytes: "BYTEA",
    flag: "BOOLEAN NOT NULL DEFAULT FALSE",
    serial_key: "BIGSERIAL PRIMARY KEY",
    not_needs_reauth: "NOT needs_reauth",
    // Every start runs the whole schema (under the advisory lock), so each object is created
    // only if missing; that is also how an older database gains the newer objects.
    if_new: "IF NOT EXISTS ",
    if_new_column: "IF NOT EXISTS ",
};

/// The database's clock in milliseconds: leases compare times from many hosts.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

fn db_err(e: tokio_postgres::Error) -> MetadataError {
    // The server's message names tables and constraints, never values.
    let message = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    match fault(&e) {
        Some(fault) => MetadataError::Storage { fault, message },
        None => MetadataError::Database(message),
    }
}

/// The kinds of failure that are the database's own, by SQLSTATE (and a lost connection).
fn fault(e: &tokio_postgres::Error) -> Option<Fault> {
    if e.is_closed() {
        return Some(Fault::Unavailable);
    }
    let Some(code) = e.code() else {
        // No server answer: the connection or its socket failed (an I/O error underneath).
        let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
        return io.then_some(Fault::Unavailable);
    };
    let code = code.code();
    Some(match code {
        "53100" => Fault::Full,
        "25006" => Fault::ReadOnly,
        "55P03" | "40P01" | "40001" | "57014" => Fault::Locked,
        _ if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") => {
            Fault::Unavailable
        }
        _ => return None,
    })
}

fn unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

pub struct PostgresMetadata {
    pool: Arc<Pool>,
    invalidations: broadcast::Sender<Invalidation>,
    /// Tags this instance's own changes, which it does not need to act on.
    origin: String,
    follower: tokio::task::JoinHandle<()>,
    /// When the change feed was last read (ms since the epoch): a ping within
    /// `answered_within` of it is answered without a query.
    feed_read_at: Arc<std::sync::atomic::AtomicI64>,
    answered_within: Duration,
}

impl Drop for PostgresMetadata {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl PostgresMetadata {
    /// Connects, creates or upgrades the schema (under an advisory lock), and starts following
    /// the change feed.
    pub async fn open(url: &str, fleet: &FleetConfig) -> Result<Self, MetadataError> {
        let mut config: Config = url.parse().map_err(|_| {
            MetadataError::Database("store.url is not a valid PostgreSQL URL".into())
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // Unacknowledged data for this long ends a connection (a peer gone without a FIN:
        // a failed-over server, a dropped NAT entry) instead of the kernel's 15 minutes.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(30));
        }
        config.application_name("credproxy");
        let tls = tls_for(&config)?;
        let pool = Arc::new(Pool::new(
            config,
            tls,
            fleet.pool_size,
            fleet.pool_idle_timeout,
        ));
        let found = schema_version(&pool).await?;
        if let Some(found) = found.filter(|v| *v > SCHEMA_VERSION) {
            return Err(MetadataError::SchemaTooNew {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        if found != Some(SCHEMA_VERSION) {
            let mut conn = pool.get().await?;
            let tx = conn.transaction().await.map_err(db_err)?;
            tx.execute_typed("SELECT pg_advisory_xact_lock($1)", params![&SCHEMA_LOCK])
                .await
                .map_err(db_err)?;
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS credproxy_schema (version BIGINT NOT NULL);\n{}",
                schema::ddl(&DIALECT, 1..=SCHEMA_VERSION)
            ))
            .await
            .map_err(db_err)?;
            let version: Option<i64> = tx
                .query_typed_opt("SELECT version FROM credproxy_schema", params![])
                .await
                .map_err(db_err)?
                .map(|r| r.get(0));
            match version {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(MetadataError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(_) => {
                    tx.execute_typed(
                        "UPDATE credproxy_schema SET version = $1",
                        params![&SCHEMA_VERSION],
                    )
                    .await
                    .map_err(db_err)?;
                }
                None => {
                    tx.execute_typed(
                        "INSERT INTO credproxy_schema (version) VALUES ($1)",
                        params![&SCHEMA_VERSION],
                    )
                    .await
                    .map_err(db_err)?;
                }
            }
            tx.commit().await.map_err(db_err)?;
        }
        let (invalidations, _) = broadcast::channel(4096);
        let origin = uuid::Uuid::new_v4().simple().to_string();
        // Before `open` returns: a change made by another instance from now on is not missed.
        let cursor = Cursor::start(&pool).await?;
        let feed_read_at = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let follower = tokio::spawn(follow(
            Arc::clone(&pool),
            invalidations.clone(),
            Arc::clone(&feed_read_at),
            origin.clone(),
            fleet.poll_interval,
            cursor,
        ));
        Ok(Self {
            pool,
            invalidations,
            origin,
            follower,
            feed_read_at,
            answered_within: (fleet.poll_interval * 2).max(Duration::from_secs(1)),
        })
    }
}

/// The schema version the database is at, if it has one; read without the lock, so that the
/// instances of a large fleet starting together do not each run the schema one after another.
async fn schema_version(pool: &Pool) -> Result<Option<i64>, MetadataError> {
    let conn = pool.get().await?;
    let exists: bool = conn
        .query_typed_one("SELECT to_regclass('credproxy_schema') IS NOT NULL", &[])
        .await
        .map_err(db_err)?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(conn
        .query_typed_opt("SELECT version FROM credproxy_schema", &[])
        .await
        .map_err(db_err)?
        .map(|r| r.get(0)))
}

impl Columns for Row {
    fn text(&self, i: usize) -> Result<String, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn int(&self, i: usize) -> Result<i64, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn flag(&self, i: usize) -> Result<bool, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
}

/// Every row, decoded.
fn decode_all<T>(
    rows: Vec<Row>,
    decode: fn(&dyn Columns) -> Result<T, MetadataError>,
) -> Result<Vec<T>, MetadataError> {
    rows.iter().map(|row| decode(row)).collect()
}

/// The row, if any, decoded.
fn decode_opt<T>(
    row: Option<Row>,
    decode: fn(&dyn Columns) -> Result<T, MetadataError>,
) -> Result<Option<T>, MetadataError> {
    row.as_ref().map(|row| decode(row)).transpose()
}

#[async_trait]
impl Liveness for PostgresMetadata {
    /// Readiness probes of 1,000 pods would each be a query; the change feed is read every
    /// poll interval anyway, so a recent successful read answers for the database.
    async fn ping(&self) -> Result<(), MetadataError> {
        let read_at = self.feed_read_at.load(std::sync::atomic::Ordering::Relaxed);
        let age = crate::time::now_unix_ms().saturating_sub(read_at);
        if (0..self.answered_within.as_millis() as i64).contains(&age) {
            return Ok(());
        }
        self.pool
            .get()
            .await?
            .batch_execute("SELECT 1")
            .await
            .map_err(db_err)
    }
}
