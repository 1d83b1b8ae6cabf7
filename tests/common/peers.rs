//! Real test peers: a moto server (AWS Secrets Manager), an OpenBao dev server, and an OAuth 2
//! authorization server (`tests/peers/oauth-server`, @node-oauth/oauth2-server), each on a
//! free loopback port, stopped by pid when dropped. `scripts/test.sh` installs them and names
//! them in `CREDPROXY_TEST_MOTO`, `CREDPROXY_TEST_BAO` and `CREDPROXY_TEST_NODE_PATH`.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::path::Path;

use super::{file_ref, free_port, table, DEADLINE};

fn peer_binary(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run the suite with scripts/test.sh, which installs the test peers"
        )
    })
}

pub struct Peer {
    child: Child,
    pub port: u16,
    pub log: tempfile::NamedTempFile,
}

impl Peer {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the peer now (to simulate an outage).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// reqwest is built without a default crypto provider (one TLS stack: ring).
fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn wait_http(peer: &mut Peer, path: &str) {
    let started = Instant::now();
    let client = http_client();
    loop {
        if let Some(status) = peer.child.try_wait().unwrap() {
            let log = std::fs::read_to_string(peer.log.path()).unwrap_or_default();
            panic!("test peer exited early ({status}):\n{log}");
        }
        if let Ok(r) = client.get(format!("{}{path}", peer.url())).send().await {
            if r.status().as_u16() < 500 {
                return;
            }
        }
        assert!(started.elapsed() < DEADLINE, "test peer not ready in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn(binary: &str, args: &[String]) -> (Child, tempfile::NamedTempFile) {
    spawn_with_env(binary, args, &[])
}

fn spawn_with_env(
    binary: &str,
    args: &[String],
    env: &[(&str, String)],
) -> (Child, tempfile::NamedTempFile) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(binary)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    (child, log)
}

/// A moto server speaking the Secrets Manager API.
pub async fn moto() -> Peer {
    let port = free_port();
    let (child, log) = spawn(
        &peer_binary("CREDPROXY_TEST_MOTO"),
        &[
            "-H".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ],
    );
    let mut peer = Peer { child, port, log };
    wait_http(&mut peer, "/moto-api/").await;
    peer
}

pub const BAO_ROOT_TOKEN: &str = "root-token-for-tests";

/// An OpenBao dev server: KV v2 at `secret/`, root token `BAO_ROOT_TOKEN`.
pub async fn openbao() -> Peer {
    let port = free_port();
    let (child, log) = spawn(
        &peer_binary("CREDPROXY_TEST_BAO"),
        &[
            "server".into(),
            "-dev".into(),
            format!("-dev-root-token-id={BAO_ROOT_TOKEN}"),
            format!("-dev-listen-address=127.0.0.1:{port}"),
            "-dev-no-store-token".into(),
        ],
    );
    let mut peer = Peer { child, port, log };
    wait_http(&mut peer, "/v1/sys/health").await;
    peer
}

/// The OAuth 2 server: rotating refresh tokens, family revocation on reuse, access tokens that
/// live `access_lifetime` seconds unless a grant says otherwise.
pub async fn oauth_server(access_lifetime: u64) -> Peer {
    let port = free_port();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/peers/oauth-server/server.js"
    );
    let (child, log) = spawn_with_env(
        "node",
        &[
            script.into(),
            "--port".into(),
            port.to_string(),
            "--access-lifetime".into(),
            access_lifetime.to_string(),
        ],
        &[("NODE_PATH", peer_binary("CREDPROXY_TEST_NODE_PATH"))],
    );
    let mut peer = Peer { child, port, log };
    wait_http(&mut peer, "/admin/stats").await;
    peer
}

/// A JSON call to the OAuth server's admin API.
pub async fn oauth_admin(
    peer: &Peer,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut request = http_client().request(method, format!("{}{path}", peer.url()));
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{path}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

pub const CLIENT_ID: &str = "credproxy-test-client";
pub const CLIENT_SECRET: &str = "CANARY-client-secret-4f1a";

/// A `POST /v1/credentials` body for an OAuth credential of `server`'s client `CLIENT_ID`
/// whose access token expires `lifetime` seconds from now.
pub fn oauth_credential(
    server: &Peer,
    environment: &str,
    tokens: &(String, String),
    lifetime: i64,
) -> serde_json::Value {
    serde_json::json!({
        "environment": environment,
        "integration_type": "example-oauth",
        "secrets": {
            "access_token": tokens.0,
            "refresh_token": tokens.1,
            "client_secret": CLIENT_SECRET,
        },
        "oauth": {
            "token_url": format!("{}/token", server.url()),
            "client_id": CLIENT_ID,
            "expires_at": super::now() + lifetime,
        },
    })
}

/// Registers `client_id` and issues a first grant: `(access_token, refresh_token)`.
pub async fn oauth_grant(
    peer: &Peer,
    client_id: &str,
    client_secret: &str,
    access_lifetime: u64,
) -> (String, String) {
    oauth_admin(
        peer,
        reqwest::Method::POST,
        "/admin/clients",
        Some(serde_json::json!({"client_id": client_id, "client_secret": client_secret})),
    )
    .await;
    let g = oauth_admin(
        peer,
        reqwest::Method::POST,
        "/admin/grant",
        Some(serde_json::json!({"client_id": client_id, "access_lifetime": access_lifetime})),
    )
    .await;
    (
        g["access_token"].as_str().unwrap().to_owned(),
        g["refresh_token"].as_str().unwrap().to_owned(),
    )
}

pub async fn oauth_stats(peer: &Peer) -> serde_json::Value {
    oauth_admin(peer, reqwest::Method::GET, "/admin/stats", None).await
}

/// Whether the server accepts `access_token` at its protected resource right now.
pub async fn oauth_token_valid(peer: &Peer, access_token: &str) -> bool {
    http_client()
        .get(format!("{}/resource", peer.url()))
        .bearer_auth(access_token)
        .send()
        .await
        .unwrap()
        .status()
        .is_success()
}

/// Whether `access_token` was valid when a read sent at `sent_ms` (Unix ms) got it: the server
/// accepts it now, or it issued it (and has not revoked it) to expire after `sent_ms`. Asking
/// only "valid now?" would count a token handed out with 100 ms left (a 2-second token's
/// refresh window) that a loaded machine took longer than that to check.
pub async fn oauth_token_valid_since(peer: &Peer, access_token: &str, sent_ms: i64) -> bool {
    if oauth_token_valid(peer, access_token).await {
        return true;
    }
    let answer = http_client()
        .get(format!("{}/admin/token", peer.url()))
        .query(&[("access_token", access_token)])
        .send()
        .await
        .unwrap();
    if !answer.status().is_success() {
        return false;
    }
    let body: serde_json::Value = answer.json().await.unwrap();
    body["expires_at_ms"].as_i64().is_some_and(|e| e > sent_ms)
}

/// A call to OpenBao's HTTP API as root: what the tests use to check the store directly.
pub async fn bao(
    peer: &Peer,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = http_client()
        .request(method, format!("{}{path}", peer.url()))
        .header("X-Vault-Token", BAO_ROOT_TOKEN);
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

/// An AWS SDK client for moto, to check the store directly.
pub async fn aws_client(peer: &Peer) -> aws_sdk_secretsmanager::Client {
    let config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(aws_sdk_secretsmanager::config::BehaviorVersion::latest())
        .region(aws_sdk_secretsmanager::config::Region::new("us-east-1"))
        .endpoint_url(peer.url())
        .credentials_provider(aws_credential_types::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .http_client(
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
                ))
                .build_https(),
        )
        .build();
    aws_sdk_secretsmanager::Client::from_conf(config)
}

/// `[[secrets_manager]]` `aws` pointing at a moto server.
pub fn aws_manager(dir: &Path, moto: &Peer) -> toml::Value {
    table(&[
        ("id", "aws".into()),
        ("type", "aws".into()),
        ("region", "us-east-1".into()),
        ("endpoint", moto.url().into()),
        ("access_key_id", file_ref(dir, "aws-key-id", "testing")),
        ("secret_access_key", file_ref(dir, "aws-secret", "testing")),
    ])
}

/// `[[secrets_manager]]` `vault` pointing at an OpenBao dev server as root.
pub fn vault_manager(dir: &Path, openbao: &Peer) -> toml::Value {
    table(&[
        ("id", "vault".into()),
        ("type", "hashicorp".into()),
        ("address", openbao.url().into()),
        ("token", file_ref(dir, "vault-token", BAO_ROOT_TOKEN)),
    ])
}

/// A PostgreSQL server of its own (Debian's binaries, `CREDPROXY_TEST_PG_BIN`) on a free
/// loopback port, with its data and socket directory in a temporary directory; run as the
/// `postgres` user when the tests run as root (PostgreSQL refuses root). Stopped by the pid
/// in its pid file.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: std::path::PathBuf,
    /// Server options added after the defaults by [`postgres_with`] (a later `-c` wins).
    extra: Vec<String>,
}

fn as_postgres_user(command: &mut Command) -> Command {
    if credproxy::sys::effective_ids().0 != 0 {
        return std::mem::replace(command, Command::new("true"));
    }
    let mut wrapped = Command::new("runuser");
    wrapped
        .args(["-u", "postgres", "--"])
        .arg(command.get_program());
    wrapped.args(command.get_args());
    wrapped
}

impl Postgres {
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut command = Command::new(self.bin.join("pg_ctl"));
        command
            .args(["-D", self.data().to_str().unwrap()])
            .args(args);
        let out = as_postgres_user(&mut command)
            .stdin(Stdio::null())
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts (or restarts) the server and waits until it accepts connections.
    pub fn start(&self) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        for option in &self.extra {
            options.push(' ');
            options.push_str(option);
        }
        let log = self.dir.path().join("postgres.log");
        self.pg_ctl(&[
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]);
    }

