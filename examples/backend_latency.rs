//! Cold-read latency through credproxy versus a direct SDK call to the same server, against
//! moto (AWS) and an OpenBao dev server, in one run. Both sides keep their connections: the
//! reads through credproxy go over one persistent HTTP/1.1 connection to the daemon's socket,
//! and the direct reads reuse one aws-sdk client and one vaultrs client. Every read through
//! credproxy is a cold one: the daemon runs with `[cache] ttl = "1ns"`, so each read misses and
//! goes to the manager (checked on the `cache-status` header of every response).
//!
//! The daemon is the release binary in its own process (as deployed), with the shipped
//! config's log settings (level info, audit lines on stderr, written to a file). Direct and
//! through-credproxy reads alternate, credential by credential, so a change in machine load
//! hits both sides alike. Needs the peers `scripts/test.sh` installs; `scripts/bench.sh cold`
//! sets everything up:
//!
//!   CREDPROXY_TEST_MOTO=.peers/venv/bin/moto_server CREDPROXY_TEST_BAO=... \
//!   CREDPROXY_BIN=target/release/credproxy \
//!     cargo run --release --example backend_latency -- [N]

#[path = "support/keepalive.rs"]
mod keepalive;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use keepalive::Conn;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (by its pid) when dropped, also on a panic.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(binary: &str, args: &[String], stderr: Stdio, dir: Option<&Path>) -> Proc {
    let mut command = Command::new(binary);
    command.args(args).stdout(Stdio::null()).stderr(stderr);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    Proc(command.spawn().unwrap_or_else(|e| panic!("{binary}: {e}")))
}

async fn wait_up(url: &str) {
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never came up");
}

/// The daemon's user and kernel CPU time so far, from fields 14 and 15 of /proc/PID/stat.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state): field 14 is index 11.
    (f[11].parse().unwrap(), f[12].parse().unwrap())
}

fn clk_tck() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e6
}

struct Row {
    label: &'static str,
    direct: Vec<Duration>,
    proxied: Vec<Duration>,
    cpu: (f64, f64),
}

