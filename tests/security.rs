//! Callers, the access policy, the socket's mode and group, and the loopback TCP listener.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::Daemon;
use hyper::Method;
use serde_json::json;

fn my_ids() -> (u32, u32) {
    credproxy::sys::effective_ids()
}

fn access_rule(uid: u32, environments: &[&str], write: bool) -> toml::Value {
    let mut t = toml::Table::new();
    t.insert("uid".into(), (uid as i64).into());
    t.insert(
        "environments".into(),
        toml::Value::Array(environments.iter().map(|e| toml::Value::from(*e)).collect()),
    );
    t.insert("write".into(), write.into());
    toml::Value::Table(t)
}

#[tokio::test]
async fn callers_without_a_matching_rule_are_refused() {
    let (uid, _) = my_ids();
    let d = Daemon::start(|c, _| {
        c.insert(
            "access".into(),
            toml::Value::Array(vec![access_rule(uid.wrapping_add(1), &["*"], true)]),
        );
    })
    .await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(json!({"environment": "P", "integration_type": "x", "secrets": {"a": "b"}})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = d.call(Method::GET, "/v1/credentials/anything", None).await;
    assert_eq!(status, 403);
    let (status, _) = d.call(Method::GET, "/v1/secretsmanagers", None).await;
    assert_eq!(status, 403);
    d.log_until("the refusals' audit lines", |l| {
        l.contains("credproxy::audit") && l.contains("status=403")
    })
    .await;
    assert!(d
        .metrics_text()
        .await
        .contains("credproxy_access_denied_total 3"));
}

#[tokio::test]
async fn rules_limit_environments_and_writes() {
    let (uid, _) = my_ids();
    let writer = Daemon::start(|c, _| {
        c.insert(
            "access".into(),
            toml::Value::Array(vec![access_rule(uid, &["Sandbox"], true)]),
        );
    })
    .await;
    let sandbox = writer.create("Sandbox", json!({"a": "b"})).await;
    let (status, _) = writer
        .call(Method::POST, "/v1/credentials", Some(json!({"environment": "Production", "integration_type": "x", "secrets": {"a": "b"}})))
        .await;
    assert_eq!(
        status, 403,
        "Production is not in the caller's environments"
    );
    let (status, _) = writer
        .call(Method::GET, &format!("/v1/credentials/{sandbox}"), None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = writer
        .call(
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=local",
            None,
        )
        .await;
    assert_eq!(status, 403, "listing a manager is an admin call");

    // The same database, now with a read-only rule for Sandbox.
    let mut writer = writer;
    writer.stop().await;
    let reader = writer
        .restart(|config| {
            config.insert(
                "access".into(),
                toml::Value::Array(vec![access_rule(uid, &["Sandbox"], false)]),
            );
        })
        .await;
    let (status, body) = reader
        .call(Method::GET, &format!("/v1/credentials/{sandbox}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = reader
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{sandbox}"),
            Some(json!({"secrets": {"a": "c"}})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = reader
        .call(Method::DELETE, &format!("/v1/credentials/{sandbox}"), None)
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn socket_gets_the_configured_mode_and_group() {
    let (_, gid) = my_ids();
    let d = Daemon::start(|c, _| {
        common::set(c, "server", "socket_mode", "0640");
        common::set(c, "server", "socket_group", gid as i64);
    })
    .await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(meta.gid(), gid);
}

#[tokio::test]
async fn start_refuses_a_socket_path_that_is_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::base_config(dir.path());
    let socket = dir.path().join("api.sock");
    std::fs::write(&socket, "not a socket").unwrap();
    let mut d = Daemon::spawn(dir, config, &[]);
    let status = d.wait_exit().await;
    assert!(!status.success());
    assert!(d.logs().contains("is not a socket"), "{}", d.logs());
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "not a socket");
}

#[tokio::test]
async fn tcp_listener_needs_the_token_and_refuses_proxied_requests() {
    let port = common::free_port();
    let d = Daemon::start(|c, dir| {
        let token = dir.join("tcp.token");
        std::fs::write(&token, "s3cret-token\n").unwrap();
        common::restrict_to_owner(&token);
        let mut tcp = toml::Table::new();
        tcp.insert("listen".into(), format!("127.0.0.1:{port}").into());
        tcp.insert("token_file".into(), token.display().to_string().into());
        common::set(c, "server", "tcp", tcp);
    })
    .await;
    let id = d.create("Production", json!({"k": "from-tcp"})).await;
    let get = |headers: &'static str| {
        let id = id.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let request = format!("GET /v1/credentials/{id} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n");
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(get("").await.starts_with("HTTP/1.1 401"));
    assert!(get("X-Credproxy-Token: wrong\r\n")
        .await
        .starts_with("HTTP/1.1 401"));
    let ok = get("X-Credproxy-Token: s3cret-token\r\n").await;
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.contains("from-tcp"),
        "{ok}"
    );
    let proxied = get("X-Credproxy-Token: s3cret-token\r\nX-Forwarded-For: 10.0.0.1\r\n").await;
    assert!(
        proxied.starts_with("HTTP/1.1 400") && proxied.contains("forwarded_rejected"),
        "{proxied}"
    );
    let proxied = get("X-Credproxy-Token: s3cret-token\r\nForwarded: for=10.0.0.1\r\n").await;
    assert!(proxied.starts_with("HTTP/1.1 400"), "{proxied}");
    assert!(!d.logs().contains("s3cret-token"));
}

#[test]
fn non_loopback_tcp_listener_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[server.tcp]\nlisten = \"0.0.0.0:2773\"\ntoken_file = \"/t\"\n",
    )
    .unwrap();
    let out = common::run_cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.tcp.listen") && err.contains("not a loopback"),
        "{err}"
    );
}
