//! The connection pool: at most `store.pool_size` clients, opened when needed and closed after
//! `store.pool_idle_timeout` unused; TLS through rustls when the URL asks for it
//! (`sslmode=require` or stronger). The most recently used connection is handed out first, so
//! an instance whose only traffic is its change-feed poll keeps one connection and the rest
//! time out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, Config, NoTls};

use super::db_err;
use crate::metadata::MetadataError;

#[derive(Clone)]
pub(super) enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

pub(super) struct Pool {
    config: Config,
    tls: Tls,
    /// Oldest first, each with when it was last given back.
    idle: Mutex<Vec<(Client, Instant)>>,
    idle_timeout: Duration,
    slots: tokio::sync::Semaphore,
}

/// A pooled connection; goes back to the pool when dropped, unless it broke.
pub(super) struct Conn<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until dropped")
    }
}

impl Conn<'_> {
    /// Closes this connection instead of giving it back: a statement on it was abandoned
    /// midway, so what it answers next is not known.
    pub(super) fn discard(mut self) {
        self.client.take();
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((client, Instant::now()));
            }
        }
    }
}

/// A new connection; its driver runs in a task of its own and ends when the client is dropped.
async fn connect(config: &Config, tls: &Tls) -> Result<Client, MetadataError> {
    macro_rules! spawn_connection {
        ($connect:expr) => {{
            let (client, connection) = $connect.await.map_err(db_err)?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection closed");
                }
            });
            Ok(client)
        }};
    }
    match tls {
        Tls::None => spawn_connection!(config.connect(NoTls)),
        Tls::Rustls(t) => spawn_connection!(config.connect(t.clone())),
    }
}

impl Pool {
    pub(super) fn new(config: Config, tls: Tls, size: usize, idle_timeout: Duration) -> Self {
        Self {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            idle_timeout,
            slots: tokio::sync::Semaphore::new(size),
        }
    }

    pub(super) async fn get(&self) -> Result<Conn<'_>, MetadataError> {
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| MetadataError::Database("pool closed".into()))?;
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            // Dropping a client closes its connection.
            let now = Instant::now();
            idle.retain(|(c, since)| !c.is_closed() && now - *since < self.idle_timeout);
            idle.pop().map(|(c, _)| c)
        };
        let client = match idle {
            Some(c) => c,
            None => connect(&self.config, &self.tls).await?,
        };
        Ok(Conn {
            pool: self,
            client: Some(client),
            _slot: slot,
        })
    }
}

pub(super) fn tls_for(config: &Config) -> Result<Tls, MetadataError> {
    use tokio_postgres::config::SslMode;
    match config.get_ssl_mode() {
        SslMode::Disable | SslMode::Prefer => Ok(Tls::None),
        _ => {
            use rustls_platform_verifier::ConfigVerifierExt;
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = rustls::ClientConfig::with_platform_verifier()
                .map_err(|e| MetadataError::Database(format!("TLS set-up: {e}")))?;
            Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
                client,
            )))
        }
    }
}
