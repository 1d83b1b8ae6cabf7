//! The audit trail through the real binary: a file of its own that log rotation can move
//! (SIGUSR1 reopens it), every line written out on SIGTERM however long the flush interval,
//! JSON lines in JSON mode, and no value in any line.

mod common;

use common::Daemon;
use hyper::Method;
use serde_json::{json, Value};

#[tokio::test]
async fn an_audit_file_gets_every_line_by_sigterm_and_a_new_file_after_sigusr1() {
    let mut d = Daemon::start(|c, dir| {
        common::set(
            c,
            "log",
            "audit_file",
            dir.join("audit.log").display().to_string(),
        );
        // Far longer than the test: only a full buffer, SIGUSR1 or the shutdown writes.
        common::set(c, "log", "audit_flush_interval", "10s");
    })
    .await;
    let path = d.dir.path().join("audit.log");
    let id = d
        .create("Production", json!({"access_token": "CANARY-audit-value"}))
        .await;
    for _ in 0..50 {
        let (status, _) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!(status, 200);
    }
    // Rotation: the file is moved away, SIGUSR1 makes the daemon write what it holds to the
    // file it has open (the moved one) and open a new one at the configured path.
    let rotated = d.dir.path().join("audit.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    common::signal(d.pid(), libc::SIGUSR1);
    d.log_until("the reopen", |l| l.contains("audit file reopened"))
        .await;
    let (status, _) = d
        .call(
            Method::GET,
            &format!("/v1/credentials/{id}?fields=access_token"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = d
        .call(Method::GET, "/v1/credentials/no-such-credential", None)
        .await;
    assert_eq!(status, 404);
    d.stop().await;

    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&path).unwrap();
    let reads = |text: &str| {
        text.lines()
            .filter(|l| l.contains("route=\"credential_get\""))
            .count()
    };
    assert_eq!(old.lines().count(), 51, "the create and 50 reads:\n{old}");
    assert_eq!(reads(&old), 50);
    assert!(old.contains(&format!(
        "credential=\"{id}\" fields=[\"access_token\"] status=200"
    )));
    assert_eq!(new.lines().count(), 2, "{new}");
    assert!(new.contains("credential=\"no-such-credential\" fields=- status=404"));
    let logs = d.logs();
    for text in [&old, &new, &logs] {
        assert!(
            !text.contains("CANARY"),
            "a value reached an audit or log line"
        );
    }
    assert!(
        !logs.contains("credproxy::audit"),
        "with a file of their own, audit lines stay out of the log"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn json_logs_get_json_audit_lines_and_the_dropped_counter_is_exported() {
    let d = Daemon::start(|c, _| common::set(c, "log", "format", "json")).await;
    let id = d.create("Production", json!({"a": "1", "b": "2"})).await;
    d.call(Method::GET, &format!("/v1/credentials/{id}?fields=b"), None)
        .await;
    let logs = d
        .log_until("the read's audit line", |l| {
            l.lines()
                .any(|l| l.contains("credproxy::audit") && l.contains("credential_get"))
        })
        .await;
    let line: Value = logs
        .lines()
        .filter(|l| l.contains("credproxy::audit") && l.contains("credential_get"))
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .unwrap();
    assert_eq!(line["target"], "credproxy::audit");
    assert_eq!(line["fields"]["credential"], id.as_str());
    assert_eq!(line["fields"]["fields"], json!(["b"]));
    assert_eq!(line["fields"]["status"], 200);
    assert_eq!(line["fields"]["transport"], "unix");
    assert_eq!(
        d.metric("credproxy_audit_lines_dropped_total").await,
        0.0,
        "the counter is exported, at zero"
    );
}

#[tokio::test]
async fn an_audit_file_that_cannot_be_opened_refuses_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = common::base_config(dir.path());
    common::set(
        &mut c,
        "log",
        "audit_file",
        "/proc/credproxy-cannot-create/audit.log",
    );
    let mut d = Daemon::spawn(dir, c, &[]);
    let status = d.wait_exit().await;
    assert!(!status.success());
    let logs = d.logs();
    assert!(
        logs.contains("cannot open the audit file /proc/credproxy-cannot-create/audit.log"),
        "{logs}"
    );
    assert!(
        !d.dir.path().join("data").exists(),
        "a refused start creates nothing"
    );
}
