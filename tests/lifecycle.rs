//! Start, readiness, graceful shutdown, systemd integration and the command line.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{run_cli, Daemon};
use hyper::Method;
use serde_json::json;

#[tokio::test]
async fn sigterm_drains_notifies_systemd_removes_the_socket_and_exits_zero() {
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut d = Daemon::start_with_env(
        |_, _| {},
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    )
    .await;
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");

    // A keep-alive connection that is idle when the signal arrives must not hold up the exit.
    let idle = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    d.create("Production", json!({"k": "v"})).await;
    let status = d.terminate().await;
    assert!(status.success(), "exit status {status}:\n{}", d.logs());
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(!d.socket.exists(), "socket removed on exit");
    drop(idle);
}

#[tokio::test]
async fn readiness_and_health_answer_on_socket_and_metrics_port() {
    let d = Daemon::start(|_, _| {}).await;
    let (status, body) = d.call(Method::GET, "/readyz", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ready")));
    let (status, _) = d.call(Method::GET, "/healthz", None).await;
    assert_eq!(status, 200);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(d.metrics).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn sighup_reloads_the_configuration_and_does_not_kill_the_daemon() {
    let d = Daemon::start(|_, _| {}).await;
    common::signal(d.pid(), libc::SIGHUP);
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while !(d.logs().contains("configuration reloaded") && d.logs().contains("SIGHUP")) {
        assert!(std::time::Instant::now() < deadline, "{}", d.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = d.call(Method::GET, "/healthz", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn get_command_reads_through_the_socket() {
    let d = Daemon::start(|_, _| {}).await;
    let id = d
        .create("Production", json!({"token": "via-cli", "other": "x"}))
        .await;
    let config = d.config_path.to_str().unwrap().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        run_cli(&["get", &id, "--config", &config, "--fields", "token"])
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["secrets"], json!({"token": "via-cli"}));
    let socket = d.socket.to_str().unwrap().to_owned();
    let out =
        tokio::task::spawn_blocking(move || run_cli(&["get", "no-such-id", "--socket", &socket]))
            .await
            .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not_found"));
}

#[test]
fn check_config_accepts_the_shipped_example_and_names_bad_keys() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/credproxy.toml");
    let out = run_cli(&["check-config", "--config", example]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[cache]\nttl = \"5m\"\ncapacityy = 10\n").unwrap();
    let out = run_cli(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("capacityy"));

    std::fs::write(&bad, "[[secrets_manager]]\nid = \"v\"\ntype = \"azure\"\n").unwrap();
    let out = run_cli(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vault_url"), "{err}");

    let out = run_cli(&["check-config", "--config", "/nonexistent/credproxy.toml"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn keygen_writes_a_private_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("master.key");
    let out = run_cli(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = std::fs::read(&key).unwrap();
    let out = run_cli(&["keygen", "--out", key.to_str().unwrap()]);
    assert!(!out.status.success(), "never overwrites a key");
    assert_eq!(std::fs::read(&key).unwrap(), first);
}

#[test]
fn every_command_has_help() {
    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["check-config", "--help"],
        &["keygen", "--help"],
        &["get", "--help"],
    ] {
        let out = run_cli(args);
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[tokio::test]
async fn a_missing_master_key_stops_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::base_config(dir.path());
    common::set(&mut config, "store", "generate_master_key", false);
    let mut d = Daemon::spawn(dir, config, &[]);
    assert!(!d.wait_exit().await.success());
    assert!(d.logs().contains("master key"), "{}", d.logs());
}

#[test]
fn systemd_unit_is_hardened_to_exposure_two_or_lower() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/credproxy.service");
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", unit])
        .output()
        .expect("systemd-analyze must be installed (Debian package `systemd`)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for credproxy.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 2.0, "exposure {level}:\n{text}");
    let unit_text = std::fs::read_to_string(unit).unwrap();
    for directive in [
        "Type=notify",
        "RuntimeDirectory=",
        "StateDirectory=",
        "LoadCredential=",
    ] {
        assert!(unit_text.contains(directive), "{directive} missing");
    }
}
