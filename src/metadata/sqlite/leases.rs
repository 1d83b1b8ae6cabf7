//! Leases in SQLite.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;

use super::{db_err, SqliteMetadata};
use crate::metadata::{LeaseRows, MetadataError};

#[async_trait]
impl LeaseRows for SqliteMetadata {
    async fn lease_acquire(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, MetadataError> {
        let key = key.to_owned();
        let holder = holder.to_owned();
        let now = crate::time::now_unix_ms();
        let until = now + ttl.as_millis() as i64;
        self.with(move |c| {
            c.execute(
                "INSERT INTO leases (key, holder, expires_at_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms \
                 WHERE leases.expires_at_ms <= ?4 OR leases.holder = excluded.holder",
                params![key, holder, until, now],
            )
            .map(|changed| changed == 1)
            .map_err(db_err)
        })
        .await
    }

    async fn lease_release(&self, key: &str, holder: &str) -> Result<(), MetadataError> {
        let key = key.to_owned();
        let holder = holder.to_owned();
        self.with(move |c| {
            c.execute(
                "DELETE FROM leases WHERE key = ?1 AND holder = ?2",
                params![key, holder],
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
    async fn a_lease_has_one_holder_until_released_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let one = SqliteMetadata::open(&path).unwrap();
        // A second connection stands in for a second process.
        let two = SqliteMetadata::open(&path).unwrap();
        let long = Duration::from_secs(30);
        assert!(one.lease_acquire("c1", "p1", long).await.unwrap());
        assert!(!two.lease_acquire("c1", "p2", long).await.unwrap());
        assert!(
            two.lease_acquire("c2", "p2", long).await.unwrap(),
            "per key"
        );
        assert!(
            one.lease_acquire("c1", "p1", long).await.unwrap(),
            "re-entrant"
        );
        two.lease_release("c1", "p2").await.unwrap();
        assert!(
            !two.lease_acquire("c1", "p2", long).await.unwrap(),
            "only the holder releases"
        );
        one.lease_release("c1", "p1").await.unwrap();
        assert!(two.lease_acquire("c1", "p2", Duration::ZERO).await.unwrap());
        // An expired lease (its holder crashed) is taken over.
        assert!(one.lease_acquire("c1", "p1", long).await.unwrap());
    }
}
