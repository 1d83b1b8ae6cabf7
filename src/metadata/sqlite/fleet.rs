//! Instances sharing the SQLite file. SQLite cannot announce other processes' changes, so
//! [`FleetRows::invalidations`] keeps its default of none.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;

use super::{db_err, SqliteMetadata};
use crate::metadata::{FleetRows, MetadataError};

#[async_trait]
impl FleetRows for SqliteMetadata {
    async fn instance_heartbeat(&self, id: &str, config_hash: &str) -> Result<(), MetadataError> {
        let (id, hash) = (id.to_owned(), config_hash.to_owned());
        let now = crate::time::now_unix_ms();
        self.with(move |c| {
            c.execute(
                "INSERT INTO instances (id, config_hash, heartbeat_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET config_hash = excluded.config_hash, heartbeat_ms = excluded.heartbeat_ms",
                params![id, hash, now],
            )
            .map(|_| ())
            .map_err(db_err)
        })
        .await
    }

    async fn instance_remove(&self, id: &str) -> Result<(), MetadataError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.execute("DELETE FROM instances WHERE id = ?1", [id])
                .map(|_| ())
                .map_err(db_err)
        })
        .await
    }

    async fn live_config_hashes(&self, max_age: Duration) -> Result<Vec<String>, MetadataError> {
        let since = crate::time::now_unix_ms() - max_age.as_millis() as i64;
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT DISTINCT config_hash FROM instances WHERE heartbeat_ms >= ?1",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([since], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }
}
