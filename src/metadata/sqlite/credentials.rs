//! Credential rows in SQLite.

use std::collections::HashMap;

use async_trait::async_trait;
use rusqlite::params;

use super::events::event_insert;
use super::journal::journal_insert;
use super::{db_err, query_all, query_first, SqliteMetadata};
use crate::metadata::codec::{self, expires_at_secs, CredentialJson, CREDENTIAL_COLUMNS};
use crate::metadata::{CredentialRecord, CredentialRows, EventRecord, JournalEntry, MetadataError};

#[async_trait]
impl CredentialRows for SqliteMetadata {
    async fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, MetadataError> {
        let id = id.to_owned();
        self.read_inline(move |c| {
            query_first(
                c,
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1"),
                [id],
                codec::credential,
            )
        })
        .await
    }

    async fn create_credential(
        &self,
        record: &CredentialRecord,
        journal_id: i64,
    ) -> Result<(), MetadataError> {
        let r = record.clone();
        let CredentialJson { metadata, oauth } = CredentialJson::of(&r)?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let inserted = tx.execute(
                &format!("INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)"),
                params![
                    r.id, r.environment, r.integration_type, metadata, oauth, r.pinned_manager,
                    r.location.manager_id, r.location.name, r.location.version, expires_at_secs(&r),
                    r.needs_reauth as i64, r.row_version, r.created_at, r.updated_at, r.workspace,
                    r.expires_at_ms, r.token_at_ms
                ],
            );
            match inserted {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    return Err(MetadataError::AlreadyExists)
                }
                other => other.map_err(db_err)?,
            };
            tx.execute("DELETE FROM journal WHERE id = ?1", [journal_id]).map_err(db_err)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn update_credential(
        &self,
        record: &CredentialRecord,
        expected_row_version: i64,
        abandoned: Option<&JournalEntry>,
        event: Option<&EventRecord>,
    ) -> Result<Option<i64>, MetadataError> {
        let r = record.clone();
        let abandoned = abandoned.cloned();
        let event = event.cloned();
        let CredentialJson { metadata, oauth } = CredentialJson::of(&r)?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let changed = tx
                .execute(
                    "UPDATE credentials SET environment=?2, integration_type=?3, metadata=?4, oauth=?5, \
                     pinned_manager=?6, store_id=?7, store_name=?8, store_version=?9, expires_at=?10, \
                     needs_reauth=?11, row_version=?12, updated_at=?13, workspace=?15, expires_at_ms=?16, token_at_ms=?17 \
                     WHERE id=?1 AND row_version=?14",
                    params![
                        r.id, r.environment, r.integration_type, metadata, oauth, r.pinned_manager,
                        r.location.manager_id, r.location.name, r.location.version, expires_at_secs(&r),
                        r.needs_reauth as i64, r.row_version, r.updated_at, expected_row_version,
                        r.workspace, r.expires_at_ms, r.token_at_ms
                    ],
                )
                .map_err(db_err)?;
            if changed == 0 {
                return Err(MetadataError::Conflict);
            }
            let journal_id = abandoned.as_ref().map(|e| journal_insert(&tx, e)).transpose()?;
            if let Some(e) = &event {
                event_insert(&tx, e, None)?;
            }
            tx.commit().map_err(db_err)?;
            Ok(journal_id)
        })
        .await
    }

    async fn delete_credential(
        &self,
        id: &str,
        expected_row_version: i64,
        abandoned: &JournalEntry,
    ) -> Result<i64, MetadataError> {
        let id = id.to_owned();
        let abandoned = abandoned.clone();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let changed = tx
                .execute(
                    "DELETE FROM credentials WHERE id = ?1 AND row_version = ?2",
                    params![id, expected_row_version],
                )
                .map_err(db_err)?;
            if changed == 0 {
                return Err(MetadataError::Conflict);
            }
            let journal_id = journal_insert(&tx, &abandoned)?;
            tx.execute(
                "DELETE FROM oauth_pending WHERE credential_id = ?1",
                params![id],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(journal_id)
        })
        .await
    }

    async fn list_credentials(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        let after = after.unwrap_or("").to_owned();
        self.with(move |c| {
            query_all(
                c,
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id > ?1 ORDER BY id LIMIT ?2"
                ),
                params![after, limit as i64],
                codec::credential,
            )
        })
        .await
    }

    async fn count_credentials(&self) -> Result<u64, MetadataError> {
        self.with(|c| {
            c.query_row("SELECT COUNT(*) FROM credentials", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(db_err)
        })
        .await
    }

    async fn count_by_manager(&self) -> Result<HashMap<String, u64>, MetadataError> {
        self.with(|c| {
            let mut stmt = c
                .prepare_cached("SELECT store_id, COUNT(*) FROM credentials GROUP BY store_id")
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(db_err)?;
            rows.collect::<Result<_, _>>().map_err(db_err)
        })
        .await
    }

    async fn location_in_use(&self, manager_id: &str, name: &str) -> Result<bool, MetadataError> {
        let (manager_id, name) = (manager_id.to_owned(), name.to_owned());
        self.with(move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM credentials WHERE store_id = ?1 AND store_name = ?2)",
                params![manager_id, name],
                |r| r.get::<_, bool>(0),
            )
            .map_err(db_err)
        })
        .await
    }

    async fn manager_in_use(&self, manager_id: &str) -> Result<bool, MetadataError> {
        let manager_id = manager_id.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM credentials WHERE store_id = ?1) \
                 OR EXISTS (SELECT 1 FROM journal WHERE store_id = ?1) \
                 OR EXISTS (SELECT 1 FROM purges WHERE store_id = ?1)",
                params![manager_id],
                |r| r.get::<_, bool>(0),
            )
            .map_err(db_err)
        })
        .await
    }

    async fn oauth_due(
        &self,
        before: i64,
        after: (i64, &str),
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        let (after_expiry, after_id) = (after.0, after.1.to_owned());
        self.with(move |c| {
            query_all(
                c,
                // The first condition on expires_at alone gives the index a range to start from.
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials \
                     WHERE oauth IS NOT NULL AND needs_reauth = 0 AND expires_at IS NOT NULL \
                     AND expires_at <= ?1 AND expires_at >= ?3 AND (expires_at > ?3 OR id > ?4) \
                     ORDER BY expires_at, id LIMIT ?2"
                ),
                params![before, limit as i64, after_expiry, after_id],
                codec::credential,
            )
        })
        .await
    }

    async fn count_needs_reauth(&self) -> Result<u64, MetadataError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM credentials WHERE needs_reauth != 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::sqlite::tests::record;
    use crate::metadata::{JournalKind, JournalRows};

    #[tokio::test]
    async fn update_is_compare_and_swap_on_row_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetadata::open(&dir.path().join("m.db")).unwrap();
        let j = store
            .journal_add(&JournalEntry {
                id: 0,
                kind: JournalKind::Copy,
                credential_id: "a".into(),
                manager_id: "local".into(),
                name: "Production/a".into(),
                created_at: 1,
            })
            .await
            .unwrap();
        store.create_credential(&record("a"), j).await.unwrap();
        assert!(
            store.journal_list().await.unwrap().is_empty(),
            "create clears its journal entry"
        );

        let mut next = record("a");
        next.row_version = 2;
        store.update_credential(&next, 1, None, None).await.unwrap();
        let stale = store
            .update_credential(&next, 1, None, None)
            .await
            .unwrap_err();
        assert!(matches!(stale, MetadataError::Conflict));
        assert_eq!(
            store
                .get_credential("a")
                .await
                .unwrap()
                .unwrap()
                .row_version,
            2
        );
    }
}
