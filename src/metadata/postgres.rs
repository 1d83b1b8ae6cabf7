//! PostgreSQL metadata store for fleet mode: many credproxy instances share one database.
//! A small connection pool, TLS through rustls when the URL asks for it (`sslmode=require`
//! or stronger), the schema created or upgraded at start under an advisory lock (so instances
//! starting together do not race), and every change of a credential row announced with
//! `NOTIFY` so the other instances drop their cached copy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row};

use super::codec::{
    self, Columns, CredentialJson, CREDENTIAL_COLUMNS, JOURNAL_COLUMNS, SEALED_COLUMNS,
    SEALED_SUMMARY_COLUMNS,
};
use super::schema::{self, Dialect};
use super::{
    CredentialRecord, CredentialRows, FleetRows, Invalidation, JournalEntry, JournalRows,
    LeaseRows, Liveness, MetadataError, PendingTokenRows, SealedRecord, SealedRows, SealedSummary,
    SCHEMA_VERSION,
};

/// The channel that carries invalidations.
const CHANNEL: &str = "credproxy_invalidate";
/// Key of the advisory lock held while the schema is created or upgraded.
const SCHEMA_LOCK: i64 = 0x6372_6564_7072_7879; // "credprxy"
const POOL_SIZE: usize = 8;

/// How PostgreSQL spells the shared schema.
const DIALECT: Dialect = Dialect {
    int: "BIGINT",
    bytes: "BYTEA",
    flag: "BOOLEAN NOT NULL DEFAULT FALSE",
    serial_key: "BIGSERIAL PRIMARY KEY",
    not_needs_reauth: "NOT needs_reauth",
    // Every start runs the whole schema (under the advisory lock), so each object is created
    // only if missing; that is also how an older database gains the newer objects.
    if_new: "IF NOT EXISTS ",
};

/// The database's clock in milliseconds: leases compare times from many hosts.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

fn db_err(e: tokio_postgres::Error) -> MetadataError {
    // The server's message names tables and constraints, never values.
    MetadataError::Database(match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    })
}

fn unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

#[derive(Clone)]
enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

struct Pool {
    config: Config,
    tls: Tls,
    idle: Mutex<Vec<Client>>,
    slots: tokio::sync::Semaphore,
}

/// A pooled connection; goes back to the pool when dropped, unless it broke.
struct Conn<'a> {
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

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(client);
            }
        }
    }
}

async fn connect(
    config: &Config,
    tls: &Tls,
) -> Result<(Client, tokio::task::JoinHandle<()>), MetadataError> {
    macro_rules! spawn_connection {
        ($connect:expr) => {{
            let (client, connection) = $connect.await.map_err(db_err)?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection closed");
                }
            });
            Ok((client, task))
        }};
    }
    match tls {
        Tls::None => spawn_connection!(config.connect(NoTls)),
        Tls::Rustls(t) => spawn_connection!(config.connect(t.clone())),
    }
}

impl Pool {
    async fn get(&self) -> Result<Conn<'_>, MetadataError> {
        let slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| MetadataError::Database("pool closed".into()))?;
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                match idle.pop() {
                    Some(c) if c.is_closed() => continue,
                    other => break other,
                }
            }
        };
        let client = match idle {
            Some(c) => c,
            None => connect(&self.config, &self.tls).await?.0,
        };
        Ok(Conn {
            pool: self,
            client: Some(client),
            _slot: slot,
        })
    }
}

