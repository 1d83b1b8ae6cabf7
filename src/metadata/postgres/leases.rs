//! Leases in PostgreSQL, timed by the database's clock.

use std::time::Duration;

use async_trait::async_trait;

use super::{db_err, PostgresMetadata, NOW_MS};
use crate::metadata::{LeaseRows, MetadataError};

#[async_trait]
impl LeaseRows for PostgresMetadata {
    async fn lease_acquire(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, MetadataError> {
        let conn = self.pool.get().await?;
        let ttl = ttl.as_millis() as i64;
        conn.execute_typed(
            &format!(
                "INSERT INTO leases (key, holder, expires_at_ms) VALUES ($1, $2, {NOW_MS} + $3) \
                 ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder, expires_at_ms = EXCLUDED.expires_at_ms \
                 WHERE leases.expires_at_ms <= {NOW_MS} OR leases.holder = EXCLUDED.holder"
            ),
            params![&key, &holder, &ttl],
        )
        .await
        .map(|n| n == 1)
        .map_err(db_err)
    }

    async fn lease_release(&self, key: &str, holder: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            "DELETE FROM leases WHERE key = $1 AND holder = $2",
            params![&key, &holder],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }
}