    /// Stops the server at once, by the pid in its pid file (SIGQUIT: immediate shutdown).
    pub fn stop(&self) {
        let pid_file = self.data().join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok())
        {
            super::signal(pid, libc::SIGQUIT);
            let started = Instant::now();
            while pid_file.exists() && started.elapsed() < DEADLINE {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn postgres() -> Postgres {
    postgres_with(&[]).await
}

/// [`postgres`] with extra server options, e.g. `["-c max_connections=2500"]`; they come after
/// the defaults, so they override them.
pub async fn postgres_with(options: &[&str]) -> Postgres {
    let bin = std::path::PathBuf::from(peer_binary("CREDPROXY_TEST_PG_BIN"));
    let dir = tempfile::tempdir().unwrap();
    if credproxy::sys::effective_ids().0 == 0 {
        let uid = users_uid("postgres");
        std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
    }
    let pg = Postgres {
        port: free_port(),
        bin,
        dir,
        extra: options.iter().map(|o| (*o).to_owned()).collect(),
    };
    let mut initdb = Command::new(pg.bin.join("initdb"));
    initdb.args([
        "-D",
        pg.data().to_str().unwrap(),
        "-U",
        "postgres",
        "-A",
        "trust",
        "--no-sync",
    ]);
    let out = as_postgres_user(&mut initdb)
        .stdin(Stdio::null())
        .output()
        .expect("initdb");
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.start();
    pg
}

/// PgBouncer in front of a test cluster, in transaction mode (each transaction, or each
/// statement outside one, may run on a different server connection), with at most
/// `server_connections` connections to PostgreSQL.
pub struct PgBouncer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    /// By the pid PgBouncer wrote: the child is `runuser`, which would leave it running.
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(self.dir.path().join("pgbouncer.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            super::signal(pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn pgbouncer(pg: &Postgres, server_connections: usize) -> PgBouncer {
    let dir = tempfile::tempdir().unwrap();
    // PgBouncer refuses to run as root: it runs as `postgres`, from a copy it can read.
    let bin = dir.path().join("pgbouncer");
    std::fs::copy(peer_binary("CREDPROXY_TEST_PGBOUNCER"), &bin).unwrap();
    let port = free_port();
    std::fs::write(dir.path().join("users.txt"), "\"postgres\" \"\"\n").unwrap();
    std::fs::write(
        dir.path().join("pgbouncer.ini"),
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={} dbname=postgres user=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {d}/users.txt\npool_mode = transaction\n\
             default_pool_size = {server_connections}\nmin_pool_size = 0\nreserve_pool_size = 0\n\
             max_client_conn = 2000\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\nserver_check_delay = 0\n\
             ignore_startup_parameters = extra_float_digits\n",
            pg.port,
            d = dir.path().display()
        ),
    )
    .unwrap();
    if credproxy::sys::effective_ids().0 == 0 {
        let uid = users_uid("postgres");
        for f in ["", "pgbouncer", "users.txt", "pgbouncer.ini"] {
            std::os::unix::fs::chown(dir.path().join(f), Some(uid), None).unwrap();
        }
    }
    let mut command = Command::new(&bin);
    command.arg(dir.path().join("pgbouncer.ini"));
    let child = as_postgres_user(&mut command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbouncer");
    let bouncer = PgBouncer { child, port, dir };
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < DEADLINE,
            "PgBouncer did not start: {}",
            bouncer.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bouncer
}

fn users_uid(name: &str) -> u32 {
    credproxy::sys::lookup_user(name)
        .unwrap()
        .expect("no user `postgres`: install Debian's postgresql package")
}

/// An AppRole `credproxy` whose tokens (policy `credproxy`: the KV engine) live `token_ttl`;
/// answers its role id and a secret id.
pub async fn setup_approle(openbao: &Peer, token_ttl: &str) -> (String, String) {
    use reqwest::Method as M;
    bao(
        openbao,
        M::POST,
        "/v1/sys/auth/approle",
        Some(serde_json::json!({"type": "approle"})),
    )
    .await;
    let policy =
        r#"path "secret/*" { capabilities = ["create", "read", "update", "delete", "list"] }"#;
    let (status, _) = bao(
        openbao,
        M::PUT,
        "/v1/sys/policies/acl/credproxy",
        Some(serde_json::json!({"policy": policy})),
    )
    .await;
    assert!(status < 300);
    let (status, _) = bao(
        openbao,
        M::POST,
        "/v1/auth/approle/role/credproxy",
        Some(
            serde_json::json!({"token_policies": ["credproxy"], "token_ttl": token_ttl, "token_max_ttl": "1h"}),
        ),
    )
    .await;
    assert!(status < 300);
    let (_, role) = bao(
        openbao,
        M::GET,
        "/v1/auth/approle/role/credproxy/role-id",
        None,
    )
    .await;
    let (_, secret) = bao(
        openbao,
        M::POST,
        "/v1/auth/approle/role/credproxy/secret-id",
        Some(serde_json::json!({})),
    )
    .await;
    (
        role["data"]["role_id"].as_str().unwrap().to_owned(),
        secret["data"]["secret_id"].as_str().unwrap().to_owned(),
    )
}

/// `[[secrets_manager]]` `vault` logging in with AppRole, the ids in files under `dir`.
pub fn approle_manager(dir: &Path, openbao: &Peer, role_id: &str, secret_id: &str) -> toml::Value {
    let approle = table(&[
        ("role_id", file_ref(dir, "role-id", role_id)),
        ("secret_id", file_ref(dir, "secret-id", secret_id)),
    ]);
    table(&[
        ("id", "vault".into()),
        ("type", "hashicorp".into()),
        ("address", openbao.url().into()),
        ("approle", approle),
    ])
}

/// Revokes every token but root's.
pub async fn revoke_all_but_root(openbao: &Peer) {
    use reqwest::Method as M;
    let (_, accessors) = bao(
        openbao,
        M::from_bytes(b"LIST").unwrap(),
        "/v1/auth/token/accessors",
        None,
    )
    .await;
    let (_, me) = bao(openbao, M::GET, "/v1/auth/token/lookup-self", None).await;
    for accessor in accessors["data"]["keys"].as_array().unwrap() {
        if accessor != &me["data"]["accessor"] {
            bao(
                openbao,
                M::POST,
                "/v1/auth/token/revoke-accessor",
                Some(serde_json::json!({"accessor": accessor})),
            )
            .await;
        }
    }
}