pub struct PostgresMetadata {
    pool: Arc<Pool>,
    invalidations: broadcast::Sender<Invalidation>,
    /// Tags this instance's own notifications, which it does not need to act on.
    origin: String,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresMetadata {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn tls_for(config: &Config) -> Result<Tls, MetadataError> {
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

impl PostgresMetadata {
    /// Connects, creates or upgrades the schema (under an advisory lock), and starts the
    /// invalidation listener.
    pub async fn open(url: &str) -> Result<Self, MetadataError> {
        let mut config: Config = url.parse().map_err(|_| {
            MetadataError::Database("store.url is not a valid PostgreSQL URL".into())
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("credproxy");
        let tls = tls_for(&config)?;
        let pool = Arc::new(Pool {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            slots: tokio::sync::Semaphore::new(POOL_SIZE),
        });
        {
            let mut conn = pool.get().await?;
            let tx = conn.transaction().await.map_err(db_err)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
                .await
                .map_err(db_err)?;
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS credproxy_schema (version BIGINT NOT NULL);\n{}",
                schema::ddl(&DIALECT, 1..=SCHEMA_VERSION)
            ))
            .await
            .map_err(db_err)?;
            let version: Option<i64> = tx
                .query_opt("SELECT version FROM credproxy_schema", &[])
                .await
                .map_err(db_err)?
                .map(|r| r.get(0));
            match version {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(MetadataError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(_) => {
                    tx.execute(
                        "UPDATE credproxy_schema SET version = $1",
                        &[&SCHEMA_VERSION],
                    )
                    .await
                    .map_err(db_err)?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO credproxy_schema (version) VALUES ($1)",
                        &[&SCHEMA_VERSION],
                    )
                    .await
                    .map_err(db_err)?;
                }
            }
            tx.commit().await.map_err(db_err)?;
        }
        let (invalidations, _) = broadcast::channel(4096);
        let origin = uuid::Uuid::new_v4().simple().to_string();
        let listener = tokio::spawn(listen(
            Arc::clone(&pool),
            invalidations.clone(),
            origin.clone(),
        ));
        Ok(Self {
            pool,
            invalidations,
            origin,
            listener,
        })
    }

    fn notify_payload(&self, id: &str) -> String {
        format!("{}:{id}", self.origin)
    }
}

/// Holds a connection that LISTENs for invalidations; reconnects with back-off, and asks for
/// a full cache flush after every reconnect, since notifications sent meanwhile are lost.
async fn listen(pool: Arc<Pool>, out: broadcast::Sender<Invalidation>, origin: String) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
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
                    .batch_execute(&format!("LISTEN {CHANNEL}"))
                    .await
                    .is_ok()
                {
                    backoff = Duration::from_millis(100);
                    if !first {
                        tracing::warn!("reconnected to PostgreSQL; flushing the cache, since invalidations may have been missed");
                        let _ = out.send(Invalidation::All);
                    }
                    first = false;
                }
                let _ = driver.await;
                drop(client);
                // Cached entries keep being served meanwhile (nobody can write while the
                // database is unreachable); the flush comes once we listen again.
                tracing::warn!("lost the PostgreSQL invalidation connection; reconnecting");
            }
            Err(e) => {
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
                if let Some((from, id)) = n.payload().split_once(':') {
                    if from != origin {
                        let _ = out.send(Invalidation::Credential(id.to_owned()));
                    }
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

impl Columns for Row {
    fn text(&self, i: usize) -> Result<String, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn int(&self, i: usize) -> Result<i64, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn flag(&self, i: usize) -> Result<bool, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, MetadataError> {
        self.try_get(i).map_err(db_err)
    }
}

/// Every row, decoded.
fn decode_all<T>(
    rows: Vec<Row>,
    decode: fn(&dyn Columns) -> Result<T, MetadataError>,
) -> Result<Vec<T>, MetadataError> {
    rows.iter().map(|row| decode(row)).collect()
}

/// The row, if any, decoded.
fn decode_opt<T>(
    row: Option<Row>,
    decode: fn(&dyn Columns) -> Result<T, MetadataError>,
) -> Result<Option<T>, MetadataError> {
    row.as_ref().map(|row| decode(row)).transpose()
}

async fn journal_insert(
    tx: &tokio_postgres::Transaction<'_>,
    e: &JournalEntry,
) -> Result<i64, MetadataError> {
    tx.query_one(
        "INSERT INTO journal (credential_id, store_id, name, created_at, kind) VALUES ($1,$2,$3,$4,$5) RETURNING id",
        &[&e.credential_id, &e.manager_id, &e.name, &e.created_at, &e.kind.as_str()],
    )
    .await
    .map(|r| r.get(0))
    .map_err(db_err)
}

#[async_trait]
impl Liveness for PostgresMetadata {
    async fn ping(&self) -> Result<(), MetadataError> {
        self.pool
            .get()
            .await?
            .batch_execute("SELECT 1")
            .await
            .map_err(db_err)
    }
}

#[async_trait]
impl CredentialRows for PostgresMetadata {
    async fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                &format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::credential)
    }

    async fn create_credential(
        &self,
        r: &CredentialRecord,
        journal_id: i64,
    ) -> Result<(), MetadataError> {
        let CredentialJson { metadata, oauth } = CredentialJson::of(r)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let inserted = tx
            .execute(
                &format!("INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"),
                &[&r.id, &r.environment, &r.integration_type, &metadata, &oauth, &r.pinned_manager,
                  &r.location.manager_id, &r.location.name, &r.location.version, &r.expires_at,
                  &r.needs_reauth, &r.row_version, &r.created_at, &r.updated_at],
            )
            .await;
        match inserted {
            Err(e) if unique_violation(&e) => return Err(MetadataError::AlreadyExists),
            other => other.map_err(db_err)?,
        };
        tx.execute("DELETE FROM journal WHERE id = $1", &[&journal_id])
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn update_credential(
        &self,
        r: &CredentialRecord,
        expected_row_version: i64,
        abandoned: Option<&JournalEntry>,
    ) -> Result<Option<i64>, MetadataError> {
        let CredentialJson { metadata, oauth } = CredentialJson::of(r)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let changed = tx
            .execute(
                "UPDATE credentials SET environment=$2, integration_type=$3, metadata=$4, oauth=$5, \
                 pinned_manager=$6, store_id=$7, store_name=$8, store_version=$9, expires_at=$10, \
                 needs_reauth=$11, row_version=$12, updated_at=$13 WHERE id=$1 AND row_version=$14",
                &[&r.id, &r.environment, &r.integration_type, &metadata, &oauth, &r.pinned_manager,
                  &r.location.manager_id, &r.location.name, &r.location.version, &r.expires_at,
                  &r.needs_reauth, &r.row_version, &r.updated_at, &expected_row_version],
            )
            .await
            .map_err(db_err)?;
        if changed == 0 {
            return Err(MetadataError::Conflict);
        }
        let journal_id = match abandoned {
            Some(e) => Some(journal_insert(&tx, e).await?),
            None => None,
        };
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &self.notify_payload(&r.id)],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(journal_id)
    }

    async fn delete_credential(
        &self,
        id: &str,
        expected_row_version: i64,
        abandoned: &JournalEntry,
    ) -> Result<i64, MetadataError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let changed = tx
            .execute(
                "DELETE FROM credentials WHERE id = $1 AND row_version = $2",
                &[&id, &expected_row_version],
            )
            .await
            .map_err(db_err)?;
        if changed == 0 {
            return Err(MetadataError::Conflict);
        }
        let journal_id = journal_insert(&tx, abandoned).await?;
        tx.execute("DELETE FROM oauth_pending WHERE credential_id = $1", &[&id])
            .await
            .map_err(db_err)?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &self.notify_payload(id)],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        Ok(journal_id)
    }

