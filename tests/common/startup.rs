//! Helpers for start-up and sandbox tests: the daemon started under a wrapper (`unshare`), and
//! a client run as another user (`setpriv`).

use std::path::PathBuf;
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
