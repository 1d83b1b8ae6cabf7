//! SQLite metadata store: one file in WAL mode, `synchronous=FULL` so an acknowledged write
//! survives a power cut, schema version checked at open.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::{
    CredentialRecord, CredentialRows, FleetRows, JournalEntry, JournalKind, JournalRows, LeaseRows,
    Liveness, Location, MetadataError, PendingTokenRows, SealedRecord, SealedRows, SealedSummary,
    SCHEMA_VERSION,
};

const SCHEMA_V1: &str = r#"
CREATE TABLE credentials (
    id               TEXT PRIMARY KEY,
    environment      TEXT NOT NULL,
    integration_type TEXT NOT NULL,
    metadata         TEXT NOT NULL,
    oauth            TEXT,
    pinned_manager   TEXT,
    store_id         TEXT NOT NULL,
    store_name       TEXT NOT NULL,
    store_version    TEXT,
    expires_at       INTEGER,
    needs_reauth     INTEGER NOT NULL DEFAULT 0,
    row_version      INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);
CREATE INDEX credentials_location ON credentials (store_id, store_name);
CREATE TABLE journal (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL DEFAULT 'copy',
    credential_id TEXT NOT NULL,
    store_id      TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE TABLE local_secrets (
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    key_id      TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
"#;

/// Version 2: OAuth refresh leases and sealed token responses awaiting write-back.
const SCHEMA_V2: &str = r#"
CREATE TABLE leases (
    key           TEXT PRIMARY KEY,
    holder        TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL
);
CREATE TABLE oauth_pending (
    credential_id TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    version       INTEGER NOT NULL,
    key_id        TEXT NOT NULL,
    wrapped_key   BLOB NOT NULL,
    ciphertext    BLOB NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX credentials_oauth_due ON credentials (expires_at)
    WHERE oauth IS NOT NULL AND needs_reauth = 0 AND expires_at IS NOT NULL;
"#;

/// Version 3: instances sharing the database and the routing configuration each runs.
const SCHEMA_V3: &str = r#"
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    config_hash  TEXT NOT NULL,
    heartbeat_ms INTEGER NOT NULL
);
"#;

pub struct SqliteMetadata {
    // One connection: SQLite serialises writers anyway, and the hot read path is the cache.
    conn: Arc<Mutex<Connection>>,
}

fn db_err(e: rusqlite::Error) -> MetadataError {
    MetadataError::Database(e.to_string())
}

impl SqliteMetadata {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, MetadataError> {
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    MetadataError::Database(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
        }
        let conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        if version > SCHEMA_VERSION {
            return Err(MetadataError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            // Each step in one transaction with the version bump: a crash mid-upgrade leaves
            // the previous version intact.
            let tx = conn.unchecked_transaction().map_err(db_err)?;
            if version < 1 {
                tx.execute_batch(SCHEMA_V1).map_err(db_err)?;
            }
            if version < 2 {
                tx.execute_batch(SCHEMA_V2).map_err(db_err)?;
            }
            if version < 3 {
                tx.execute_batch(SCHEMA_V3).map_err(db_err)?;
            }
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
        }
        // Restrict the file even when the umask is loose: it names every credential.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Opens an existing database for reading only (`credproxy plan`): never creates,
    /// upgrades or writes it, so it is safe next to a running daemon.
    pub fn open_read_only(path: &Path) -> Result<Self, MetadataError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        if version != SCHEMA_VERSION {
            return Err(MetadataError::Database(format!(
                "schema version {version}, this binary reads {SCHEMA_VERSION}; start the daemon once to upgrade it"
            )));
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, MetadataError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| MetadataError::Database(format!("worker failed: {e}")))?
    }
}

const CREDENTIAL_COLUMNS: &str = "id, environment, integration_type, metadata, oauth, pinned_manager, \
     store_id, store_name, store_version, expires_at, needs_reauth, row_version, created_at, updated_at";

fn credential_from_row(row: &Row<'_>) -> rusqlite::Result<Result<CredentialRecord, MetadataError>> {
    let metadata: String = row.get(3)?;
    let oauth: Option<String> = row.get(4)?;
    let id: String = row.get(0)?;
    let metadata = match serde_json::from_str(&metadata) {
        Ok(m) => m,
        Err(_) => return Ok(Err(MetadataError::Corrupt(format!("metadata of {id}")))),
    };
    let oauth = match oauth.map(|o| serde_json::from_str(&o)).transpose() {
        Ok(o) => o,
        Err(_) => return Ok(Err(MetadataError::Corrupt(format!("oauth of {id}")))),
    };
    Ok(Ok(CredentialRecord {
        id,
        environment: row.get(1)?,
        integration_type: row.get(2)?,
        metadata,
        oauth,
        pinned_manager: row.get(5)?,
        location: Location {
            manager_id: row.get(6)?,
            name: row.get(7)?,
            version: row.get(8)?,
        },
        expires_at: row.get(9)?,
        needs_reauth: row.get::<_, i64>(10)? != 0,
        row_version: row.get(11)?,
        created_at: row.get(12)?,
        updated_at: row.get(13)?,
    }))
}

fn sealed_from_row(row: &Row<'_>) -> rusqlite::Result<SealedRecord> {
    Ok(SealedRecord {
        name: row.get(0)?,
        version: row.get(1)?,
        key_id: row.get(2)?,
        wrapped_key: row.get(3)?,
        ciphertext: row.get(4)?,
        created_at: row.get(5)?,
    })
}

fn journal_insert(conn: &Connection, entry: &JournalEntry) -> Result<i64, MetadataError> {
    conn.execute(
        "INSERT INTO journal (credential_id, store_id, name, created_at, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
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

fn json_text<T: serde::Serialize>(v: &T) -> Result<String, MetadataError> {
    serde_json::to_string(v).map_err(|e| MetadataError::Corrupt(e.to_string()))
}

#[async_trait]
impl Liveness for SqliteMetadata {
    async fn ping(&self) -> Result<(), MetadataError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db_err))
            .await
    }
}

#[async_trait]
impl CredentialRows for SqliteMetadata {
    async fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, MetadataError> {
        let id = id.to_owned();
        self.with(move |c| {
            let sql = format!("SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id = ?1");
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            stmt.query_row([id], credential_from_row)
                .optional()
                .map_err(db_err)?
                .transpose()
        })
        .await
    }

    async fn create_credential(
        &self,
        record: &CredentialRecord,
        journal_id: i64,
    ) -> Result<(), MetadataError> {
        let r = record.clone();
        let metadata = json_text(&r.metadata)?;
        let oauth = r.oauth.as_ref().map(json_text).transpose()?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let inserted = tx.execute(
                &format!("INSERT INTO credentials ({CREDENTIAL_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14)"),
                params![
                    r.id, r.environment, r.integration_type, metadata, oauth, r.pinned_manager,
                    r.location.manager_id, r.location.name, r.location.version, r.expires_at,
                    r.needs_reauth as i64, r.row_version, r.created_at, r.updated_at
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
    ) -> Result<Option<i64>, MetadataError> {
        let r = record.clone();
        let abandoned = abandoned.cloned();
        let metadata = json_text(&r.metadata)?;
        let oauth = r.oauth.as_ref().map(json_text).transpose()?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let changed = tx
                .execute(
                    "UPDATE credentials SET environment=?2, integration_type=?3, metadata=?4, oauth=?5, \
                     pinned_manager=?6, store_id=?7, store_name=?8, store_version=?9, expires_at=?10, \
                     needs_reauth=?11, row_version=?12, updated_at=?13 WHERE id=?1 AND row_version=?14",
                    params![
                        r.id, r.environment, r.integration_type, metadata, oauth, r.pinned_manager,
                        r.location.manager_id, r.location.name, r.location.version, r.expires_at,
                        r.needs_reauth as i64, r.row_version, r.updated_at, expected_row_version
                    ],
                )
                .map_err(db_err)?;
            if changed == 0 {
                return Err(MetadataError::Conflict);
            }
            let journal_id = abandoned.as_ref().map(|e| journal_insert(&tx, e)).transpose()?;
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
            let sql = format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE id > ?1 ORDER BY id LIMIT ?2"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let rows = stmt
                .query_map(params![after, limit as i64], credential_from_row)
                .map_err(db_err)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(db_err)??);
            }
            Ok(out)
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
                 OR EXISTS (SELECT 1 FROM journal WHERE store_id = ?1)",
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
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError> {
        self.with(move |c| {
            let sql = format!(
                "SELECT {CREDENTIAL_COLUMNS} FROM credentials \
                 WHERE oauth IS NOT NULL AND needs_reauth = 0 AND expires_at IS NOT NULL \
                 AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
            );
            let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
            let rows = stmt
                .query_map(params![before, limit as i64], credential_from_row)
                .map_err(db_err)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(db_err)??);
            }
            Ok(out)
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
            let mut stmt = c
                .prepare(
                    "SELECT id, credential_id, store_id, name, created_at, kind FROM journal ORDER BY id",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(JournalEntry {
                        id: r.get(0)?,
                        kind: JournalKind::parse(&r.get::<_, String>(5)?),
                        credential_id: r.get(1)?,
                        manager_id: r.get(2)?,
                        name: r.get(3)?,
                        created_at: r.get(4)?,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }
}

#[async_trait]
impl SealedRows for SqliteMetadata {
    async fn sealed_latest(&self, name: &str) -> Result<Option<SealedRecord>, MetadataError> {
        let name = name.to_owned();
        self.with(move |c| {
            c.prepare_cached(
                "SELECT name, version, key_id, wrapped_key, ciphertext, created_at FROM local_secrets \
                 WHERE name = ?1 ORDER BY version DESC LIMIT 1",
            )
            .map_err(db_err)?
            .query_row([name], sealed_from_row)
            .optional()
            .map_err(db_err)
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
            c.prepare_cached(
                "SELECT name, version, key_id, wrapped_key, ciphertext, created_at FROM local_secrets \
                 WHERE name = ?1 AND version = ?2",
            )
            .map_err(db_err)?
            .query_row(params![name, version], sealed_from_row)
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn sealed_insert(&self, record: &SealedRecord) -> Result<(), MetadataError> {
        let r = record.clone();
        self.with(move |c| {
            let result = c.execute(
                "INSERT INTO local_secrets (name, version, key_id, wrapped_key, ciphertext, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![r.name, r.version, r.key_id, r.wrapped_key, r.ciphertext, r.created_at],
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
        let pattern = format!(
            "%{}%",
            query
                .unwrap_or("")
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        );
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT name, MAX(version), MIN(created_at), MAX(created_at) FROM local_secrets \
                     WHERE name LIKE ?1 ESCAPE '\\' GROUP BY name ORDER BY name LIMIT ?2 OFFSET ?3",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![pattern, limit as i64 + 1, offset as i64], |r| {
                    Ok(SealedSummary {
                        name: r.get(0)?,
                        latest_version: r.get(1)?,
                        created_at: r.get(2)?,
                        updated_at: r.get(3)?,
                    })
                })
                .map_err(db_err)?;
            let mut items = rows.collect::<Result<Vec<_>, _>>().map_err(db_err)?;
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
            let mut stmt = c
                .prepare(
                    "SELECT name, version, key_id, wrapped_key, ciphertext, created_at FROM local_secrets \
                     WHERE key_id != ?1 LIMIT ?2",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![key, limit as i64], sealed_from_row)
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
                "INSERT OR REPLACE INTO oauth_pending \
                 (credential_id, name, version, key_id, wrapped_key, ciphertext, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
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
            c.query_row(
                "SELECT name, version, key_id, wrapped_key, ciphertext, created_at \
                 FROM oauth_pending WHERE credential_id = ?1",
                params![id],
                sealed_from_row,
            )
            .optional()
            .map_err(db_err)
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

#[async_trait]
impl LeaseRows for SqliteMetadata {
    async fn lease_acquire(
        &self,
        key: &str,
        holder: &str,
        ttl: std::time::Duration,
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

#[async_trait]
impl FleetRows for SqliteMetadata {
    async fn instance_heartbeat(&self, id: &str, config_hash: &str) -> Result<(), MetadataError> {
        let (id, hash) = (id.to_owned(), config_hash.to_owned());
        let now = crate::time::now_unix_ms();
        self.with(move |c| {
            c.execute(
                "INSERT INTO instances (id, config_hash, heartbeat_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (id) DO UPDATE SET config_hash = excluded.config_hash, heartbeat_ms = excluded.heartbeat_ms",
                params![id, hash, now],
            )
            .map(|_| ())
            .map_err(db_err)
        })
        .await
    }

    async fn instance_remove(&self, id: &str) -> Result<(), MetadataError> {
        let id = id.to_owned();
        self.with(move |c| {
            c.execute("DELETE FROM instances WHERE id = ?1", [id])
                .map(|_| ())
                .map_err(db_err)
        })
        .await
    }

    async fn live_config_hashes(
        &self,
        max_age: std::time::Duration,
    ) -> Result<Vec<String>, MetadataError> {
        let since = crate::time::now_unix_ms() - max_age.as_millis() as i64;
        self.with(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT DISTINCT config_hash FROM instances WHERE heartbeat_ms >= ?1",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([since], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db_err)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> CredentialRecord {
        CredentialRecord {
            id: id.into(),
            environment: "Production".into(),
            integration_type: "github".into(),
            metadata: serde_json::Map::new(),
            oauth: None,
            pinned_manager: None,
            location: Location {
                manager_id: "local".into(),
                name: format!("Production/{id}"),
                version: Some("1".into()),
            },
            expires_at: None,
            needs_reauth: false,
            row_version: 1,
            created_at: 1,
            updated_at: 1,
        }
    }

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
        store.update_credential(&next, 1, None).await.unwrap();
        let stale = store.update_credential(&next, 1, None).await.unwrap_err();
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

    #[tokio::test]
    async fn a_version_1_database_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA_V1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
        }
        let store = SqliteMetadata::open(&path).unwrap();
        store.create_credential(&record("a"), 0).await.unwrap();
        assert!(store
            .lease_acquire("k", "h", std::time::Duration::from_secs(5))
            .await
            .unwrap());
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn a_lease_has_one_holder_until_released_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let one = SqliteMetadata::open(&path).unwrap();
        // A second connection stands in for a second process.
        let two = SqliteMetadata::open(&path).unwrap();
        let long = std::time::Duration::from_secs(30);
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
        assert!(two
            .lease_acquire("c1", "p2", std::time::Duration::ZERO)
            .await
            .unwrap());
        // An expired lease (its holder crashed) is taken over.
        assert!(one.lease_acquire("c1", "p1", long).await.unwrap());
    }

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
        });
        r.expires_at = Some(100);
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
        assert_eq!(store.oauth_due(100, 10).await.unwrap().len(), 1);
        assert!(store.oauth_due(99, 10).await.unwrap().is_empty());
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

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        drop(SqliteMetadata::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = SqliteMetadata::open(&path).err().unwrap();
        assert!(
            matches!(err, MetadataError::SchemaTooNew { found: 99, .. }),
            "{err}"
        );
    }

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
}
