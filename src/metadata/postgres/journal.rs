//! The write journal in PostgreSQL.

use async_trait::async_trait;

use super::{db_err, decode_all, PostgresMetadata};
use crate::metadata::codec::{self, JOURNAL_COLUMNS, JOURNAL_INSERT_COLUMNS};
use crate::metadata::{JournalEntry, JournalRows, MetadataError};

pub(super) async fn journal_insert(
    tx: &tokio_postgres::Transaction<'_>,
    e: &JournalEntry,
) -> Result<i64, MetadataError> {
    tx.query_typed_one(
        &format!(
            "INSERT INTO journal ({JOURNAL_INSERT_COLUMNS}) VALUES ($1,$2,$3,$4,$5) RETURNING id"
        ),
        params![
            &e.credential_id,
            &e.manager_id,
            &e.name,
            &e.created_at,
            &e.kind.as_str(),
        ],
    )
    .await
    .map(|r| r.get(0))
    .map_err(db_err)
}

#[async_trait]
impl JournalRows for PostgresMetadata {
    async fn journal_add(&self, e: &JournalEntry) -> Result<i64, MetadataError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let id = journal_insert(&tx, e).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(id)
    }

    async fn journal_remove(&self, id: i64) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed("DELETE FROM journal WHERE id = $1", params![&id])
            .await
            .map(drop)
            .map_err(db_err)
    }

    async fn journal_list(&self) -> Result<Vec<JournalEntry>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!("SELECT {JOURNAL_COLUMNS} FROM journal ORDER BY id"),
                params![],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::journal_entry)
    }
}