    async fn list_credentials(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id > $1 ORDER BY id LIMIT $2"
                ),
                &[&after.unwrap_or(""), &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::credential)
    }

    async fn count_credentials(&self) -> Result<u64, MetadataError> {
        let conn = self.pool.get().await?;
        let n: i64 = conn
            .query_one("SELECT COUNT(*) FROM credentials", &[])
            .await
            .map_err(db_err)?
            .get(0);
        Ok(n as u64)
    }

    async fn location_in_use(&self, manager_id: &str, name: &str) -> Result<bool, MetadataError> {
        let conn = self.pool.get().await?;
        conn.query_one(
            "SELECT EXISTS (SELECT 1 FROM credentials WHERE store_id = $1 AND store_name = $2)",
            &[&manager_id, &name],
        )
        .await
        .map(|r| r.get(0))
        .map_err(db_err)
    }

    async fn manager_in_use(&self, manager_id: &str) -> Result<bool, MetadataError> {
        let conn = self.pool.get().await?;
        conn.query_one(
            "SELECT EXISTS (SELECT 1 FROM credentials WHERE store_id = $1) \
             OR EXISTS (SELECT 1 FROM journal WHERE store_id = $1)",
            &[&manager_id],
        )
        .await
        .map(|r| r.get(0))
        .map_err(db_err)
    }

    async fn oauth_due(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE oauth IS NOT NULL AND NOT needs_reauth \
                     AND expires_at IS NOT NULL AND expires_at <= $1 ORDER BY expires_at LIMIT $2"
                ),
                &[&before, &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::credential)
    }

    async fn count_needs_reauth(&self) -> Result<u64, MetadataError> {
        let conn = self.pool.get().await?;
        let n: i64 = conn
            .query_one("SELECT COUNT(*) FROM credentials WHERE needs_reauth", &[])
            .await
            .map_err(db_err)?
            .get(0);
        Ok(n as u64)
    }
}

#[async_trait]
impl JournalRows for PostgresMetadata {
    async fn journal_add(&self, e: &JournalEntry) -> Result<i64, MetadataError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let id = journal_insert(&tx, e).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(id)
    }

    async fn journal_remove(&self, id: i64) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute("DELETE FROM journal WHERE id = $1", &[&id])
            .await
            .map(drop)
            .map_err(db_err)
    }

    async fn journal_list(&self) -> Result<Vec<JournalEntry>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                &format!("SELECT {JOURNAL_COLUMNS} FROM journal ORDER BY id"),
                &[],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::journal_entry)
    }
}

