//! Pending OAuth token responses in PostgreSQL.

use async_trait::async_trait;

use super::{db_err, decode_opt, PostgresMetadata};
use crate::metadata::codec::{self, SEALED_COLUMNS};
use crate::metadata::{MetadataError, PendingTokenRows, SealedRecord};

#[async_trait]
impl PendingTokenRows for PostgresMetadata {
    async fn pending_token_put(
        &self,
        credential_id: &str,
        r: &SealedRecord,
    ) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            &format!("INSERT INTO oauth_pending (credential_id, {SEALED_COLUMNS}) \
             VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (credential_id) DO UPDATE SET \
             name = EXCLUDED.name, version = EXCLUDED.version, key_id = EXCLUDED.key_id, \
             wrapped_key = EXCLUDED.wrapped_key, ciphertext = EXCLUDED.ciphertext, created_at = EXCLUDED.created_at"),
            params![&credential_id, &r.name, &r.version, &r.key_id, &r.wrapped_key, &r.ciphertext, &r.created_at],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn pending_token_get(
        &self,
        credential_id: &str,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(
                &format!("SELECT {SEALED_COLUMNS} FROM oauth_pending WHERE credential_id = $1"),
                params![&credential_id],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::sealed)
    }

    async fn pending_token_delete(&self, credential_id: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            "DELETE FROM oauth_pending WHERE credential_id = $1",
            params![&credential_id],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }
}
