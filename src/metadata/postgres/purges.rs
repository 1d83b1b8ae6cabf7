//! Soft-deleted secrets awaiting their purge, in PostgreSQL.

use std::collections::HashMap;

use async_trait::async_trait;

use super::{db_err, decode_all, decode_opt, PostgresMetadata};
use crate::metadata::codec::{self, PURGE_COLUMNS};
use crate::metadata::{MetadataError, PurgeEntry, PurgeRows};

#[async_trait]
impl PurgeRows for PostgresMetadata {
    async fn purge_add(&self, e: &PurgeEntry) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            &format!(
                "INSERT INTO purges ({PURGE_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7) \
                 ON CONFLICT (store_id, name) DO UPDATE SET credential_id = EXCLUDED.credential_id, \
                 attempts = EXCLUDED.attempts, next_at_ms = EXCLUDED.next_at_ms, \
                 last_outcome = EXCLUDED.last_outcome, created_at_ms = EXCLUDED.created_at_ms"
            ),
            params![
                &e.manager_id,
                &e.name,
                &e.credential_id,
                &e.attempts,
                &e.next_at_ms,
                &e.last_outcome,
                &e.created_at_ms,
            ],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn purge_get(
        &self,
        manager_id: &str,
        name: &str,
    ) -> Result<Option<PurgeEntry>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(
                &format!("SELECT {PURGE_COLUMNS} FROM purges WHERE store_id = $1 AND name = $2"),
                params![&manager_id, &name],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::purge_entry)
    }

    async fn purge_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PurgeEntry>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!(
                    "SELECT {PURGE_COLUMNS} FROM purges WHERE next_at_ms <= $1 \
                     ORDER BY next_at_ms LIMIT $2"
                ),
                params![&now_ms, &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::purge_entry)
    }

    async fn purge_reschedule(&self, e: &PurgeEntry) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            "UPDATE purges SET attempts = $1, next_at_ms = $2, last_outcome = $3 \
             WHERE store_id = $4 AND name = $5 AND created_at_ms = $6",
            params![
                &e.attempts,
                &e.next_at_ms,
                &e.last_outcome,
                &e.manager_id,
                &e.name,
                &e.created_at_ms,
            ],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn purge_remove(&self, e: &PurgeEntry) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            "DELETE FROM purges WHERE store_id = $1 AND name = $2 AND created_at_ms = $3",
            params![&e.manager_id, &e.name, &e.created_at_ms],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn purge_counts(&self) -> Result<HashMap<String, u64>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                "SELECT store_id, COUNT(*) FROM purges GROUP BY store_id",
                params![],
            )
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let id: String = r.try_get(0).map_err(db_err)?;
                let n: i64 = r.try_get(1).map_err(db_err)?;
                Ok((id, n as u64))
            })
            .collect()
    }
}
