//! The Unix socket: created with an explicit mode and group, never over something that is not a
//! stale socket of ours.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

use crate::config::GroupSpec;

/// Kept at its old path for the daemon; the implementation lives with the crate's other libc
/// calls.

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("another process is already listening on {path}")]
    InUse { path: String },
    #[error("no such group `{0}`")]
    UnknownGroup(String),
    #[error("cannot set up socket {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Binds the API socket at `path` with `mode` and, if given, `group`.
pub fn bind(
    path: &Path,
    mode: u32,
    group: Option<&GroupSpec>,
) -> Result<UnixListener, SocketError> {
    let shown = path.display().to_string();
    let io_err = |source| SocketError::Io {
        path: shown.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket { path: shown })
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse { path: shown });
            }
            // A socket nobody answers on: left by a previous run that was killed.
            std::fs::remove_file(path).map_err(io_err)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io_err)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o750))
                .map_err(io_err)?;
        }
    }
    let gid = match group {
        None => None,
        Some(GroupSpec::Id(g)) => Some(*g),
        Some(GroupSpec::Name(n)) => Some(
            crate::sys::lookup_group(n)
                .map_err(io_err)?
                .ok_or_else(|| SocketError::UnknownGroup(n.clone()))?,
        ),
    };
    // Bind with a restrictive umask so the socket is never reachable by others, even briefly,
    // before the chmod below. Start-up is the only place that touches the umask.
    let previous = crate::sys::set_umask(0o177);
    let bound = UnixListener::bind(path);
    crate::sys::set_umask(previous);
    let listener = bound.map_err(io_err)?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(io_err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    Ok(listener)
}

/// The socket's group as set on disk (the policy's "socket group").
pub fn socket_gid(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.gid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_a_path_that_is_not_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "precious").unwrap();
        assert!(matches!(
            bind(&path, 0o600, None),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn replaces_a_stale_socket_but_not_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let live = bind(&path, 0o600, None).unwrap();
        assert!(matches!(
            bind(&path, 0o600, None),
            Err(SocketError::InUse { .. })
        ));
        drop(live);
        let again = bind(&path, 0o640, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        drop(again);
    }
}
