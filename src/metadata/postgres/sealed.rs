//! The local encrypted store's sealed rows in PostgreSQL.

use async_trait::async_trait;

use super::{db_err, decode_all, decode_opt, unique_violation, PostgresMetadata};
use crate::metadata::codec::{self, SEALED_COLUMNS, SEALED_KEY_IDS, SEALED_SUMMARY_COLUMNS};
use crate::metadata::{MetadataError, SealedRecord, SealedRows, SealedSummary};

#[async_trait]
impl SealedRows for PostgresMetadata {
    async fn sealed_latest(&self, name: &str) -> Result<Option<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM local_secrets \
                     WHERE name = $1 ORDER BY version DESC LIMIT 1"
                ),
                params![&name],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::sealed)
    }

    async fn sealed_get(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM local_secrets WHERE name = $1 AND version = $2"
                ),
                params![&name, &version],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::sealed)
    }

    async fn sealed_insert(&self, r: &SealedRecord) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        match conn
            .execute_typed(
                &format!("INSERT INTO local_secrets ({SEALED_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6)"),
                params![
                    &r.name,
                    &r.version,
                    &r.key_id,
                    &r.wrapped_key,
                    &r.ciphertext,
                    &r.created_at,
                ],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => Err(MetadataError::AlreadyExists),
            Err(e) => Err(db_err(e)),
        }
    }

    async fn sealed_prune(&self, name: &str, keep_from: i64) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            "DELETE FROM local_secrets WHERE name = $1 AND version < $2",
            params![&name, &keep_from],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn sealed_delete(&self, name: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed("DELETE FROM local_secrets WHERE name = $1", params![&name])
            .await
            .map(drop)
            .map_err(db_err)
    }

    async fn sealed_list(
        &self,
        query: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<SealedSummary>, bool), MetadataError> {
        let pattern = codec::like_pattern(query);
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!(
                    "SELECT {SEALED_SUMMARY_COLUMNS} FROM local_secrets \
                     WHERE name LIKE $1 GROUP BY name ORDER BY name LIMIT $2 OFFSET $3"
                ),
                params![&pattern, &(limit as i64 + 1), &(offset as i64)],
            )
            .await
            .map_err(db_err)?;
        let mut items = decode_all(rows, codec::sealed_summary)?;
        let more = items.len() > limit;
        items.truncate(limit);
        Ok((items, more))
    }

    async fn sealed_with_other_key(
        &self,
        current_key_id: &str,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!("SELECT {SEALED_COLUMNS} FROM local_secrets WHERE key_id != $1 LIMIT $2"),
                params![&current_key_id, &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::sealed)
    }

    async fn sealed_key_ids(&self) -> Result<Vec<String>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(SEALED_KEY_IDS, params![])
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0).map_err(db_err))
            .collect()
    }

    async fn sealed_rewrap(&self, r: &SealedRecord, old_key_id: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            "UPDATE local_secrets SET key_id = $3, wrapped_key = $4 \
             WHERE name = $1 AND version = $2 AND key_id = $5",
            params![&r.name, &r.version, &r.key_id, &r.wrapped_key, &old_key_id],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }
}
