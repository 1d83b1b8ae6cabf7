//! One refresher per credential: the credential's lock in this process, then a lease in the
//! metadata database that every process sharing it honours, renewed while the refresh runs.

use std::time::Duration;

use super::{Refreshed, Trigger};
use crate::service::{Service, ServiceError};

/// How long a refresh lease lasts unless renewed. Short, so a crashed holder blocks others
/// only briefly; the holder renews it every third of that while it works.
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long a lease wait polls at most between tries.
const LEASE_POLL_MAX: Duration = Duration::from_millis(200);

fn lease_key(id: &str) -> String {
    format!("oauth-refresh:{id}")
}

impl Service {
    /// Refreshes `id` unless someone else already did since the caller saw `seen_row_version`.
    pub async fn refresh(
        &self,
        id: &str,
        seen_row_version: i64,
        trigger: Trigger,
    ) -> Result<Refreshed, ServiceError> {
        // In this process: one refresher per credential, and no write or move in between.
        let _guard = self.locks.lock(id).await;
        let holder = format!("{}:{}", self.oauth.holder, uuid::Uuid::new_v4());
        self.take_lease(id, &holder).await?;
        let result = {
            let work = self.refresh_leased(id, seen_row_version, trigger);
            let key = lease_key(id);
            let renew = self.renew_lease(&key, &holder, LEASE_TTL);
            tokio::pin!(work, renew);
            tokio::select! {
                r = &mut work => r,
                () = &mut renew => work.await,
            }
        };
        if let Err(e) = self.metadata.lease_release(&lease_key(id), &holder).await {
            tracing::warn!(credential = id, error = %e, "could not release the refresh lease; it expires on its own");
        }
        let outcome = match &result {
            Ok(Refreshed::Done(_)) => None,
            Ok(Refreshed::Skipped(_)) => Some("skipped"),
            Err(_) => None,
        };
        if let Some(o) = outcome {
            self.metrics.oauth_refreshes.with_label_values(&[o]).inc();
        }
        result
    }

    async fn take_lease(&self, id: &str, holder: &str) -> Result<(), ServiceError> {
        let ttl = LEASE_TTL;
        let deadline = tokio::time::Instant::now() + ttl + Duration::from_secs(1);
        let mut pause = Duration::from_millis(10);
        loop {
            if self
                .metadata
                .lease_acquire(&lease_key(id), holder, ttl)
                .await?
            {
                return Ok(());
            }
            if pause == Duration::from_millis(10) {
                self.metrics.lease_waits.inc();
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::TokenUnavailable {
                    detail: "another process has been refreshing this token for too long".into(),
                    retry_after: Duration::from_secs(1),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LEASE_POLL_MAX);
        }
    }
}
