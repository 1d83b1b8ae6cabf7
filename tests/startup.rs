//! Start-up and sandbox: the checks that refuse a start before anything is created, callers'
//! ids in and out of user namespaces, the master key that must not be silently replaced, the
//! TCP token file's mode, and a metadata database that cannot be written (full disk,
//! immutable files): logged, counted, reflected in `/readyz`, reads still served, recovered
//! without a restart. Every test drives the real binary over its real socket.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::startup::{self, Immutable, Tmpfs};
use common::{Daemon, DEADLINE};
use hyper::Method;
use serde_json::json;

/// A uid and gid no account has: a worker, as the kernel would report it.
const WORKER: u32 = 4242;

fn rule(principal: &str, id: i64, environments: &[&str], write: bool) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert(principal.into(), id.into());
    t.insert(
        "environments".into(),
        toml::Value::Array(environments.iter().map(|e| toml::Value::from(*e)).collect()),
    );
    t.insert("write".into(), write.into());
    toml::Value::Table(t)
}

async fn wait_until(what: &str, d: &Daemon, mut done: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !done().await {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {what}:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn refused(d: &mut Daemon) -> String {
    let status = d.wait_exit().await;
    assert!(
        !status.success(),
        "the start must be refused:\n{}",
        d.logs()
    );
    d.logs()
}

/// Lets a worker running as another uid reach the socket inside the test's directory.
fn open_dir_to_others(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
}

#[tokio::test]
async fn a_user_namespace_that_does_not_map_the_workers_refuses_to_start() {
    if !startup::user_namespaces_work() {
        eprintln!("skipped: `unshare --user --map-root-user` does not work on this machine");
        return;
    }
    const UNSHARE: &[&str] = &["unshare", "--user", "--map-root-user"];

    // The reproduction of issue #13: a rule for a worker, the daemon in a namespace that maps
    // only root. Without the check the worker's calls were 403 with `uid=65534` audited.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = common::base_config(dir.path());
    config.insert(
        "access".into(),
        toml::Value::Array(vec![rule("uid", WORKER.into(), &["*"], true)]),
    );
    let mut d = Daemon::spawn_under(UNSHARE, dir, config);
    let logs = refused(&mut d).await;
    for needle in [
        "access[0].uid",
        "uid 4242 is not mapped into the user namespace",
        "/proc/self/uid_map maps 0-0 → 0-0",
        "65534",
        "PrivateUsers=",
    ] {
        assert!(logs.contains(needle), "`{needle}` missing:\n{logs}");
    }
    assert!(!data.exists(), "a refused start creates nothing");

    // A socket group the namespace does not map: refused with the reason, not EINVAL.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::base_config(dir.path());
    common::set(&mut config, "server", "socket_group", i64::from(WORKER));
    let mut d = Daemon::spawn_under(UNSHARE, dir, config);
    let logs = refused(&mut d).await;
    assert!(
        logs.contains("server.socket_group")
            && logs.contains("gid 4242 is not mapped")
            && !logs.contains("Invalid argument"),
        "{logs}"
    );

    // Rules that name only mapped ids are exact: the daemon starts, says what it cannot see,
    // and an unmapped caller (seen as 65534) matches no rule.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::base_config(dir.path());
    config.insert(
        "access".into(),
        toml::Value::Array(vec![rule("uid", 0, &["*"], true)]),
    );
    let mut d = Daemon::spawn_under(UNSHARE, dir, config);
    d.wait_ready().await;
    assert!(
        d.logs().contains("does not map every id"),
        "the start-up warning names the namespace:\n{}",
        d.logs()
    );
    let id = d.create("Production", json!({"k": "v"})).await;
    if startup::is_root() {
        open_dir_to_others(d.dir.path());
        let socket = d.socket.to_str().unwrap().to_owned();
        // gid 0 is mapped and owns the socket, so the worker can connect; its uid is not.
        let out = tokio::task::spawn_blocking(move || {
            startup::run_cli_as(WORKER, 0, &["get", &id, "--socket", &socket])
        })
        .await
        .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("forbidden"),
            "{out:?}"
        );
        wait_until("the refusal's audit line", &d, async || {
            d.logs()
                .lines()
                .any(|l| l.contains("credproxy::audit") && l.contains("uid=65534"))
        })
        .await;
    }
    d.stop().await;
}

#[tokio::test]
async fn outside_a_user_namespace_a_workers_uid_reaches_the_rules() {
    if !startup::is_root() {
        eprintln!("skipped: running a client as another uid needs root (setpriv)");
        return;
    }
    let d = Daemon::start(|c, dir| {
        open_dir_to_others(dir);
        common::set(c, "server", "socket_group", i64::from(WORKER));
        c.insert(
            "access".into(),
            toml::Value::Array(vec![
                rule("uid", 0, &["*"], true),
                rule("uid", WORKER.into(), &["Sandbox"], false),
            ]),
        );
    })
    .await;
    let sandbox = d
        .create("Sandbox", json!({"token": "for-the-worker"}))
        .await;
    let production = d.create("Production", json!({"token": "not-for-it"})).await;
    let socket = d.socket.to_str().unwrap().to_owned();
    let get = |id: String| {
        let socket = socket.clone();
        tokio::task::spawn_blocking(move || {
            startup::run_cli_as(WORKER, WORKER, &["get", &id, "--socket", &socket])
        })
    };
    let out = get(sandbox.clone()).await.unwrap();
    assert!(out.status.success(), "{out:?}\n{}", d.logs());
    assert!(String::from_utf8_lossy(&out.stdout).contains("for-the-worker"));
    let out = get(production.clone()).await.unwrap();
    assert!(!out.status.success(), "Production is not in the rule");
    // A credential the worker may not read is answered as one that does not exist.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_found"),
        "{out:?}"
    );
    wait_until("the worker's audit lines", &d, async || {
        let logs = d.logs();
        let audited = |id: &str, status: &str| {
            logs.lines().any(|l| {
                l.contains("credproxy::audit")
                    && l.contains(&format!("uid={WORKER} gid={WORKER}"))
                    && l.contains(id)
                    && l.contains(status)
            })
        };
        audited(&sandbox, "status=200") && audited(&production, "status=404")
    })
    .await;
    assert!(!d.logs().contains("uid=65534"), "{}", d.logs());
}

