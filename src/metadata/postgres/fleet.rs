//! Instances sharing the PostgreSQL database: their heartbeats, and the listener that turns
//! other instances' `NOTIFY`s into invalidations (of a cached credential, or of the control
//! plane).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, NoTls};

use super::pool::{Pool, Tls};
use super::{db_err, PostgresMetadata, CHANNEL, CONTROL_CHANNEL, NOW_MS};
use crate::metadata::{FleetRows, Invalidation, MetadataError};

/// Holds a connection that LISTENs for invalidations; reconnects with back-off, and asks for
/// a full cache flush after every reconnect, since notifications sent meanwhile are lost.
/// `ready` is told once the first session listens (or failed to), so that `open` returns only
/// when a change made by another instance can no longer slip by unheard.
pub(super) async fn listen(
    pool: Arc<Pool>,
    out: broadcast::Sender<Invalidation>,
    origin: String,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut ready = Some(ready);
    loop {
        let connected = match &pool.tls {
            Tls::None => pool.config.connect(NoTls).await.map(|(c, conn)| {
                (
                    c,
                    Box::pin(listen_on(conn, out.clone(), origin.clone()))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
                )
            }),
            Tls::Rustls(t) => pool.config.connect(t.clone()).await.map(|(c, conn)| {
                (
                    c,
                    Box::pin(listen_on(conn, out.clone(), origin.clone()))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
                )
            }),
        };
        match connected {
            Ok((client, driver)) => {
                let driver = tokio::spawn(driver);
                if client
                    .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {CONTROL_CHANNEL}"))
                    .await
                    .is_ok()
                {
                    backoff = Duration::from_millis(100);
                    match ready.take() {
                        Some(ready) => {
                            let _ = ready.send(());
                        }
                        None => {
                            tracing::warn!("reconnected to PostgreSQL; flushing the cache, since invalidations may have been missed");
                            let _ = out.send(Invalidation::All);
                        }
                    }
                } else {
                    // `open` goes on without us; the flush on the first success covers the gap.
                    ready.take();
                }
                let _ = driver.await;
                drop(client);
                // Cached entries keep being served meanwhile (nobody can write while the
                // database is unreachable); the flush comes once we listen again.
                tracing::warn!("lost the PostgreSQL invalidation connection; reconnecting");
            }
            Err(e) => {
                ready.take();
                tracing::warn!(error = %db_err(e), retry_in = ?backoff, "cannot connect the invalidation listener");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn listen_on<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    out: broadcast::Sender<Invalidation>,
    origin: String,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    use futures::StreamExt;
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(n)) => {
                if let Some(change) = invalidation(n.channel(), n.payload(), &origin) {
                    let _ = out.send(change);
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// What a notification means to this instance; nothing if it sent it itself (its own cache
/// and control plane are already up to date) or cannot read it.
fn invalidation(channel: &str, payload: &str, origin: &str) -> Option<Invalidation> {
    match channel {
        CHANNEL => match payload.split_once(':') {
            Some((from, id)) if from != origin => Some(Invalidation::Credential(id.to_owned())),
            _ => None,
        },
        CONTROL_CHANNEL if payload != origin => Some(Invalidation::Control),
        _ => None,
    }
}

#[async_trait]
impl FleetRows for PostgresMetadata {
    fn invalidations(&self) -> Option<broadcast::Receiver<Invalidation>> {
        Some(self.invalidations.subscribe())
    }

    async fn instance_heartbeat(&self, id: &str, config_hash: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute(
            &format!(
                "INSERT INTO instances (id, config_hash, heartbeat_ms) VALUES ($1, $2, {NOW_MS}) \
                 ON CONFLICT (id) DO UPDATE SET config_hash = EXCLUDED.config_hash, heartbeat_ms = EXCLUDED.heartbeat_ms"
            ),
            &[&id, &config_hash],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn instance_remove(&self, id: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute("DELETE FROM instances WHERE id = $1", &[&id])
            .await
            .map(drop)
            .map_err(db_err)
    }

    async fn live_config_hashes(&self, max_age: Duration) -> Result<Vec<String>, MetadataError> {
        let conn = self.pool.get().await?;
        let age = max_age.as_millis() as i64;
        Ok(conn
            .query(
                &format!("SELECT DISTINCT config_hash FROM instances WHERE heartbeat_ms >= {NOW_MS} - $1"),
                &[&age],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_become_invalidations_unless_this_instance_sent_them() {
        let me = "me";
        assert_eq!(
            invalidation(CHANNEL, "other:a:b", me),
            Some(Invalidation::Credential("a:b".into()))
        );
        assert_eq!(invalidation(CHANNEL, "me:a", me), None);
        assert_eq!(invalidation(CHANNEL, "garbled", me), None);
        assert_eq!(
            invalidation(CONTROL_CHANNEL, "other", me),
            Some(Invalidation::Control)
        );
        assert_eq!(invalidation(CONTROL_CHANNEL, me, me), None);
        assert_eq!(invalidation("elsewhere", "other:a", me), None);
    }
}
