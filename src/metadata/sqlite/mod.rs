//! The SQLite metadata database, the default: one file in WAL mode, `synchronous=FULL` so an
//! acknowledged write survives a power cut, schema version checked and upgraded at open. This
//! module owns the connection; each role's rows are in the file named after it.

mod control;
mod credentials;
mod events;
mod fleet;
mod journal;
mod leases;
mod pending;
mod purges;
mod sealed;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::{Connection, Row};

use super::codec::Columns;
use super::schema::{self, Dialect};
use super::{Fault, Liveness, MetadataError, SCHEMA_VERSION};

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
    if_new_column: "",
};

pub struct SqliteMetadata {
    // One connection: SQLite serialises writers anyway, and the hot read path is the cache.
    conn: Arc<Mutex<Connection>>,
    /// The database file, to tell why an I/O error happened.
    path: Arc<PathBuf>,
}

fn db_err(e: rusqlite::Error) -> MetadataError {
    use rusqlite::ErrorCode as C;
    let fault = match e.sqlite_error_code() {
        Some(C::DiskFull) => Fault::Full,
        Some(C::ReadOnly) => Fault::ReadOnly,
        Some(C::DatabaseBusy | C::DatabaseLocked) => Fault::Locked,
        Some(
            C::SystemIoFailure
            | C::CannotOpen
            | C::NotADatabase
            | C::PermissionDenied
            | C::FileLockingProtocolFailed
            | C::NoLargeFileSupport,
        ) => Fault::Unavailable,
        _ => return MetadataError::Database(e.to_string()),
    };
    MetadataError::Storage {
        fault,
        message: e.to_string(),
    }
}

/// Below this much free space an I/O error is taken for a full disk: SQLite reports ENOSPC
/// as SQLITE_FULL only on some paths (growing the WAL index gives SQLITE_IOERR_SHMSIZE).
const NEARLY_FULL: u64 = 64 * 1024;

/// An I/O error does not say why. Writing an immutable file or one on a read-only mount, and
/// writing a full disk, are told apart here from what the file system says about the files.
fn refine(error: MetadataError, path: &Path) -> MetadataError {
    let MetadataError::Storage {
        fault: Fault::Unavailable,
        message,
    } = error
    else {
        return error;
    };
    let wal = {
        let mut p = path.as_os_str().to_owned();
        p.push("-wal");
        PathBuf::from(p)
    };
    let refused = [path, wal.as_path()].into_iter().find_map(|p| {
        let e = crate::sys::check_writable(p).err()?;
        matches!(
            e.raw_os_error(),
            Some(libc::EROFS | libc::EPERM | libc::EACCES)
        )
        .then(|| format!("{message} ({} is not writable: {e})", p.display()))
    });
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let free = crate::sys::available_bytes(dir.unwrap_or(Path::new("."))).ok();
    let (fault, message) = match (refused, free) {
        (Some(message), _) => (Fault::ReadOnly, message),
        (None, Some(free)) if free < NEARLY_FULL => (
            Fault::Full,
            format!("{message} ({free} bytes free beside {})", path.display()),
        ),
        _ => (Fault::Unavailable, message),
    };
    MetadataError::Storage { fault, message }
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
        // Before any row is written, and after WAL mode has opened its files.
        restrict_to_owner(path)?;
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
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::new(path.to_owned()),
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
            path: Arc::new(path.to_owned()),
        })
    }

    /// Runs a point read on the calling thread when the connection is free, else as
    /// [`Self::with`]. Handing a read of one row by its key to the blocking pool costs two
    /// thread switches (about a third of a cold read's CPU), while the read itself takes a few
    /// microseconds: in WAL mode a reader does not wait for writers, and the pages it needs
    /// are in SQLite's or the kernel's cache.
    async fn read_inline<T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, MetadataError> + Send + 'static,
    {
        let attempt = match self.conn.try_lock() {
            Ok(mut guard) => Ok(f(&mut guard).map_err(|e| refine(e, &self.path))),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                Ok(f(&mut p.into_inner()).map_err(|e| refine(e, &self.path)))
            }
            Err(std::sync::TryLockError::WouldBlock) => Err(f),
        };
        match attempt {
            Ok(result) => result,
            Err(f) => self.with(f).await,
        }
    }

    async fn with<T, F>(&self, f: F) -> Result<T, MetadataError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, MetadataError> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let path = Arc::clone(&self.path);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard).map_err(|e| refine(e, &path))
        })
        .await
        .map_err(|e| MetadataError::Database(format!("worker failed: {e}")))?
    }
}