#[test]
fn a_rule_for_nobody_or_the_overflow_ids_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (rule, key) in [
        ("uid = 65534", "access[0].uid"),
        ("gid = 65534", "access[0].gid"),
        ("user = \"nobody\"", "access[0].user"),
    ] {
        if rule.contains("nobody") && credproxy::sys::lookup_user("nobody").unwrap().is_none() {
            continue;
        }
        std::fs::write(
            &path,
            format!("[[access]]\n{rule}\nenvironments = [\"*\"]\n"),
        )
        .unwrap();
        let out = common::run_cli(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{rule}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains("overflow"), "{err}");
    }
}

#[tokio::test]
async fn a_lost_master_key_is_not_replaced_by_a_new_one() {
    let mut d = Daemon::start(|_, _| {}).await;
    let id = d.create("Production", json!({"token": "sealed"})).await;
    d.stop().await;
    let key = d.dir.path().join("data/master.key");
    let key_id = credproxy::manager::local::MasterKey::load(&key)
        .unwrap()
        .id()
        .to_owned();
    let saved = d.dir.path().join("saved.key");
    std::fs::rename(&key, &saved).unwrap();

    let (dir, config) = d.take_for_restart(|_| {});
    let mut again = Daemon::spawn(dir, config, &[]);
    let logs = refused(&mut again).await;
    for needle in [
        key_id.as_str(),
        key.to_str().unwrap(),
        "refusing to generate",
        "store.generate_master_key",
        "credproxy.db",
    ] {
        assert!(logs.contains(needle), "`{needle}` missing:\n{logs}");
    }
    assert!(!key.exists(), "no new key was written");

    // With the old key named as a previous one, a new key may be made: rotation re-wraps.
    let (dir, config) = again.take_for_restart(|c| {
        common::set(
            c,
            "store",
            "previous_master_key_files",
            vec![saved.display().to_string()],
        );
    });
    let mut rotated = Daemon::spawn(dir, config, &[]);
    rotated.wait_ready().await;
    let (status, body) = rotated
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (status, &body["secrets"]),
        (200, &json!({"token": "sealed"}))
    );
    assert!(key.exists());
}

