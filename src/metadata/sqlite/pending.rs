//! Pending OAuth token responses in SQLite.

use async_trait::async_trait;
use rusqlite::params;

use super::{db_err, query_first, SqliteMetadata};
use crate::metadata::codec::{self, SEALED_COLUMNS};
use crate::metadata::{MetadataError, PendingTokenRows, SealedRecord};

#[async_trait]
impl PendingTokenRows for SqliteMetadata {
    async fn pending_token_put(
        &self,
        credential_id: &str,
        sealed: &SealedRecord,
    ) -> Result<(), MetadataError> {
        let id = credential_id.to_owned();
        let r = sealed.clone();
        self.with(move |c| {
            c.execute(
                &format!(
                    "INSERT OR REPLACE INTO oauth_pending (credential_id, {SEALED_COLUMNS}) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    id,
                    r.name,
                    r.version,
                    r.key_id,
                    r.wrapped_key,
                    r.ciphertext,
                    r.created_at
                ],
            )
            .map(|_| ())
            .map_err(db_err)
        })
        .await
    }

    async fn pending_token_get(
        &self,
        credential_id: &str,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        let id = credential_id.to_owned();
        self.with(move |c| {
            query_first(
                c,
                &format!("SELECT {SEALED_COLUMNS} FROM oauth_pending WHERE credential_id = ?1"),
                [id],
                codec::sealed,
            )
        })
        .await
    }

    async fn pending_token_delete(&self, credential_id: &str) -> Result<(), MetadataError> {
        let id = credential_id.to_owned();
        self.with(move |c| {
            c.execute(
                "DELETE FROM oauth_pending WHERE credential_id = ?1",
                params![id],
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
    use crate::metadata::sqlite::tests::record;
    use crate::metadata::{CredentialRows, JournalEntry, JournalKind};

    #[tokio::test]
    async fn pending_token_answers_are_kept_per_credential_and_go_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteMetadata::open(&dir.path().join("m.db")).unwrap();
        let mut r = record("a");
        r.oauth = Some(crate::metadata::OAuthDescription {
            token_url: "https://t".into(),
            client_id: "c".into(),
            scopes: vec![],
            client_auth: Default::default(),
            grant: Default::default(),
            audience: None,
            resource: None,
        });
        r.expires_at_ms = Some(100_000);
        store.create_credential(&r, 0).await.unwrap();
        let sealed = SealedRecord {
            name: "oauth-pending:a".into(),
            version: 1,
            key_id: "k".into(),
            wrapped_key: vec![1],
            ciphertext: vec![2],
            created_at: 5,
        };
        store.pending_token_put("a", &sealed).await.unwrap();
        store
            .pending_token_put(
                "a",
                &SealedRecord {
                    version: 2,
                    ..sealed.clone()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            store.pending_token_get("a").await.unwrap().unwrap().version,
            2
        );
        let first = (i64::MIN, "");
        assert_eq!(store.oauth_due(100, first, 10).await.unwrap().len(), 1);
        assert!(store.oauth_due(99, first, 10).await.unwrap().is_empty());
        assert!(store
            .oauth_due(100, (100, "a"), 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(store.oauth_due(100, (99, "z"), 10).await.unwrap().len(), 1);
        let abandoned = JournalEntry {
            id: 0,
            kind: JournalKind::Copy,
            credential_id: "a".into(),
            manager_id: "local".into(),
            name: "n".into(),
            created_at: 1,
        };
        store.delete_credential("a", 1, &abandoned).await.unwrap();
        assert!(store.pending_token_get("a").await.unwrap().is_none());
    }
}