/// Restricts the database file, and the WAL files beside it if present, to mode 0600 even
/// under a loose umask: together they name every credential. A failure fails the open, since
/// the mode is promised. WAL files SQLite creates later take the database file's mode.
#[cfg(unix)]
fn restrict_to_owner(path: &Path) -> Result<(), MetadataError> {
    use std::os::unix::fs::PermissionsExt;
    let restrict = |file: &Path| {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            MetadataError::Database(format!("cannot set mode 0600 on {}: {e}", file.display()))
        })
    };
    restrict(path)?;
    for suffix in ["-wal", "-shm"] {
        let mut sibling = path.as_os_str().to_owned();
        sibling.push(suffix);
        let sibling = Path::new(&sibling);
        if sibling.exists() {
            restrict(sibling)?;
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict_to_owner(_: &Path) -> Result<(), MetadataError> {
    Ok(())
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
    fn opt_bytes(&self, i: usize) -> Result<Option<Vec<u8>>, MetadataError> {
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

#[cfg(test)]
impl SqliteMetadata {
    /// Caps the database at its current size (`max_page_count`, this connection only): a
    /// write that needs another page then fails with SQLITE_FULL, as on a full disk.
    pub(crate) async fn cap_at_current_size(&self) {
        self.with(|c| {
            let pages: i64 = c
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(db_err)?;
            c.pragma_update(None, "max_page_count", pages)
                .map_err(db_err)
        })
        .await
        .unwrap();
    }
}

#[async_trait]
impl Liveness for SqliteMetadata {
    async fn ping(&self) -> Result<(), MetadataError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db_err))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{ControlRows, CredentialRecord, CredentialRows, LeaseRows, Location};

    #[cfg(unix)]
    #[test]
    fn a_database_whose_mode_cannot_be_set_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone.db");
        let err = restrict_to_owner(&missing).unwrap_err();
        assert!(
            matches!(err, MetadataError::Database(ref m) if m.contains("mode 0600") && m.contains("gone.db")),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn the_database_and_its_wal_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = SqliteMetadata::open(&path).unwrap();
        store.create_credential(&record("a"), 0).await.unwrap();
        let mut checked = 0;
        for suffix in ["", "-wal", "-shm"] {
            let file = dir.path().join(format!("m.db{suffix}"));
            if let Ok(meta) = std::fs::metadata(&file) {
                assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{suffix}");
                checked += 1;
            }
        }
        assert!(checked >= 2, "the WAL file exists while the store is open");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn wal_files_left_with_a_loose_mode_are_tightened_at_open() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        // An earlier binary's files, still open (as after a crash, they outlive the process).
        let earlier = Connection::open(&path).unwrap();
        earlier.pragma_update(None, "journal_mode", "WAL").unwrap();
        earlier.execute_batch("CREATE TABLE t (x)").unwrap();
        let wal = dir.path().join("m.db-wal");
        for file in [&path, &wal] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let _store = SqliteMetadata::open(&path).unwrap();
        for file in [&path, &wal] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
    }

    #[tokio::test]
    async fn a_write_refused_by_a_read_only_database_is_classified_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = SqliteMetadata::open(&path).unwrap();
        store.create_credential(&record("a"), 0).await.unwrap();
        let read_only = SqliteMetadata::open_read_only(&path).unwrap();
        let e = read_only
            .create_credential(&record("b"), 0)
            .await
            .unwrap_err();
        assert_eq!(e.fault(), Some(Fault::ReadOnly), "{e}");
        assert!(e.to_string().contains("readonly database"), "{e}");
        assert!(read_only.get_credential("a").await.unwrap().is_some());
    }

    pub(super) fn record(id: &str) -> CredentialRecord {
        CredentialRecord {
            id: id.into(),
            workspace: "default".into(),
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
            expires_at_ms: None,
            token_at_ms: None,
            needs_reauth: false,
            row_version: 1,
            created_at: 1,
            updated_at: 1,
        }
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
    async fn a_version_3_database_is_upgraded_in_place_and_its_credentials_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            // What a version 3 binary left: its schema and a credential it wrote.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&schema::ddl(&DIALECT, 1..=3)).unwrap();
            c.execute(
                "INSERT INTO credentials (id, environment, integration_type, metadata, \
                 store_id, store_name, store_version, row_version, created_at, updated_at) \
                 VALUES ('old', 'Production', 'github', '{}', 'local', 'Production/old', '1', \
                 1, 1, 1)",
                [],
            )
            .unwrap();
            c.pragma_update(None, "user_version", 3).unwrap();
        }
        let store = SqliteMetadata::open(&path).unwrap();
        let mut old = record("old");
        old.location.name = "Production/old".into();
        assert_eq!(store.get_credential("old").await.unwrap().unwrap(), old);
        assert_eq!(old.workspace, "default");
        assert_eq!(store.control_version().await.unwrap(), 0, "seeded once");
        let mut new = record("new");
        new.workspace = "team-a".into();
        store.create_credential(&new, 0).await.unwrap();
        assert_eq!(
            store
                .get_credential("new")
                .await
                .unwrap()
                .unwrap()
                .workspace,
            "team-a"
        );
        store
            .routing_put(&crate::metadata::RoutingRecord {
                workspace: "team-a".into(),
                default: Some("local".into()),
                environments: Default::default(),
            })
            .await
            .unwrap();
        assert_eq!(store.control_version().await.unwrap(), 1);
        drop(store);
        // Reopening runs nothing again (SQLite has no `ADD COLUMN IF NOT EXISTS`).
        let store = SqliteMetadata::open(&path).unwrap();
        assert_eq!(store.control_version().await.unwrap(), 1);
        assert_eq!(store.routing_all().await.unwrap().len(), 1);
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn a_version_4_database_gains_the_purge_table_in_place() {
        use crate::metadata::{PurgeEntry, PurgeRows};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            // What a version 4 binary left: its schema and a credential it wrote.
            let c = Connection::open(&path).unwrap();
            c.execute_batch(&schema::ddl(&DIALECT, 1..=4)).unwrap();
            c.execute(
                "INSERT INTO credentials (id, environment, integration_type, metadata, \
                 store_id, store_name, store_version, row_version, created_at, updated_at) \
                 VALUES ('old', 'Production', 'github', '{}', 'local', 'Production/old', '1', \
                 1, 1, 1)",
                [],
            )
            .unwrap();
            c.pragma_update(None, "user_version", 4).unwrap();
        }
        let entry = PurgeEntry {
            manager_id: "kv".into(),
            name: "n".into(),
            credential_id: "old".into(),
            attempts: 0,
            next_at_ms: 1,
            last_outcome: None,
            created_at_ms: 1,
        };
        {
            let store = SqliteMetadata::open(&path).unwrap();
            assert_eq!(
                store.get_credential("old").await.unwrap().unwrap().id,
                "old"
            );
            store.purge_add(&entry).await.unwrap();
        }
        // Reopening runs nothing again, and the entry is still there.
        let store = SqliteMetadata::open(&path).unwrap();
        assert_eq!(store.purge_due(1, 10).await.unwrap(), vec![entry]);
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
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
}