#[tokio::test]
async fn a_master_key_file_holding_another_key_refuses_the_start() {
    let mut d = Daemon::start(|_, _| {}).await;
    let id = d.create("Production", json!({"token": "sealed"})).await;
    d.stop().await;
    let key = d.dir.path().join("data/master.key");
    let right = credproxy::manager::local::MasterKey::load(&key)
        .unwrap()
        .id()
        .to_owned();
    let saved = d.dir.path().join("saved.key");
    std::fs::rename(&key, &saved).unwrap();
    // Another environment's key put in its place.
    let other = credproxy::manager::local::MasterKey::generate();
    other.write_new(&key).unwrap();

    let (dir, config) = d.take_for_restart(|_| {});
    let mut again = Daemon::spawn(dir, config, &[]);
    let logs = refused(&mut again).await;
    for needle in [right.as_str(), other.id(), "previous_master_key_files"] {
        assert!(logs.contains(needle), "`{needle}` missing:\n{logs}");
    }
    // The right key back: served as before.
    std::fs::remove_file(&key).unwrap();
    std::fs::rename(&saved, &key).unwrap();
    let (dir, config) = again.take_for_restart(|_| {});
    let mut restored = Daemon::spawn(dir, config, &[]);
    restored.wait_ready().await;
    let (status, _) = restored
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn without_key_generation_a_missing_key_names_the_key_id_expected() {
    let mut d = Daemon::start(|_, _| {}).await;
    d.create("Production", json!({"token": "sealed"})).await;
    d.stop().await;
    let key = d.dir.path().join("data/master.key");
    let key_id = credproxy::manager::local::MasterKey::load(&key)
        .unwrap()
        .id()
        .to_owned();
    std::fs::remove_file(&key).unwrap();
    let (dir, config) =
        d.take_for_restart(|c| common::set(c, "store", "generate_master_key", false));
    let mut again = Daemon::spawn(dir, config, &[]);
    let logs = refused(&mut again).await;
    assert!(
        logs.contains(&key_id) && logs.contains(key.to_str().unwrap()),
        "{logs}"
    );
    assert!(!key.exists());
}

#[tokio::test]
async fn a_token_file_readable_by_others_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let token = dir.path().join("tcp.token");
    std::fs::write(&token, "tcp-token-value\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut config = common::base_config(dir.path());
    let port = common::free_port();
    let mut tcp = toml::Table::new();
    tcp.insert("listen".into(), format!("127.0.0.1:{port}").into());
    tcp.insert("token_file".into(), token.display().to_string().into());
    common::set(&mut config, "server", "tcp", tcp);
    let mut d = Daemon::spawn(dir, config, &[]);
    let logs = refused(&mut d).await;
    assert!(
        logs.contains("server.tcp.token_file")
            && logs.contains(token.to_str().unwrap())
            && logs.contains("mode 644"),
        "{logs}"
    );
    assert!(!logs.contains("tcp-token-value"));
    assert!(!data.exists(), "refused before anything was created");

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (dir, config) = d.take_for_restart(|_| {});
    let mut d = Daemon::spawn(dir, config, &[]);
    d.wait_ready().await;
}

#[tokio::test]
async fn a_start_refused_for_a_socket_in_use_creates_nothing() {
    let first = Daemon::start(|_, _| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = common::base_config(dir.path());
    common::set(
        &mut config,
        "server",
        "socket",
        first.socket.display().to_string(),
    );
    let mut second = Daemon::spawn(dir, config, &[]);
    let logs = refused(&mut second).await;
    assert!(logs.contains("already listening"), "{logs}");
    assert!(!data.exists(), "no data directory, database or master key");
    let (status, _) = first.call(Method::GET, "/readyz", None).await;
    assert_eq!(status, 200, "the running daemon is untouched");

    // Nor does a start refused for a missing key (without generation).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = common::base_config(dir.path());
    common::set(&mut config, "store", "generate_master_key", false);
    let mut d = Daemon::spawn(dir, config, &[]);
    let logs = refused(&mut d).await;
    assert!(logs.contains("credproxy keygen"), "{logs}");
    assert!(!data.exists());
}

async fn readyz(d: &Daemon) -> (u16, serde_json::Value) {
    d.call(Method::GET, "/readyz", None).await
}

/// Creates credentials until one fails; returns the failure. A full disk may still take a
/// write or two that fit in space SQLite already holds.
async fn create_until_refused(d: &Daemon) -> (u16, serde_json::Value) {
    for _ in 0..200 {
        let (status, body) = d
            .call(
                Method::POST,
                "/v1/credentials",
                Some(json!({"environment": "Production", "integration_type": "x",
                            "secrets": {"k": "x".repeat(4096)}})),
            )
            .await;
        if status != 201 {
            return (status, body);
        }
    }
    panic!("writes kept succeeding:\n{}", d.logs());
}

fn write_failure_lines(logs: &str, reason: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains("metadata database write failed") && l.contains(reason))
        .count()
}

#[tokio::test]
async fn a_full_disk_fails_writes_with_the_reason_and_recovers_by_itself() {
    if !startup::is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Declared before the daemon so that it is unmounted after the daemon is stopped.
    let disk = match Tmpfs::mount(&data, "8m") {
        Ok(disk) => disk,
        Err(why) => {
            eprintln!("skipped: cannot mount a tmpfs here: {why}");
            return;
        }
    };
    let mut config = common::base_config(dir.path());
    // Reads go to the database, not the cache.
    common::set(&mut config, "cache", "ttl", "1ms");
    let mut d = Daemon::spawn(dir, config, &[]);
    d.wait_ready().await;
    let mut earlier = Vec::new();
    for i in 0..5 {
        earlier.push((i, d.create("Production", json!({"n": i.to_string()})).await));
    }

    disk.fill("filler");
    let filled = Instant::now();
    let (status, body) = create_until_refused(&d).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        ["metadata_unavailable", "store_unavailable"]
            .contains(&body["error"]["code"].as_str().unwrap()),
        "{body}"
    );
    // Many more refused writes in a few seconds: one log line per reason per 10 s.
    for _ in 0..20 {
        let (status, _) = create_until_refused(&d).await;
        assert_eq!(status, 503);
    }
    wait_until("readyz to report the full disk", &d, async || {
        readyz(&d).await
            == (
                503,
                json!({"status": "not_ready", "reason": "metadata_full"}),
            )
    })
    .await;
    let logs = d.logs();
    let lines = write_failure_lines(&logs, "full");
    assert!(
        lines >= 1 && logs.contains("database or disk is full"),
        "the cause is logged:\n{logs}"
    );
    let failures = d
        .metric("credproxy_metadata_write_failures_total{reason=\"full\"}")
        .await;
    assert!(failures >= 21.0, "{failures}");
    // One line per 10 s per reason, however many writes fail (on a slow machine this part of
    // the test may take more than one period).
    let periods = filled.elapsed().as_secs() / 10 + 1;
    assert!(
        (lines as u64) <= periods + 1 && (lines as f64) < failures,
        "{lines} lines for {failures} failures in {periods} periods: not rate-limited:\n{logs}"
    );
    // And it stays so while writes go on failing, though the heartbeat's small writes (every
    // 2 s) still fit: readiness does not flip back on their account.
    for _ in 0..8 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(create_until_refused(&d).await.0, 503);
        assert_eq!(
            readyz(&d).await.0,
            503,
            "ready again while the disk is full"
        );
    }
    for (i, id) in &earlier {
        let reply = d
            .call_raw(Method::GET, &format!("/v1/credentials/{id}"), &[], None)
            .await;
        assert_eq!(reply.status, 200, "earlier credentials stay readable");
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["secrets"]["n"], i.to_string());
    }

    std::fs::remove_file(data.join("filler")).unwrap();
    wait_until("readiness to come back without a restart", &d, async || {
        readyz(&d).await.0 == 200
    })
    .await;
    assert!(d.logs().contains("metadata database writes succeed again"));
    let id = d.create("Production", json!({"n": "after"})).await;
    let (status, _) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 200);
    d.stop().await;
}

