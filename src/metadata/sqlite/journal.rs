//! The write journal in SQLite.

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{db_err, query_all, SqliteMetadata};
use crate::metadata::codec::{self, JOURNAL_COLUMNS};
use crate::metadata::{JournalEntry, JournalRows, MetadataError};

pub(super) fn journal_insert(
    conn: &Connection,
    entry: &JournalEntry,
) -> Result<i64, MetadataError> {
    conn.execute(
        "INSERT INTO journal (credential_id, store_id, name, created_at, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            entry.credential_id,
            entry.manager_id,
            entry.name,
            entry.created_at,
            entry.kind.as_str()
        ],
    )
    .map_err(db_err)?;
    Ok(conn.last_insert_rowid())
}

#[async_trait]
impl JournalRows for SqliteMetadata {
    async fn journal_add(&self, entry: &JournalEntry) -> Result<i64, MetadataError> {
        let entry = entry.clone();
        self.with(move |c| journal_insert(c, &entry)).await
    }

    async fn journal_remove(&self, id: i64) -> Result<(), MetadataError> {
        self.with(move |c| {
            c.execute("DELETE FROM journal WHERE id = ?1", [id])
                .map(|_| ())
                .map_err(db_err)
        })
        .await
    }

    async fn journal_list(&self) -> Result<Vec<JournalEntry>, MetadataError> {
        self.with(|c| {
            query_all(
                c,
                &format!("SELECT {JOURNAL_COLUMNS} FROM journal ORDER BY id"),
                [],
                codec::journal_entry,
            )
        })
        .await
    }
}
