//! The local encrypted store's sealed rows in SQLite.

use async_trait::async_trait;
use rusqlite::params;

use super::{db_err, query_all, query_first, SqliteMetadata};
use crate::metadata::codec::{self, SEALED_COLUMNS, SEALED_KEY_IDS, SEALED_SUMMARY_COLUMNS};
use crate::metadata::{MetadataError, SealedRecord, SealedRows, SealedSummary};

#[async_trait]
impl SealedRows for SqliteMetadata {
    async fn sealed_latest(&self, name: &str) -> Result<Option<SealedRecord>, MetadataError> {
        let name = name.to_owned();
        self.with(move |c| {
            query_first(
                c,
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM local_secrets \
                     WHERE name = ?1 ORDER BY version DESC LIMIT 1"
                ),
                [name],
                codec::sealed,
            )
        })
        .await
    }

    async fn sealed_get(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        let name = name.to_owned();
        self.with(move |c| {
            query_first(
                c,
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM local_secrets WHERE name = ?1 AND version = ?2"
                ),
                params![name, version],
                codec::sealed,
            )
        })
        .await
    }

    async fn sealed_insert(&self, record: &SealedRecord) -> Result<(), MetadataError> {
        let r = record.clone();
        self.with(move |c| {
            let result = c.execute(
                &format!(
                    "INSERT INTO local_secrets ({SEALED_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                ),
                params![
                    r.name,
                    r.version,
                    r.key_id,
                    r.wrapped_key,
                    r.ciphertext,
                    r.created_at
                ],
            );
            match result {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(MetadataError::AlreadyExists)
                }
                Err(e) => Err(db_err(e)),
            }
        })
        .await
    }

    async fn sealed_prune(&self, name: &str, keep_from: i64) -> Result<(), MetadataError> {
        let name = name.to_owned();
        self.with(move |c| {
            c.execute(
                "DELETE FROM local_secrets WHERE name = ?1 AND version < ?2",
                params![name, keep_from],
            )
            .map(|_| ())
            .map_err(db_err)
        })
        .await
    }

    async fn sealed_delete(&self, name: &str) -> Result<(), MetadataError> {
        let name = name.to_owned();
        self.with(move |c| {
            c.execute("DELETE FROM local_secrets WHERE name = ?1", [name])
                .map(|_| ())
                .map_err(db_err)
        })
        .await
    }

    async fn sealed_list(
        &self,
        query: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<SealedSummary>, bool), MetadataError> {
        let pattern = codec::like_pattern(query);
        self.with(move |c| {
            let mut items = query_all(
                c,
                &format!(
                    "SELECT {SEALED_SUMMARY_COLUMNS} FROM local_secrets \
                     WHERE name LIKE ?1 ESCAPE '\\' GROUP BY name ORDER BY name LIMIT ?2 OFFSET ?3"
                ),
                params![pattern, limit as i64 + 1, offset as i64],
                codec::sealed_summary,
            )?;
            let more = items.len() > limit;
            items.truncate(limit);
            Ok((items, more))
        })
        .await
    }

    async fn sealed_with_other_key(
        &self,
        current_key_id: &str,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, MetadataError> {
        let key = current_key_id.to_owned();
        self.with(move |c| {
            query_all(
                c,
                &format!("SELECT {SEALED_COLUMNS} FROM local_secrets WHERE key_id != ?1 LIMIT ?2"),
                params![key, limit as i64],
                codec::sealed,
            )
        })
        .await
    }

    async fn sealed_key_ids(&self) -> Result<Vec<String>, MetadataError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(SEALED_KEY_IDS).map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }

    async fn sealed_rewrap(
        &self,
        record: &SealedRecord,
        old_key_id: &str,
    ) -> Result<(), MetadataError> {
        let r = record.clone();
        let old = old_key_id.to_owned();
        self.with(move |c| {
            c.execute(
                "UPDATE local_secrets SET key_id = ?3, wrapped_key = ?4 \
                 WHERE name = ?1 AND version = ?2 AND key_id = ?5",
                params![r.name, r.version, r.key_id, r.wrapped_key, old],
            )
            .map(|_| ())
            .map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sealed_versions_conflict_and_prune() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetadata::open(&dir.path().join("m.db")).unwrap();
        let rec = |v| SealedRecord {
            name: "n".into(),
            version: v,
            key_id: "k".into(),
            wrapped_key: vec![1],
            ciphertext: vec![2],
            created_at: v,
        };
        store.sealed_insert(&rec(1)).await.unwrap();
        assert!(matches!(
            store.sealed_insert(&rec(1)).await,
            Err(MetadataError::AlreadyExists)
        ));
        store.sealed_insert(&rec(2)).await.unwrap();
        store.sealed_insert(&rec(3)).await.unwrap();
        store.sealed_prune("n", 2).await.unwrap();
        assert!(store.sealed_get("n", 1).await.unwrap().is_none());
        assert_eq!(store.sealed_latest("n").await.unwrap().unwrap().version, 3);
        let (list, more) = store.sealed_list(Some("n"), 0, 10).await.unwrap();
        assert_eq!((list.len(), list[0].latest_version, more), (1, 3, false));
    }

    #[tokio::test]
    async fn every_key_id_something_is_sealed_under_is_listed_once() {
        use crate::metadata::PendingTokenRows;
        use crate::metadata::{ControlRows, ManagerRecord, ManagerSource, ManagerState};
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetadata::open(&dir.path().join("m.db")).unwrap();
        assert!(store.sealed_key_ids().await.unwrap().is_empty());
        let sealed = |name: &str, key: &str| SealedRecord {
            name: name.into(),
            version: 1,
            key_id: key.into(),
            wrapped_key: vec![1],
            ciphertext: vec![2],
            created_at: 1,
        };
        store
            .sealed_insert(&sealed("a", "local-key"))
            .await
            .unwrap();
        store
            .sealed_insert(&sealed("b", "local-key"))
            .await
            .unwrap();
        store
            .pending_token_put("cred", &sealed("cred", "pending-key"))
            .await
            .unwrap();
        let manager = |id: &str, auth: Option<SealedRecord>| ManagerRecord {
            id: id.into(),
            workspace: "default".into(),
            name: id.into(),
            kind: "hashicorp".into(),
            prefix: "credproxy/".into(),
            settings: serde_json::Map::new(),
            auth_keys: vec![],
            auth,
            source: ManagerSource::Api,
            state: ManagerState::Active,
            row_version: 1,
            created_at: 1,
            updated_at: 1,
        };
        store
            .manager_insert(&manager("m1", Some(sealed("m1", "manager-key"))))
            .await
            .unwrap();
        store.manager_insert(&manager("m2", None)).await.unwrap();
        assert_eq!(
            store.sealed_key_ids().await.unwrap(),
            ["local-key", "manager-key", "pending-key"]
        );
    }
}
