//! Helpers for start-up and sandbox tests: the daemon started under a wrapper (`unshare`), a
//! client run as another user (`setpriv`), and a small tmpfs mounted for the data directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{binary, Daemon};

impl Daemon {
    /// Like [`Daemon::spawn`], with `credproxy serve` run by `wrapper` (e.g.
    /// `["unshare", "--user", "--map-root-user"]`, which execs it: the pid stays the daemon's).
    pub fn spawn_under(wrapper: &[&str], dir: tempfile::TempDir, config: toml::Table) -> Daemon {
        let config_path = dir.path().join("credproxy.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let socket = PathBuf::from(config["server"]["socket"].as_str().unwrap());
        let metrics = config["metrics"]["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(wrapper[0])
            .args(&wrapper[1..])
            .arg(binary())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env_remove("CREDPROXY_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {wrapper:?}: {e}"));
        Daemon {
            child: Some(child),
            dir,
            socket,
            metrics,
            config_path,
            log_path,
        }
    }

    /// Takes the directory and configuration of a daemon that has exited, for a new start on
    /// them (edited by `edit`, on a fresh metrics port).
    pub fn take_for_restart(
        &mut self,
        edit: impl FnOnce(&mut toml::Table),
    ) -> (tempfile::TempDir, toml::Table) {
        let mut config: toml::Table =
            toml::from_str(&std::fs::read_to_string(&self.config_path).unwrap()).unwrap();
        super::set(
            &mut config,
            "metrics",
            "listen",
            format!("127.0.0.1:{}", super::free_port()),
        );
        edit(&mut config);
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, config)
    }
}

/// Whether `unshare --user --map-root-user` works here (unprivileged user namespaces may be
/// disabled, or the tool missing).
pub fn user_namespaces_work() -> bool {
    Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this test runs as root (needed to run a client as another uid, mount, chattr).
pub fn is_root() -> bool {
    credproxy::sys::effective_ids().0 == 0
}

/// `credproxy ARGS` run as `uid`/`gid` with no supplementary groups (util-linux `setpriv`).
pub fn run_cli_as(uid: u32, gid: u32, args: &[&str]) -> Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg(binary())
        .args(args)
        .env_remove("CREDPROXY_CONFIG")
        .output()
        .expect("run setpriv (util-linux)")
}

/// A tmpfs of `size` mounted at `path` for as long as this lives; unmounted on drop, pass or
/// fail. Drop it after the daemon using it (declare it first).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts it, or says why not.
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }

    /// Writes zeros to `name` on it until the file system is full; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path.join(name)).unwrap();
        let chunk = vec![0u8; 16 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        // The last partial page too.
        for _ in 0..4096 {
            if file.write(&[0u8]).is_err() {
                break;
            }
            written += 1;
        }
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Sets or clears the immutable attribute of `path` (chattr); `Err` with the reason where the
/// file system does not support it.
pub fn chattr_immutable(path: &Path, on: bool) -> Result<(), String> {
    let out = Command::new("chattr")
        .arg(if on { "+i" } else { "-i" })
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run chattr: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Clears the immutable attribute of files when dropped, pass or fail, so the temporary
/// directory can be removed.
pub struct Immutable(pub Vec<PathBuf>);

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = chattr_immutable(path, false);
        }
    }
}
