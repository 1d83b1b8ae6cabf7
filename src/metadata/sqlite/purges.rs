//! Soft-deleted secrets awaiting their purge, in SQLite.

use std::collections::HashMap;

use async_trait::async_trait;
use rusqlite::params;

use super::{db_err, query_all, query_first, SqliteMetadata};
use crate::metadata::codec::{self, PURGE_COLUMNS};
use crate::metadata::{MetadataError, PurgeEntry, PurgeRows};

#[async_trait]
impl PurgeRows for SqliteMetadata {
    async fn purge_add(&self, entry: &PurgeEntry) -> Result<(), MetadataError> {
        let e = entry.clone();
        self.with(move |c| {
            c.execute(
                &format!(
                    "INSERT OR REPLACE INTO purges ({PURGE_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    e.manager_id,
                    e.name,
                    e.credential_id,
                    e.attempts,
                    e.next_at_ms,
                    e.last_outcome,
                    e.created_at_ms
                ],
            )
            .map(drop)
            .map_err(db_err)
        })
        .await
    }

    async fn purge_get(
        &self,
        manager_id: &str,
        name: &str,
    ) -> Result<Option<PurgeEntry>, MetadataError> {
        let (manager_id, name) = (manager_id.to_owned(), name.to_owned());
        self.with(move |c| {
            query_first(
                c,
                &format!("SELECT {PURGE_COLUMNS} FROM purges WHERE store_id = ?1 AND name = ?2"),
                params![manager_id, name],
                codec::purge_entry,
            )
        })
        .await
    }

    async fn purge_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PurgeEntry>, MetadataError> {
        self.with(move |c| {
            query_all(
                c,
                &format!(
                    "SELECT {PURGE_COLUMNS} FROM purges WHERE next_at_ms <= ?1 \
                     ORDER BY next_at_ms LIMIT ?2"
                ),
                params![now_ms, limit as i64],
                codec::purge_entry,
            )
        })
        .await
    }

    async fn purge_reschedule(&self, entry: &PurgeEntry) -> Result<(), MetadataError> {
        let e = entry.clone();
        self.with(move |c| {
            c.execute(
                "UPDATE purges SET attempts = ?1, next_at_ms = ?2, last_outcome = ?3 \
                 WHERE store_id = ?4 AND name = ?5 AND created_at_ms = ?6",
                params![
                    e.attempts,
                    e.next_at_ms,
                    e.last_outcome,
                    e.manager_id,
                    e.name,
                    e.created_at_ms
                ],
            )
            .map(drop)
            .map_err(db_err)
        })
        .await
    }

    async fn purge_remove(&self, entry: &PurgeEntry) -> Result<(), MetadataError> {
        let e = entry.clone();
        self.with(move |c| {
            c.execute(
                "DELETE FROM purges WHERE store_id = ?1 AND name = ?2 AND created_at_ms = ?3",
                params![e.manager_id, e.name, e.created_at_ms],
            )
            .map(drop)
            .map_err(db_err)
        })
        .await
    }

    async fn purge_counts(&self) -> Result<HashMap<String, u64>, MetadataError> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached("SELECT store_id, COUNT(*) FROM purges GROUP BY store_id")
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db_err)?;
            rows.map(|r| r.map(|(id, n)| (id, n as u64)).map_err(db_err))
                .collect()
        })
        .await
    }
}
