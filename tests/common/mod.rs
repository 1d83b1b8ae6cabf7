//! Test harness: runs the real `credproxy` binary on a temporary directory, talks to it over
//! its Unix socket, and kills it by pid when the test ends, pass or fail.
#![allow(dead_code)]

pub mod contract;
pub mod fakes;
pub mod inprocess;
pub mod peers;
pub mod startup;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use contract::send;
use credproxy::client::Reply;
use hyper::Method;
use serde_json::Value;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// Sends signal number `sig` to `pid` with kill(1), so the harness needs no `unsafe`
/// (`unsafe_code` is denied everywhere but `credproxy::sys`). A process already gone is not an
/// error, as with kill(2) before.
pub fn signal(pid: i32, sig: i32) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(std::process::Stdio::null())
        .status();
}

/// `[oauth]` settings sized for tokens that live seconds, not hours.
pub fn fast_refresh(c: &mut toml::Table, scan: &str) {
    set(c, "oauth", "refresh_before", "1m");
    set(c, "oauth", "jitter", "0s");
    set(c, "oauth", "scan_interval", scan);
    set(c, "oauth", "retry_min", "200ms");
    set(c, "oauth", "retry_max", "1s");
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls `check` every 50 ms until it holds; fails the test after [`DEADLINE`].
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A port the OS says is free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The base configuration every test starts from; tests edit the table before starting.
pub fn base_config(dir: &Path) -> toml::Table {
    let text = format!(
        r#"
[server]
socket = "{dir}/api.sock"
socket_mode = "0660"
[metrics]
listen = "127.0.0.1:{port}"
[store]
data_dir = "{dir}/data"
master_key_file = "{dir}/data/master.key"
generate_master_key = true
[log]
level = "debug"
"#,
        dir = dir.display(),
        port = free_port()
    );
    toml::from_str(&text).unwrap()
}

/// Points `c` at `first`'s SQLite database and master key: a second process on one database.
pub fn share_store(c: &mut toml::Table, first: &Daemon) {
    let data = first.dir.path().join("data");
    set(c, "store", "data_dir", data.display().to_string());
    set(
        c,
        "store",
        "master_key_file",
        data.join("master.key").display().to_string(),
    );
    set(c, "store", "generate_master_key", false);
}

pub fn set(table: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert(key.to_owned(), value.into());
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_credproxy")
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Daemon {
    pub async fn start(edit: impl FnOnce(&mut toml::Table, &Path)) -> Daemon {
        Self::start_with_env(edit, &[]).await
    }

    pub async fn start_with_env(
        edit: impl FnOnce(&mut toml::Table, &Path),
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let mut config = base_config(dir.path());
        edit(&mut config, dir.path());
        let mut daemon = Self::spawn(dir, config, env);
        daemon.wait_ready().await;
        daemon
    }

    /// Spawns without waiting for readiness (for start-up failure tests).
    pub fn spawn(dir: tempfile::TempDir, config: toml::Table, env: &[(&str, &str)]) -> Daemon {
        let config_path = dir.path().join("credproxy.toml");
        std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
        let socket = PathBuf::from(config["server"]["socket"].as_str().unwrap());
        let metrics: SocketAddr = config["metrics"]["listen"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(binary());
        command
            .args(["serve", "--config"])
            .arg(&config_path)
            .env_remove("CREDPROXY_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("spawn credproxy");
        Daemon {
            child: Some(child),
            dir,
            socket,
            metrics,
            config_path,
            log_path,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub async fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("credproxy exited early ({status}):\n{}", self.logs());
            }
            if let Ok(reply) = send(&self.socket, Method::GET, "/readyz", &[], None).await {
                if reply.status == 200 {
                    return;
                }
            }
            assert!(
                started.elapsed() < DEADLINE,
                "credproxy not ready in time:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The log once `done` holds for it: audit lines are written by a writer of their own,
    /// up to `log.audit_flush_interval` after the answer.
    pub async fn log_until(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let logs = self.logs();
            if done(&logs) {
                return logs;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "timed out waiting for {what} in the log:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let reply = self
            .call_raw(method, path, &[], body.map(|b| b.to_string().into_bytes()))
            .await;
        let value = if reply.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&reply.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.body).into()))
        };
        (reply.status.as_u16(), value)
    }

    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Reply {
        send(&self.socket, method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("request {path} failed: {e}\n{}", self.logs()))
    }

    pub async fn create(&self, environment: &str, secrets: Value) -> String {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/credentials",
                Some(serde_json::json!({
                    "environment": environment,
                    "integration_type": "github",
                    "metadata": {"team": "core"},
                    "secrets": secrets,
                })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// Creates a credential pinned to `manager`; returns the whole answer.
    pub async fn create_pinned(&self, environment: &str, manager: &str, secrets: Value) -> Value {
        let (status, body) = self
            .call(
                Method::POST,
                "/v1/credentials",
                Some(serde_json::json!({
                    "environment": environment,
                    "integration_type": "x",
                    "secrets_manager_id": manager,
                    "secrets": secrets,
                })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body
    }

    pub async fn metrics_text(&self) -> String {
        let mut stream = tokio::net::TcpStream::connect(self.metrics).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }

    /// The value of one sample, e.g. `credproxy_oauth_refreshes_total{outcome="success"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
    }

    /// kill -9 and wait for it to be gone.
    pub async fn kill(&mut self) {
        signal(self.pid(), libc::SIGKILL);
        self.wait_exit().await;
    }

    /// Starts the daemon again on the same directory and configuration (edited by `edit`, on
    /// a fresh metrics port) once this process has exited.
    pub async fn restart(mut self, edit: impl FnOnce(&mut toml::Table)) -> Daemon {
        let mut config: toml::Table =
            toml::from_str(&std::fs::read_to_string(&self.config_path).unwrap()).unwrap();
        set(
            &mut config,
            "metrics",
            "listen",
            format!("127.0.0.1:{}", free_port()),
        );
        edit(&mut config);
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let mut again = Daemon::spawn(dir, config, &[]);
        again.wait_ready().await;
        again
    }

    /// SIGTERM and wait for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        self.wait_exit().await
    }

    /// SIGTERM, and the drain must end in a clean exit; the logs say why if it does not.
    pub async fn stop(&mut self) {
        let status = self.terminate().await;
        assert!(status.success(), "{status}:\n{}", self.logs());
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "credproxy did not exit:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Runs `credproxy ARGS` to completion.
pub fn run_cli(args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .args(args)
        .env_remove("CREDPROXY_CONFIG")
        .output()
        .expect("run credproxy")
}

/// Every file under `dir`, for greps of what the daemon left on disk.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                out.push(path);
            }
        }
    }
    out
}

pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A TOML table from pairs.
pub fn table(pairs: &[(&str, toml::Value)]) -> toml::Value {
    toml::Value::Table(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

/// A `{file = ...}` secret reference to a new file holding `value`.
pub fn file_ref(dir: &Path, name: &str, value: &str) -> toml::Value {
    let path = dir.join(name);
    std::fs::write(&path, value).unwrap();
    table(&[("file", path.display().to_string().into())])
}

/// Sets `[routing] environments`.
pub fn route(c: &mut toml::Table, environments: &[(&str, &str)]) {
    let envs: toml::Table = environments
        .iter()
        .map(|(e, m)| ((*e).to_owned(), toml::Value::from(*m)))
        .collect();
    set(c, "routing", "environments", envs);
}

/// chmod 600: what the daemon requires of key and token files.
pub fn restrict_to_owner(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