struct Created {
    id: String,
    name: String,
    version: Option<String>,
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    assert!(n > 0, "N must be at least 1");
    let warmup = 20;
    let bin = std::env::var("CREDPROXY_BIN").unwrap_or_else(|_| "target/release/credproxy".into());
    let bin = std::fs::canonicalize(&bin)
        .unwrap_or_else(|e| panic!("{bin}: {e} (build it, or set CREDPROXY_BIN)"));
    let (moto_port, bao_port) = (free_port(), free_port());
    let _moto = spawn(
        &std::env::var("CREDPROXY_TEST_MOTO").expect("CREDPROXY_TEST_MOTO"),
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            moto_port.to_string(),
        ],
        Stdio::null(),
        None,
    );
    let _bao = spawn(
        &std::env::var("CREDPROXY_TEST_BAO").expect("CREDPROXY_TEST_BAO"),
        &[
            "server".into(),
            "-dev".into(),
            "-dev-root-token-id=root".into(),
            format!("-dev-listen-address=127.0.0.1:{bao_port}"),
            "-dev-no-store-token".into(),
        ],
        Stdio::null(),
        None,
    );
    wait_up(&format!("http://127.0.0.1:{moto_port}/moto-api/")).await;
    wait_up(&format!("http://127.0.0.1:{bao_port}/v1/sys/health")).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root"), "root").unwrap();
    std::fs::write(dir.path().join("key"), "testing").unwrap();
    let d = dir.path().display();
    // The shipped config's server, log and backend settings; the cache expires at once.
    let config = format!(
        r#"
[server]
socket = "{d}/api.sock"
[metrics]
enabled = false
[store]
data_dir = "{d}/data"
generate_master_key = true
[cache]
ttl = "1ns"
[log]
level = "info"
audit = true
[[secrets_manager]]
id = "aws"
type = "aws"
region = "us-east-1"
endpoint = "http://127.0.0.1:{moto_port}"
access_key_id = {{ file = "{d}/key" }}
secret_access_key = {{ file = "{d}/key" }}
[[secrets_manager]]
id = "vault"
type = "hashicorp"
address = "http://127.0.0.1:{bao_port}"
token = {{ file = "{d}/root" }}
[routing.environments]
Sandbox = "aws"
Production = "vault"
"#
    );
    let config_path = dir.path().join("credproxy.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = std::fs::File::create(dir.path().join("daemon.stderr")).unwrap();
    let daemon = spawn(
        bin.to_str().unwrap(),
        &[
            "serve".into(),
            "--config".into(),
            config_path.display().to_string(),
        ],
        Stdio::from(log),
        Some(dir.path()),
    );
    let pid = daemon.0.id();
    let socket: PathBuf = dir.path().join("api.sock");
    for _ in 0..400 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut conn = Conn::connect(&socket)
        .await
        .expect("the daemon never opened its socket (see its stderr)");

    // N credentials (plus the warm-up ones) in each manager, written through credproxy.
    let mut created: Vec<(&str, Created)> = Vec::new();
    for env in ["Sandbox", "Production"] {
        for _ in 0..n + warmup {
            let body = serde_json::json!({"environment": env, "integration_type": "bench", "secrets": {"access_token": "gho_0123456789abcdef0123456789abcdef0123", "refresh_token": "ghr_0123456789abcdef0123456789abcdef0123"}});
            let r = conn
                .send(
                    Method::POST,
                    "/v1/credentials",
                    Some(body.to_string().into_bytes()),
                )
                .await
                .unwrap();
            assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            created.push((
                env,
                Created {
                    id: v["id"].as_str().unwrap().to_owned(),
                    name: v["reference"]["name"].as_str().unwrap().to_owned(),
                    version: v["reference"]["version"].as_str().map(str::to_owned),
                },
            ));
        }
    }

    // The same reads straight from the SDKs, each client built once and reused.
    let aws = aws_sdk_secretsmanager::Client::from_conf(
        aws_sdk_secretsmanager::Config::builder()
            .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
            .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
            .endpoint_url(format!("http://127.0.0.1:{moto_port}"))
            .credentials_provider(aws_credential_types::Credentials::new(
                "testing", "testing", None, None, "bench",
            ))
            .http_client(
                aws_smithy_http_client::Builder::new()
                    .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                        aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                    ))
                    .build_https(),
            )
            .build(),
    );
    let vault = vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(format!("http://127.0.0.1:{bao_port}"))
            .token("root")
            .build()
            .unwrap(),
    )
    .unwrap();

    // The same request the daemon makes: the stored version of the stored name.
    let direct = |env: &str, c: &Created| {
        let (aws, vault) = (&aws, &vault);
        let (env, name, version) = (env.to_owned(), c.name.clone(), c.version.clone());
        async move {
            if env == "Sandbox" {
                let mut request = aws.get_secret_value().secret_id(name);
                request = match version {
                    Some(v) => request.version_id(v),
                    None => request.version_stage("AWSCURRENT"),
                };
                request.send().await.unwrap();
            } else {
                let _: serde_json::Value = match version {
                    Some(v) => {
                        vaultrs::kv2::read_version(vault, "secret", &name, v.parse().unwrap()).await
                    }
                    None => vaultrs::kv2::read(vault, "secret", &name).await,
                }
                .unwrap();
            }
        }
    };

    let ticks = clk_tck();
    let mut rows = Vec::new();
    for (env, label) in [("Sandbox", "AWS (moto)"), ("Production", "Vault (OpenBao)")] {
        let all: Vec<&Created> = created
            .iter()
            .filter(|(e, _)| *e == env)
            .map(|(_, c)| c)
            .collect();
        let (warm, measured) = all.split_at(warmup);
        let mut row = Row {
            label,
            direct: Vec::new(),
            proxied: Vec::new(),
            cpu: (0.0, 0.0),
        };
        let mut start = (0, 0);
        for (i, c) in warm.iter().chain(measured.iter()).enumerate() {
            let record = i >= warmup;
            if i == warmup {
                // The daemon is idle while the direct reads run, so its CPU time over the
                // measured reads is that of the N cold reads (and its background tasks').
                start = cpu_ticks(pid);
            }
            let path = format!("/v1/credentials/{}", c.id);
            // Alternate which side goes first.
            for side in [i % 2, 1 - i % 2] {
                if side == 0 {
                    let t = Instant::now();
                    direct(env, c).await;
                    let e = t.elapsed();
                    if record {
                        row.direct.push(e);
                    }
                } else {
                    let t = Instant::now();
                    let r = conn.send(Method::GET, &path, None).await.unwrap();
                    let e = t.elapsed();
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    assert_eq!(
                        r.headers["cache-status"], "miss",
                        "a read through credproxy was not a cold one"
                    );
                    if record {
                        row.proxied.push(e);
                    }
                }
            }
        }
        let end = cpu_ticks(pid);
        row.cpu = (
            (end.0 - start.0) as f64 / ticks / n as f64 * 1e6,
            (end.1 - start.1) as f64 / ticks / n as f64 * 1e6,
        );
        rows.push(row);
    }
    drop(conn);
    drop(daemon);

    println!(
        "cold reads, n = {n} per backend after {warmup} warm-up reads; keep-alive on both sides"
    );
    println!();
    println!("| backend | direct p50 | direct p99 | through credproxy p50 | through credproxy p99 | overhead at the median | daemon CPU / cold read (user + kernel) |");
    println!("|---|---|---|---|---|---|---|");
    for mut row in rows {
        row.direct.sort();
        row.proxied.sort();
        let (d50, d99) = (pct(&row.direct, 0.5), pct(&row.direct, 0.99));
        let (p50, p99) = (pct(&row.proxied, 0.5), pct(&row.proxied, 0.99));
        println!(
            "| {} | {d50:.0} µs | {d99:.0} µs | {p50:.0} µs | {p99:.0} µs | {:+.0} µs ({:+.1} %) | {:.0} µs ({:.0} + {:.0}) |",
            row.label,
            p50 - d50,
            (p50 - d50) / d50 * 100.0,
            row.cpu.0 + row.cpu.1,
            row.cpu.0,
            row.cpu.1,
        );
    }
}