#[async_trait]
impl SealedRows for PostgresMetadata {
    async fn sealed_latest(&self, name: &str) -> Result<Option<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM local_secrets \
                     WHERE name = $1 ORDER BY version DESC LIMIT 1"
                ),
                &[&name],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::sealed)
    }

    async fn sealed_get(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                &format!(
                    "SELECT {SEALED_COLUMNS} FROM local_secrets WHERE name = $1 AND version = $2"
                ),
                &[&name, &version],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::sealed)
    }

    async fn sealed_insert(&self, r: &SealedRecord) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        match conn
            .execute(
                &format!("INSERT INTO local_secrets ({SEALED_COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6)"),
                &[
                    &r.name,
                    &r.version,
                    &r.key_id,
                    &r.wrapped_key,
                    &r.ciphertext,
                    &r.created_at,
                ],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if unique_violation(&e) => Err(MetadataError::AlreadyExists),
            Err(e) => Err(db_err(e)),
        }
    }

    async fn sealed_prune(&self, name: &str, keep_from: i64) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "DELETE FROM local_secrets WHERE name = $1 AND version < $2",
            &[&name, &keep_from],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn sealed_delete(&self, name: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute("DELETE FROM local_secrets WHERE name = $1", &[&name])
            .await
            .map(drop)
            .map_err(db_err)
    }

    async fn sealed_list(
        &self,
        query: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<SealedSummary>, bool), MetadataError> {
        let pattern = codec::like_pattern(query);
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {SEALED_SUMMARY_COLUMNS} FROM local_secrets \
                     WHERE name LIKE $1 GROUP BY name ORDER BY name LIMIT $2 OFFSET $3"
                ),
                &[&pattern, &(limit as i64 + 1), &(offset as i64)],
            )
            .await
            .map_err(db_err)?;
        let mut items = decode_all(rows, codec::sealed_summary)?;
        let more = items.len() > limit;
        items.truncate(limit);
        Ok((items, more))
    }

    async fn sealed_with_other_key(
        &self,
        current_key_id: &str,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                &format!("SELECT {SEALED_COLUMNS} FROM local_secrets WHERE key_id != $1 LIMIT $2"),
                &[&current_key_id, &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::sealed)
    }

    async fn sealed_rewrap(&self, r: &SealedRecord, old_key_id: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "UPDATE local_secrets SET key_id = $3, wrapped_key = $4 \
             WHERE name = $1 AND version = $2 AND key_id = $5",
            &[&r.name, &r.version, &r.key_id, &r.wrapped_key, &old_key_id],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }
}

#[async_trait]
impl PendingTokenRows for PostgresMetadata {
    async fn pending_token_put(
        &self,
        credential_id: &str,
        r: &SealedRecord,
    ) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute(
            &format!("INSERT INTO oauth_pending (credential_id, {SEALED_COLUMNS}) \
             VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (credential_id) DO UPDATE SET \
             name = EXCLUDED.name, version = EXCLUDED.version, key_id = EXCLUDED.key_id, \
             wrapped_key = EXCLUDED.wrapped_key, ciphertext = EXCLUDED.ciphertext, created_at = EXCLUDED.created_at"),
            &[&credential_id, &r.name, &r.version, &r.key_id, &r.wrapped_key, &r.ciphertext, &r.created_at],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }

    async fn pending_token_get(
        &self,
        credential_id: &str,
    ) -> Result<Option<SealedRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                &format!("SELECT {SEALED_COLUMNS} FROM oauth_pending WHERE credential_id = $1"),
                &[&credential_id],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::sealed)
    }

    async fn pending_token_delete(&self, credential_id: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "DELETE FROM oauth_pending WHERE credential_id = $1",
            &[&credential_id],
        )
        .await
        .map(drop)
        .map_err(db_err)
    }
}

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
        conn.execute(
            &format!(
                "INSERT INTO leases (key, holder, expires_at_ms) VALUES ($1, $2, {NOW_MS} + $3) \
                 ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder, expires_at_ms = EXCLUDED.expires_at_ms \
                 WHERE leases.expires_at_ms <= {NOW_MS} OR leases.holder = EXCLUDED.holder"
            ),
            &[&key, &holder, &ttl],
        )
        .await
        .map(|n| n == 1)
        .map_err(db_err)
    }

    async fn lease_release(&self, key: &str, holder: &str) -> Result<(), MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "DELETE FROM leases WHERE key = $1 AND holder = $2",
            &[&key, &holder],
        )
        .await
        .map(drop)
        .map_err(db_err)
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
