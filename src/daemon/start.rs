//! What start-up checks before it creates anything, and the key and token files it reads.
//!
//! [`preflight`] refuses a start that cannot succeed while nothing exists yet: the socket is
//! held by another daemon or is not a socket, a key or token file is missing or readable by
//! others, a port is taken. Only then are the data directory, the database and (with
//! `store.generate_master_key`) a master key created; a key is generated only when nothing
//! in the database is sealed under a key that is not configured.

use std::path::Path;

use tokio::net::TcpListener;

use super::StartError;
use crate::config::{Config, DatabaseUrl, TcpConfig};
use crate::manager::local::{KeyError, Keyring, MasterKey};
use crate::metadata::Metadata;
use crate::secret::SecretString;

/// The listeners bound before anything is created: a port in use refuses the start early.
pub struct Early {
    pub tcp: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

/// Everything that can refuse the start without creating a file, in order.
pub async fn preflight(config: &Config) -> Result<Early, StartError> {
    socket_free(&config.server.socket)?;
    if let Some(tcp) = &config.server.tcp {
        read_tcp_token(tcp)?;
    }
    check_key_files(config).await?;
    if let Some(path) = config.log.audit_file.as_ref().filter(|_| config.log.audit) {
        crate::audit::check_file(path)?;
    }
    warn_of_a_partial_user_namespace();
    let tcp = match &config.server.tcp {
        Some(t) => Some(super::listen(t.listen).await?),
        None => None,
    };
    let metrics = match &config.metrics {
        Some(m) => Some(super::listen(m.listen).await?),
        None => None,
    };
    Ok(Early { tcp, metrics })
}

/// In a user namespace that does not map every id, callers outside it are reported as the
/// overflow ids: `setup::check` refuses rules naming such callers, and this says so at start.
fn warn_of_a_partial_user_namespace() {
    let ids = crate::setup::Ids::current();
    if ids.partial() {
        let show = |m: &Option<crate::sys::IdMap>| {
            m.as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "all".into())
        };
        tracing::warn!(
            uid_map = %show(&ids.uid_map),
            gid_map = %show(&ids.gid_map),
            "credproxy runs in a user namespace that does not map every id: callers outside it \
             are reported as uid {} / gid {} (and audited so) and match no access rule",
            ids.overflow_uid,
            ids.overflow_gid,
        );
    }
}

/// The checks of `server::unix::bind` that refuse, without its clean-up of a stale socket:
/// a path that is not a socket, or a socket another process answers on.
fn socket_free(path: &Path) -> Result<(), StartError> {
    use crate::server::unix::SocketError;
    use std::os::unix::fs::FileTypeExt;
    let shown = path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            Err(SocketError::NotASocket { path: shown }.into())
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            Err(SocketError::InUse { path: shown }.into())
        }
        _ => Ok(()),
    }
}

/// Reads the TCP listener's token. Like the master key, the file must be private to its owner.
pub fn read_tcp_token(tcp: &TcpConfig) -> Result<SecretString, StartError> {
    use std::os::unix::fs::PermissionsExt;
    let path = &tcp.token_file;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StartError::TokenPermissions {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    Ok(crate::config::SecretRef::File(path.clone()).resolve("server.tcp.token_file")?)
}

/// Loads every configured key file that exists (mode and format); a missing current key is
/// refused here unless it may be generated.
async fn check_key_files(config: &Config) -> Result<(), StartError> {
    let storage = &config.storage;
    for path in &storage.previous_master_key_files {
        MasterKey::load(path)?;
    }
    let path = &storage.master_key_file;
    if path.exists() {
        MasterKey::load(path)?;
    } else if !storage.generate_master_key {
        let expected = match &storage.database {
            DatabaseUrl::Sqlite(db) if db.exists() => existing_key_ids(db).await,
            _ => Vec::new(),
        };
        return Err(StartError::MasterKeyMissing {
            path: path.display().to_string(),
            expected: expected_clause(&expected),
        });
    }
    Ok(())
}

/// The key ids an existing SQLite database's sealed rows need, read without writing; empty if
/// it cannot be read.
async fn existing_key_ids(db: &Path) -> Vec<String> {
    use crate::metadata::SealedRows;
    match crate::metadata::sqlite::SqliteMetadata::open_read_only(db) {
        Ok(store) => store.sealed_key_ids().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

fn expected_clause(ids: &[String]) -> String {
    match ids {
        [] => String::new(),
        [id] => format!("; the metadata database holds data sealed under master key id {id}"),
        ids => format!(
            "; the metadata database holds data sealed under master key ids {}",
            ids.join(", ")
        ),
    }
}

/// The current master key and the previous ones. A missing current key is generated when
/// `store.generate_master_key` allows it and nothing in the database is sealed under a key
/// that is not configured: a new key could not open it, and every such credential would fail.
pub async fn load_keyring(config: &Config, metadata: &dyn Metadata) -> Result<Keyring, StartError> {
    let storage = &config.storage;
    let path = &storage.master_key_file;
    let previous = storage
        .previous_master_key_files
        .iter()
        .map(|p| MasterKey::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    if !path.exists() && storage.generate_master_key {
        let lost: Vec<String> = metadata
            .sealed_key_ids()
            .await?
            .into_iter()
            .filter(|id| !previous.iter().any(|k| k.id() == id))
            .collect();
        if !lost.is_empty() {
            return Err(StartError::MasterKeyLost {
                path: path.display().to_string(),
                database: describe(&storage.database),
                expected: lost.join(", "),
            });
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| KeyError::Write {
                path: parent.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let key = MasterKey::generate();
        key.write_new(path)?;
        tracing::warn!(path = %path.display(), key_id = key.id(), "generated a new master key (store.generate_master_key = true); back it up: without it the local store cannot be read");
    }
    let current = MasterKey::load(path)?;
    // A key file that is there but is not the one the data was sealed under (overwritten,
    // mixed up between environments) is as bad as a lost one: refused before anything is
    // served, rather than every local credential answering 502.
    let unknown: Vec<String> = metadata
        .sealed_key_ids()
        .await?
        .into_iter()
        .filter(|id| id != current.id() && !previous.iter().any(|k| k.id() == id))
        .collect();
    if !unknown.is_empty() {
        return Err(StartError::MasterKeyWrong {
            path: path.display().to_string(),
            current: current.id().to_owned(),
            database: describe(&storage.database),
            unknown: unknown.join(", "),
        });
    }
    Ok(Keyring::new(current, previous))
}

/// The database, for messages: a SQLite file's path; never a PostgreSQL URL.
fn describe(database: &DatabaseUrl) -> String {
    match database {
        DatabaseUrl::Sqlite(path) => path.display().to_string(),
        DatabaseUrl::Postgres { .. } => "(PostgreSQL, store.url)".into(),
    }
}