#[tokio::test]
async fn an_immutable_database_is_read_only_not_ready_and_still_read() {
    if !startup::is_root() {
        eprintln!("skipped: chattr +i needs root");
        return;
    }
    let d = Daemon::start(|c, _| common::set(c, "cache", "ttl", "1ms")).await;
    let id = d.create("Production", json!({"k": "kept"})).await;
    let db = d.dir.path().join("data/credproxy.db");
    let wal = d.dir.path().join("data/credproxy.db-wal");
    // Not the -shm file: SQLite maps it into memory, and an immutable one would fault.
    let undo = Immutable(vec![db.clone(), wal.clone()]);
    for file in [&db, &wal] {
        if let Err(why) = startup::chattr_immutable(file, true) {
            eprintln!("skipped: the file system does not take chattr +i: {why}");
            return;
        }
    }
    let (status, _) = create_until_refused(&d).await;
    assert_eq!(status, 503);
    wait_until("readyz to report the read-only database", &d, async || {
        readyz(&d).await
            == (
                503,
                json!({"status": "not_ready", "reason": "metadata_read_only"}),
            )
    })
    .await;
    assert!(
        write_failure_lines(&d.logs(), "read_only") >= 1,
        "{}",
        d.logs()
    );
    assert!(
        d.metric("credproxy_metadata_write_failures_total{reason=\"read_only\"}")
            .await
            >= 1.0
    );
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (status, &body["secrets"]),
        (200, &json!({"k": "kept"})),
        "reads go on"
    );

    drop(undo);
    wait_until("readiness to come back", &d, async || {
        readyz(&d).await.0 == 200
    })
    .await;
    d.create("Production", json!({"k": "again"})).await;
}

#[test]
fn the_cli_prints_its_version_completions_and_man_pages() {
    let out = common::run_cli(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("credproxy {}", env!("CARGO_PKG_VERSION"))
    );
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = common::run_cli(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for sub in ["serve", "check-config", "keygen", "routing"] {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
    // The bash script is valid bash.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("credproxy.bash");
    std::fs::write(&script, common::run_cli(&["completions", "bash"]).stdout).unwrap();
    let check = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(check.success());
    assert!(!common::run_cli(&["completions", "tcsh"]).status.success());

    let out = common::run_cli(&["man"]);
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.contains(".TH credproxy 1") && page.contains("check\\-config"),
        "{page}"
    );
    let pages = dir.path().join("man");
    std::fs::create_dir(&pages).unwrap();
    assert!(
        common::run_cli(&["man", "--out-dir", pages.to_str().unwrap()])
            .status
            .success()
    );
    for page in [
        "credproxy.1",
        "credproxy-serve.1",
        "credproxy-keygen.1",
        "credproxy-routing-set.1",
    ] {
        let text = std::fs::read_to_string(pages.join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
}
