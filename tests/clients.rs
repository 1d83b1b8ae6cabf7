//! The worker client examples in examples/clients/ (Python, Node, Go, curl), each run as a
//! worker would run it, against a real daemon and, for the OAuth cases, the real OAuth test
//! server: a plain read prints the field's value, `409 needs_reauth` exits 2, `503
//! token_unavailable` is retried after its `Retry-After` (exit 5 when it persists, the new
//! token once the token endpoint is back), an unknown id exits 4.
//!
//! Interpreters: `CREDPROXY_TEST_PYTHON` (default `.peers/venv/bin/python`, with httpx),
//! `CREDPROXY_TEST_NODE` (default `node`), `CREDPROXY_TEST_GO` (default `go`; the client is
//! built once, offline, into `CARGO_TARGET_TMPDIR`, with `GOCACHE` and `GOPATH` there unless
//! set), `curl` 7.84+ and `jq` on the PATH. A missing one skips its test with a notice, or
//! fails it when `CREDPROXY_TEST_CLIENTS_REQUIRED=1` (CI).

mod common;

use common::wait_for;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::peers::{
    self, oauth_admin, oauth_credential, oauth_grant, oauth_token_valid, Peer, CLIENT_ID,
    CLIENT_SECRET,
};
use common::{fast_refresh, Daemon, DEADLINE};
use hyper::Method;
use serde_json::json;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/clients");
const PLAIN_KEY: &str = "plain-api-key-for-client-tests";
const GET_503: &str = r#"credproxy_http_requests_total{route="credential_get",status="503"}"#;

/// How to run one language's example: a program and the arguments before the client's own.
struct Client {
    name: &'static str,
    program: PathBuf,
    prefix: Vec<PathBuf>,
}

/// What a finished run left: its exit code, stdout and stderr (diagnostics only).
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// A client process in a process group of its own (curl's script has children), killed with
/// its group when dropped, whatever the test's outcome.
struct Running {
    child: Child,
    reaped: bool,
    stdout: tempfile::NamedTempFile,
    stderr: tempfile::NamedTempFile,
    started: Instant,
    what: String,
}

impl Running {
    fn exited(&mut self) -> bool {
        if !self.reaped {
            self.reaped = self.child.try_wait().unwrap().is_some();
        }
        self.reaped
    }

    fn output(&self) -> (String, String) {
        (
            std::fs::read_to_string(self.stdout.path()).unwrap_or_default(),
            std::fs::read_to_string(self.stderr.path()).unwrap_or_default(),
        )
    }

