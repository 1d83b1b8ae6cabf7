//! SQLite metadata store: one file in WAL mode, `synchronous=FULL` so an acknowledged write
//! survives a power cut, schema version checked at open.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{params, Connection, Row};

use super::codec::{
    self, Columns, CredentialJson, CREDENTIAL_COLUMNS, JOURNAL_COLUMNS, SEALED_COLUMNS,
    SEALED_SUMMARY_COLUMNS,
};
use super::schema::{self, Dialect};
use super::{
    CredentialRecord, CredentialRows, FleetRows, JournalEntry, JournalRows, LeaseRows, Liveness,
    MetadataError, PendingTokenRows, SealedRecord, SealedRows, SealedSummary, SCHEMA_VERSION,
};

/// How SQLite spells the shared schema.
const DIALECT: Dialect = Dialect {
    int: "INTEGER",
    bytes: "BLOB",
    flag: "INTEGER NOT NULL DEFAULT 0",
    serial_key: "INTEGER PRIMARY KEY AUTOINCREMENT",
    not_needs_reauth: "needs_reauth = 0",
    // Each version's objects are created once, by the step that adds them: an object already
    // there means the database is not what its version says, and that should fail loudly.
    if_new: "",
};

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
            // In one transaction with the version bump: a crash mid-upgrade leaves the
            // previous version intact.
            let tx = conn.unchecked_transaction().map_err(db_err)?;
            tx.execute_batch(&schema::ddl(&DIALECT, version + 1..=SCHEMA_VERSION))
                .map_err(db_err)?;
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

impl Columns for Row<'_> {
    fn text(&self, i: usize) -> Result<String, MetadataError> {
        self.get(i).map_err(db_err)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, MetadataError> {
        self.get(i).map_err(db_err)
    }
    fn int(&self, i: usize) -> Result<i64, MetadataError> {
        self.get(i).map_err(db_err)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, MetadataError> {
        self.get(i).map_err(db_err)
    }
    fn flag(&self, i: usize) -> Result<bool, MetadataError> {
        self.get(i).map_err(db_err)
    }
    fn bytes(&self, i: usize) -> Result<Vec<u8>, MetadataError> {
        self.get(i).map_err(db_err)
    }
}

/// Every row `sql` returns, decoded.
fn query_all<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: fn(&dyn Columns) -> Result<T, MetadataError>,
) -> Result<Vec<T>, MetadataError> {
    let mut stmt = c.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(db_err)? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// The first row `sql` returns, decoded.
fn query_first<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: fn(&dyn Columns) -> Result<T, MetadataError>,
) -> Result<Option<T>, MetadataError> {
    let mut stmt = c.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    rows.next()
        .map_err(db_err)?
        .map(|row| decode(row))
        .transpose()
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
        let CredentialJson { metadata, oauth } = CredentialJson::of(&r)?;
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
            query_all(
                c,
                &format!(
                    "SELECT {CREDENTIAL_COLUMNS} FROM credentials \
                     WHERE oauth IS NOT NULL AND needs_reauth = 0 AND expires_at IS NOT NULL \
                     AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
                ),
                params![before, limit as i64],
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
            query_all(
                c,
                &format!("SELECT {JOURNAL_COLUMNS} FROM journal ORDER BY id"),
                [],
                codec::journal_entry,
            )
        })
        .await
    }
}

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
    use crate::metadata::{JournalKind, Location};

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
            c.execute_batch(&schema::ddl(&DIALECT, 1..=1)).unwrap();
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
