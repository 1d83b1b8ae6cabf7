//! The write journal in SQLite.

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{db_err, query_all, SqliteMetadata};
use crate::metadata::codec::{self, JOURNAL_COLUMNS, JOURNAL_INSERT_COLUMNS};
use crate::metadata::{JournalEntry, JournalRows, MetadataError};

pub(super) fn journal_insert(
    conn: &Connection,
    entry: &JournalEntry,
) -> Result<i64, MetadataError> {
    conn.execute(
        &format!("INSERT INTO journal ({JOURNAL_INSERT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5)"),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stored_kind_it_cannot_read_fails_the_listing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = SqliteMetadata::open(&path).unwrap();
        let entry = JournalEntry {
            id: 0,
            kind: crate::metadata::JournalKind::Version,
            credential_id: "a".into(),
            manager_id: "local".into(),
            name: "Production/a".into(),
            created_at: 1,
        };
        store.journal_add(&entry).await.unwrap();
        assert_eq!(store.journal_list().await.unwrap().len(), 1);
        // What a newer binary, or a hand edit, could leave behind.
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO journal (credential_id, store_id, name, created_at, kind) \
                 VALUES ('b', 'local', 'Production/b', 1, 'moved')",
                [],
            )
            .unwrap();
        let err = store.journal_list().await.unwrap_err();
        assert!(
            matches!(err, MetadataError::Corrupt(ref m) if m.contains("journal.kind")),
            "{err}"
        );
    }
}