    async fn wait(mut self) -> Run {
        while !self.exited() {
            assert!(
                self.started.elapsed() < DEADLINE,
                "{} did not finish in time; stderr:\n{}",
                self.what,
                self.output().1
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = self.child.wait().unwrap();
        let (stdout, stderr) = self.output();
        Run {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
            took: self.started.elapsed(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // The whole group: a client that exited may still have left a child behind.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Client {
    fn spawn(&self, d: &Daemon, args: &[&str]) -> Running {
        use std::os::unix::process::CommandExt;
        let stdout = tempfile::NamedTempFile::new().unwrap();
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&self.program)
            .args(&self.prefix)
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .env_remove("CREDPROXY_SOCKET")
            .stdin(Stdio::null())
            .stdout(stdout.reopen().unwrap())
            .stderr(stderr.reopen().unwrap())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {} client: {e}", self.name));
        Running {
            child,
            reaped: false,
            stdout,
            stderr,
            started: Instant::now(),
            what: format!("the {} client {args:?}", self.name),
        }
    }

    async fn run(&self, d: &Daemon, args: &[&str]) -> Run {
        self.spawn(d, args).wait().await
    }
}

fn required() -> bool {
    std::env::var("CREDPROXY_TEST_CLIENTS_REQUIRED").is_ok_and(|v| v == "1")
}

/// The client, or `None` (with a notice) when its interpreter is missing and not required.
fn client_or_skip(name: &str, found: Result<Client, String>) -> Option<Client> {
    match found {
        Ok(client) => Some(client),
        Err(why) if required() => {
            panic!("the {name} client cannot run ({why}) and CREDPROXY_TEST_CLIENTS_REQUIRED=1")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED: the {name} client example ({why}); set CREDPROXY_TEST_CLIENTS_REQUIRED=1 to fail instead"
            );
            None
        }
    }
}

/// Runs `program args` and answers its stdout if it succeeds.
fn probe(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{}` cannot run: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} {}` failed: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn from_env(var: &str, default: impl Into<PathBuf>) -> PathBuf {
    std::env::var_os(var).map_or_else(|| default.into(), PathBuf::from)
}

fn python() -> Result<Client, String> {
    let python = from_env(
        "CREDPROXY_TEST_PYTHON",
        concat!(env!("CARGO_MANIFEST_DIR"), "/.peers/venv/bin/python"),
    );
    probe(&python, &["-c", "import httpx"])?;
    Ok(Client {
        name: "Python",
        program: python,
        prefix: vec![format!("{EXAMPLES}/python/credproxy_client.py").into()],
    })
}

fn node() -> Result<Client, String> {
    let node = from_env("CREDPROXY_TEST_NODE", "node");
    probe(&node, &["--version"])?;
    Ok(Client {
        name: "Node",
        program: node,
        prefix: vec![format!("{EXAMPLES}/node/credproxy-client.mjs").into()],
    })
}

/// `go build`, once per test run, offline (the module needs nothing but the standard library).
fn go() -> Result<Client, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let binary = BUILT.get_or_init(|| {
        let go = from_env("CREDPROXY_TEST_GO", "go");
        probe(&go, &["version"])?;
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-clients");
        let out = tmp.join("credproxy-client");
        let started = Instant::now();
        let build = Command::new(&go)
            .args(["build", "-o"])
            .arg(&out)
            .arg(".")
            .current_dir(format!("{EXAMPLES}/go"))
            .env("GOCACHE", from_env("GOCACHE", tmp.join("cache")))
            .env("GOPATH", from_env("GOPATH", tmp.join("gopath")))
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("`go build` cannot run: {e}"))?;
        // Go is installed but the example does not build: that is a failure, never a skip.
        assert!(
            build.status.success(),
            "go build of examples/clients/go failed:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        eprintln!("built the Go client in {:?}", started.elapsed());
        Ok(out)
    });
    Ok(Client {
        name: "Go",
        program: binary.clone()?,
        prefix: vec![],
    })
}

fn curl() -> Result<Client, String> {
    let version = probe(Path::new("curl"), &["--version"])?;
    // `-w '%header{retry-after}'` is curl 7.84 or later.
    let number: Vec<u32> = version
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split('.')
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    if number.as_slice() < [7, 84].as_slice() {
        return Err(format!("curl 7.84 or later is needed, not {number:?}"));
    }
    probe(Path::new("jq"), &["--version"])?;
    Ok(Client {
        name: "curl",
        program: "bash".into(),
        prefix: vec![format!("{EXAMPLES}/curl/read-credential.sh").into()],
    })
}

/// A sample's value, 0 while the daemon has not counted any.
async fn count(d: &Daemon, sample: &str) -> f64 {
    d.metrics_text()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn read_status(d: &Daemon, id: &str) -> u16 {
    d.call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await
        .0
}

async fn create_oauth(
    d: &Daemon,
    server: &Peer,
    tokens: &(String, String),
    lifetime: i64,
) -> String {
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(oauth_credential(server, "Production", tokens, lifetime)),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn token_endpoint_down(server: &Peer, down: bool) {
    oauth_admin(
        server,
        reqwest::Method::POST,
        "/admin/mode",
        Some(json!({"down": down})),
    )
    .await;
}

fn check(client: &Client, run: &Run, code: i32, what: &str) {
    assert_eq!(
        run.code, code,
        "{} client, {what}: exit {} (stderr: {})",
        client.name, run.code, run.stderr
    );
}

/// Every case for one client, on a daemon and an OAuth server of its own.
async fn exercise(client: Client) {
    let server = peers::oauth_server(3600).await;
    let d = Daemon::start(|c, _| fast_refresh(c, "100ms")).await;

    // (1) A plain credential: the asked field's value on stdout, only the names without one.
    let plain = d
        .create(
            "Production",
            json!({"api_key": PLAIN_KEY, "account": "acme-bot"}),
        )
        .await;
    let run = client.run(&d, &["--field", "api_key", &plain]).await;
    check(&client, &run, 0, "a plain read");
    assert_eq!(run.stdout, format!("{PLAIN_KEY}\n"), "{}", client.name);
    let run = client.run(&d, &[&plain]).await;
    check(&client, &run, 0, "a read without --field");
    assert_eq!(
        run.stdout, "account\napi_key\n",
        "{}: only names",
        client.name
    );
    assert!(
        !run.stderr.contains(PLAIN_KEY),
        "{}: a secret in the diagnostics",
        client.name
    );
    // Past the cache, as after an upstream 401.
    let bypasses = r#"credproxy_cache_bypasses_total{outcome="loaded"}"#;
    let before = count(&d, bypasses).await;
    let run = client
        .run(&d, &["--no-cache", "--field", "api_key", &plain])
        .await;
    check(&client, &run, 0, "a read with --no-cache");
    assert_eq!(run.stdout, format!("{PLAIN_KEY}\n"), "{}", client.name);
    assert_eq!(count(&d, bypasses).await, before + 1.0, "{}", client.name);
    // A field the credential does not have.
    let run = client.run(&d, &["--field", "password", &plain]).await;
    check(&client, &run, 1, "a missing field");
    assert!(run.stdout.is_empty(), "{}", client.name);

    // (4) An unknown id.
    let run = client
        .run(&d, &["--field", "api_key", "no-such-credential"])
        .await;
    check(&client, &run, 4, "an unknown id");
    assert!(run.stderr.contains("not found"), "{}", run.stderr);

    // (2) needs_reauth: the refresh token is revoked and the 2-second access token expires.
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let revoked = create_oauth(&d, &server, &tokens, 2).await;
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/revoke",
        Some(json!({"refresh_token": tokens.1})),
    )
    .await;
    wait_for("409 needs_reauth", || async {
        read_status(&d, &revoked).await == 409
    })
    .await;
    let run = client.run(&d, &["--field", "access_token", &revoked]).await;
    check(&client, &run, 2, "needs_reauth");
    assert!(run.stderr.contains("needs_reauth"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", client.name);

    // (3) The token expired while the token endpoint is down: 503 token_unavailable with
    // Retry-After. Still down through every retry: exit 5, after waiting as told.
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    token_endpoint_down(&server, true).await;
    let expired = create_oauth(&d, &server, &tokens, 1).await;
    wait_for("503 token_unavailable", || async {
        read_status(&d, &expired).await == 503
    })
    .await;
    let before = count(&d, GET_503).await;
    let run = client
        .run(
            &d,
            &[
                "--retries",
                "2",
                "--max-wait",
                "1",
                "--field",
                "access_token",
                &expired,
            ],
        )
        .await;
    check(&client, &run, 5, "a token endpoint that stays down");
    assert!(run.stderr.contains("token_unavailable"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", client.name);
    assert_eq!(
        count(&d, GET_503).await - before,
        3.0,
        "{}: one read and two retries",
        client.name
    );
    assert!(
        run.took >= Duration::from_millis(1900),
        "{}: waited Retry-After (1 s) twice, took {:?}",
        client.name,
        run.took
    );

    // Back up after the client's first 503: a later retry gets the new token.
    let before = count(&d, GET_503).await;
    let mut running = client.spawn(
        &d,
        &[
            "--retries",
            "30",
            "--max-wait",
            "1",
            "--field",
            "access_token",
            &expired,
        ],
    );
    let started = Instant::now();
    while count(&d, GET_503).await <= before {
        assert!(
            !running.exited(),
            "{}: the client finished before its first 503: {}",
            client.name,
            running.output().1
        );
        assert!(started.elapsed() < DEADLINE, "no 503 for the client");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token_endpoint_down(&server, false).await;
    let run = running.wait().await;
    check(
        &client,
        &run,
        0,
        "a token endpoint back up during the retries",
    );
    assert!(run.stderr.contains("retrying"), "{}", run.stderr);
    let token = run.stdout.trim_end();
    assert_ne!(token, tokens.0, "{}: a new token", client.name);
    assert!(
        oauth_token_valid(&server, token).await,
        "{}: the token handed out works",
        client.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client() {
    if let Some(client) = client_or_skip("Python", python()) {
        exercise(client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_client() {
    if let Some(client) = client_or_skip("Node", node()) {
        exercise(client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client() {
    if let Some(client) = client_or_skip("Go", go()) {
        exercise(client).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_client() {
    if let Some(client) = client_or_skip("curl", curl()) {
        exercise(client).await;
    }
}
