//! Credential rows in PostgreSQL; every change is appended to the change feed.

use std::collections::HashMap;

use async_trait::async_trait;

use super::events::event_insert;
use super::fleet::{change_insert, Change};
use super::journal::journal_insert;
use super::{db_err, decode_all, decode_opt, unique_violation, PostgresMetadata};
use crate::metadata::codec::{self, expires_at_secs, CredentialJson, CREDENTIAL_COLUMNS};
use crate::metadata::{CredentialRecord, CredentialRows, EventRecord, JournalEntry, MetadataError};

#[async_trait]
impl CredentialRows for PostgresMetadata {
    async fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = $1"),
                params![&id],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::credential)
    }

    async fn create_credential(
        &self,
        r: &CredentialRecord,
        journal_id: i64,
    ) -> Result<(), MetadataError> {
        let CredentialJson { metadata, oauth } = CredentialJson::of(r)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let inserted = tx
            .execute_typed(
                &format!("INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"),
                params![&r.id, &r.environment, &r.integration_type, &metadata, &oauth, &r.pinned_manager,
                  &r.location.manager_id, &r.location.name, &r.location.version, &expires_at_secs(r),
                  &r.needs_reauth, &r.row_version, &r.created_at, &r.updated_at, &r.workspace,
                  &r.expires_at_ms, &r.token_at_ms],
            )
            .await;
        match inserted {
            Err(e) if unique_violation(&e) => return Err(MetadataError::AlreadyExists),
            other => other.map_err(db_err)?,
        };
        tx.execute_typed("DELETE FROM journal WHERE id = $1", params![&journal_id])
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn update_credential(
        &self,
        r: &CredentialRecord,
        expected_row_version: i64,
        abandoned: Option<&JournalEntry>,
        event: Option<&EventRecord>,
    ) -> Result<Option<i64>, MetadataError> {
        let CredentialJson { metadata, oauth } = CredentialJson::of(r)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let changed = tx
            .execute_typed(
                "UPDATE credentials SET environment=$2, integration_type=$3, metadata=$4, oauth=$5, \
                 pinned_manager=$6, store_id=$7, store_name=$8, store_version=$9, expires_at=$10, \
                 needs_reauth=$11, row_version=$12, updated_at=$13, workspace=$15, expires_at_ms=$16, token_at_ms=$17 \
                 WHERE id=$1 AND row_version=$14",
                params![&r.id, &r.environment, &r.integration_type, &metadata, &oauth, &r.pinned_manager,
                  &r.location.manager_id, &r.location.name, &r.location.version, &expires_at_secs(r),
                  &r.needs_reauth, &r.row_version, &r.updated_at, &expected_row_version,
                  &r.workspace, &r.expires_at_ms, &r.token_at_ms],
            )
            .await
            .map_err(db_err)?;
        if changed == 0 {
            return Err(MetadataError::Conflict);
        }
        let journal_id = match abandoned {
            Some(e) => Some(journal_insert(&tx, e).await?),
            None => None,
        };
        if let Some(e) = event {
            event_insert(&tx, e, None).await?;
        }
        change_insert(&tx, Change::Credential(&r.id), &self.origin).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(journal_id)
    }

    async fn delete_credential(
        &self,
        id: &str,
        expected_row_version: i64,
        abandoned: &JournalEntry,
    ) -> Result<i64, MetadataError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let changed = tx
            .execute_typed(
                "DELETE FROM credentials WHERE id = $1 AND row_version = $2",
                params![&id, &expected_row_version],
            )
            .await
            .map_err(db_err)?;
        if changed == 0 {
            return Err(MetadataError::Conflict);
        }
        let journal_id = journal_insert(&tx, abandoned).await?;
        tx.execute_typed(
            "DELETE FROM oauth_pending WHERE credential_id = $1",
            params![&id],
        )
        .await
        .map_err(db_err)?;
        change_insert(&tx, Change::Credential(id), &self.origin).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(journal_id)
    }

    async fn list_credentials(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id > $1 ORDER BY id LIMIT $2"
                ),
                params![&after.unwrap_or(""), &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::credential)
    }

    async fn count_credentials(&self) -> Result<u64, MetadataError> {
        let conn = self.pool.get().await?;
        let n: i64 = conn
            .query_typed_one("SELECT COUNT(*) FROM credentials", params![])
            .await
            .map_err(db_err)?
            .get(0);
        Ok(n as u64)
    }

    async fn count_by_manager(&self) -> Result<HashMap<String, u64>, MetadataError> {
        let conn = self.pool.get().await?;
        Ok(conn
            .query_typed(
                "SELECT store_id, COUNT(*) FROM credentials GROUP BY store_id",
                params![],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn location_in_use(&self, manager_id: &str, name: &str) -> Result<bool, MetadataError> {
        let conn = self.pool.get().await?;
        conn.query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM credentials WHERE store_id = $1 AND store_name = $2)",
            params![&manager_id, &name],
        )
        .await
        .map(|r| r.get(0))
        .map_err(db_err)
    }

    async fn manager_in_use(&self, manager_id: &str) -> Result<bool, MetadataError> {
        let conn = self.pool.get().await?;
        conn.query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM credentials WHERE store_id = $1) \
             OR EXISTS (SELECT 1 FROM journal WHERE store_id = $1) \
             OR EXISTS (SELECT 1 FROM purges WHERE store_id = $1)",
            params![&manager_id],
        )
        .await
        .map(|r| r.get(0))
        .map_err(db_err)
    }

    async fn oauth_due(
        &self,
        before: i64,
        after: (i64, &str),
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let (after_expiry, after_id) = after;
        let rows = conn
            .query_typed(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE oauth IS NOT NULL AND NOT needs_reauth \
                     AND expires_at IS NOT NULL AND expires_at <= $1 \
                     AND expires_at >= $3 AND (expires_at > $3 OR id > $4) \
                     ORDER BY expires_at, id LIMIT $2"
                ),
                params![&before, &(limit as i64), &after_expiry, &after_id],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::credential)
    }

    async fn count_needs_reauth(&self) -> Result<u64, MetadataError> {
        let conn = self.pool.get().await?;
        let n: i64 = conn
            .query_typed_one(
                "SELECT COUNT(*) FROM credentials WHERE needs_reauth",
                params![],
            )
            .await
            .map_err(db_err)?
            .get(0);
        Ok(n as u64)
    }
}
