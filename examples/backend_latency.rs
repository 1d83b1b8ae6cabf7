//! Cold-read latency through credproxy versus a direct SDK call to the same server, in one run,
//! against moto (AWS) and an OpenBao dev server. Needs the peers `scripts/test.sh` installs:
//!
//!   CREDPROXY_TEST_MOTO=.peers/venv/bin/moto_server CREDPROXY_TEST_BAO=... \
//!     cargo run --release --example backend_latency -- [N]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credproxy::client::send;
use hyper::Method;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Peer(Child);
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(binary: &str, args: &[String]) -> Peer {
    Peer(
        Command::new(binary)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(binary),
    )
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

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize].as_micros();
    println!(
        "{name:<44} p50 {:>6} µs   p99 {:>6} µs   (n={})",
        pct(0.5),
        pct(0.99),
        samples.len()
    );
}

async fn serve(
    config: &str,
) -> (
    std::path::PathBuf,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let config = credproxy::config::Config::parse(config).unwrap();
    let socket = config.server.socket.clone();
    let parts = credproxy::daemon::build(config).await.unwrap();
    let keys = Arc::clone(&parts.keys);
    let listeners = credproxy::daemon::bind(&parts.config).await.unwrap();
    let app = credproxy::daemon::assemble(parts, credproxy::sys::effective_ids().1).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let path = socket.clone();
    let task = tokio::spawn(async move {
        credproxy::daemon::serve_app(app, listeners, keys, &path, async {
            let _ = stopped.await;
        })
        .await
    });
    (socket, stop, task)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let (moto_port, bao_port) = (free_port(), free_port());
    let _moto = spawn(
        &std::env::var("CREDPROXY_TEST_MOTO").expect("CREDPROXY_TEST_MOTO"),
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            moto_port.to_string(),
        ],
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
    );
    wait_up(&format!("http://127.0.0.1:{moto_port}/moto-api/")).await;
    wait_up(&format!("http://127.0.0.1:{bao_port}/v1/sys/health")).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root"), "root").unwrap();
    std::fs::write(dir.path().join("key"), "testing").unwrap();
    let d = dir.path().display();
    let config = format!(
        r#"
[server]
socket = "{d}/api.sock"
[metrics]
enabled = false
[store]
data_dir = "{d}/data"
generate_master_key = true
[log]
audit = false
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

    // Store N credentials in each manager through credproxy.
    let (socket, stop, task) = serve(&config).await;
    let mut ids: Vec<(String, String)> = Vec::new();
    for env in ["Sandbox", "Production"] {
        for _ in 0..n {
            let body = serde_json::json!({"environment": env, "integration_type": "bench", "secrets": {"access_token": "gho_0123456789abcdef0123456789abcdef0123"}});
            let r = send(
                &socket,
                Method::POST,
                "/v1/credentials",
                &[],
                Some(body.to_string().into_bytes()),
            )
            .await
            .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            ids.push((env.to_owned(), v["id"].as_str().unwrap().to_owned()));
        }
    }
    let _ = stop.send(());
    task.await.unwrap();

    // A fresh instance: every first read is a cold read from the manager.
    let (socket, stop, task) = serve(&config).await;
    for (env, label) in [("Sandbox", "AWS (moto)"), ("Production", "Vault (OpenBao)")] {
        let mut cold = Vec::new();
        let mut cached = Vec::new();
        for (_, id) in ids.iter().filter(|(e, _)| e == env) {
            let path = format!("/v1/credentials/{id}");
            let t = Instant::now();
            let r = send(&socket, Method::GET, &path, &[], None).await.unwrap();
            cold.push(t.elapsed());
            assert_eq!(r.headers["cache-status"], "miss");
            let t = Instant::now();
            send(&socket, Method::GET, &path, &[], None).await.unwrap();
            cached.push(t.elapsed());
        }
        summary(&format!("{label}: cold read through credproxy"), cold);
        summary(&format!("{label}: cached read through credproxy"), cached);
    }
    let _ = stop.send(());
    task.await.unwrap();

    // The same reads straight from the SDKs.
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
    let mut direct = Vec::new();
    for (_, id) in ids.iter().filter(|(e, _)| e == "Sandbox") {
        let t = Instant::now();
        aws.get_secret_value()
            .secret_id(format!("credproxy/Sandbox/{id}"))
            .send()
            .await
            .unwrap();
        direct.push(t.elapsed());
    }
    summary("AWS (moto): direct aws-sdk GetSecretValue", direct);

    let vault = vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(format!("http://127.0.0.1:{bao_port}"))
            .token("root")
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut direct = Vec::new();
    for (_, id) in ids.iter().filter(|(e, _)| e == "Production") {
        let t = Instant::now();
        let _: serde_json::Value =
            vaultrs::kv2::read(&vault, "secret", &format!("credproxy/Production/{id}"))
                .await
                .unwrap();
        direct.push(t.elapsed());
    }
    summary("Vault (OpenBao): direct vaultrs kv2 read", direct);
}
