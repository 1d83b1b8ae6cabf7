//! Stores recover by themselves (issue #19): a store that refuses the daemon's access gets
//! fresh access on the spot (the token file re-read, a new AppRole login), access-detail files
//! rewritten underneath the daemon are picked up without a restart, and a rotated-out value is
//! not kept serving. Against a real OpenBao dev server.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::peers::{self, bao, Peer};
use common::{file_ref, route, table, Daemon, DEADLINE};
use hyper::Method;
use reqwest::Method as M;
use serde_json::json;

const POLICY: &str =
    r#"path "secret/*" { capabilities = ["create", "read", "update", "delete", "list"] }"#;

/// A token for the daemon (not root), allowed the KV engine.
async fn token(openbao: &Peer) -> String {
    let (status, _) = bao(
        openbao,
        M::PUT,
        "/v1/sys/policies/acl/credproxy",
        Some(json!({"policy": POLICY})),
    )
    .await;
    assert!(status < 300);
    let (status, body) = bao(
        openbao,
        M::POST,
        "/v1/auth/token/create",
        Some(json!({"policies": ["credproxy"], "ttl": "1h", "no_default_policy": true})),
    )
    .await;
    assert!(status < 300, "{body}");
    body["auth"]["client_token"].as_str().unwrap().to_owned()
}

async fn revoke(openbao: &Peer, token: &str) {
    let (status, body) = bao(
        openbao,
        M::POST,
        "/v1/auth/token/revoke",
        Some(json!({"token": token})),
    )
    .await;
    assert!(status < 300, "{body}");
}

fn vault(openbao: &Peer, token: toml::Value) -> toml::Value {
    table(&[
        ("id", "vault".into()),
        ("type", "hashicorp".into()),
        ("address", openbao.url().into()),
        ("token", token),
    ])
}

/// Writes `value` to `path` the way Kubernetes updates a mounted Secret: a new file renamed
/// over the old one.
fn rewrite(path: &Path, value: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, value).unwrap();
    std::fs::rename(&next, path).unwrap();
}

async fn renewals(d: &Daemon, outcome: &str) -> f64 {
    d.metrics_text()
        .await
        .lines()
        .filter(|l| {
            l.starts_with("credproxy_backend_access_renewals_total{")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn patch(d: &Daemon, id: &str, value: &str) -> (u16, serde_json::Value) {
    d.call(
        Method::PATCH,
        &format!("/v1/credentials/{id}"),
        Some(json!({"secrets": {"k": value}})),
    )
    .await
}

#[tokio::test]
async fn a_revoked_token_is_replaced_from_its_file_on_the_same_request() {
    let openbao = peers::openbao().await;
    let first = token(&openbao).await;
    let d = Daemon::start(|c, dir| {
        let manager = vault(&openbao, file_ref(dir, "vault-token", &first));
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        route(c, &[("Production", "vault")]);
        // Only a refusal can renew here: the file is not polled during the test.
        common::set(c, "backends", "access_check_interval", "1h");
    })
    .await;
    let id = d.create("Production", json!({"k": "v1"})).await;

    // The operator revokes the daemon's token and puts a new one in its file.
    revoke(&openbao, &first).await;
    let second = token(&openbao).await;
    rewrite(&d.dir.path().join("vault-token"), &second);
    let (status, body) = patch(&d, &id, "v2").await;
    assert_eq!(status, 200, "{body}\n{}", d.logs());
    assert_eq!(renewals(&d, "renewed").await, 1.0);

    // The token is revoked again and the file still holds it: one renewal is tried, its fresh
    // access is refused as well, and the answer is a clear refusal, not a loop of logins.
    revoke(&openbao, &second).await;
    let (status, body) = patch(&d, &id, "v3").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("store_error")),
        "{body}"
    );
    assert_eq!(renewals(&d, "refused_again").await, 1.0);
    for _ in 0..5 {
        let (status, _) = patch(&d, &id, "v4").await;
        assert_eq!(status, 502);
    }
    // Five refusals in quick succession cost at most one more login (the back-off starts at a
    // second and doubles), not five.
    let renewed = renewals(&d, "renewed").await;
    assert!(
        (2.0..=3.0).contains(&renewed),
        "renewals back off while the fresh access is refused too: {renewed}"
    );
    assert!(renewals(&d, "backed_off").await >= 3.0);
    let logs = d.logs();
    assert!(
        logs.contains("refused freshly renewed access too") && logs.contains("WARN"),
        "{logs}"
    );
    assert!(!logs.contains(&first) && !logs.contains(&second));
}

#[tokio::test]
async fn approle_logs_in_again_on_the_request_the_revoked_token_failed() {
    let openbao = peers::openbao().await;
    let (role_id, secret_id) = peers::setup_approle(&openbao, "1h").await;
    let d = Daemon::start(|c, dir| {
        let manager = peers::approle_manager(dir, &openbao, &role_id, &secret_id);
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        route(c, &[("Production", "vault")]);
        common::set(c, "backends", "access_check_interval", "1h");
    })
    .await;
    let id = d.create("Production", json!({"k": "v1"})).await;
    peers::revoke_all_but_root(&openbao).await;
    // The very next write succeeds: refused, logged in again, retried.
    let (status, body) = patch(&d, &id, "v2").await;
    assert_eq!(status, 200, "{body}\n{}", d.logs());
    assert_eq!(renewals(&d, "renewed").await, 1.0);
}

#[tokio::test]
async fn a_rewritten_access_file_is_picked_up_and_a_rotated_out_value_is_not_kept() {
    let openbao = peers::openbao().await;
    let first = token(&openbao).await;
    let d = Daemon::start(|c, dir| {
        let manager = vault(&openbao, file_ref(dir, "vault-token", &first));
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        route(c, &[("Production", "vault")]);
        common::set(c, "backends", "access_check_interval", "200ms");
        common::set(c, "cache", "ttl", "1ms");
    })
    .await;
    let id = d.create("Production", json!({"k": "v1"})).await;
    let path = d.dir.path().join("vault-token");

    // A new valid token in the file: the client is rebuilt without a refusal or a restart,
    // and the old token can then be revoked without a single failed request.
    let second = token(&openbao).await;
    rewrite(&path, &second);
    let started = Instant::now();
    while renewals(&d, "rotated").await < 1.0 {
        assert!(started.elapsed() < DEADLINE, "not picked up:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    revoke(&openbao, &first).await;
    let (status, body) = patch(&d, &id, "v2").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!((status, body["secrets"]["k"].as_str()), (200, Some("v2")));
    assert_eq!(renewals(&d, "renewed").await, 0.0, "no refusal was needed");

    // Then an invalid value: the second token is still valid at the server, but it was
    // rotated out of the file, so the daemon must not keep using it.
    rewrite(&path, "not-a-token");
    let started = Instant::now();
    while renewals(&d, "rotated").await < 2.0 {
        assert!(started.elapsed() < DEADLINE, "not picked up:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = patch(&d, &id, "v3").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("store_error")),
        "{body}"
    );
    let logs = d.logs();
    assert!(
        logs.contains("access details changed") && logs.contains("secrets manager call failed"),
        "{logs}"
    );
    assert!(!logs.contains(&second) && !logs.contains("not-a-token"));

    // A file rotated to something that cannot even be built (emptied): the old client is not
    // kept either, and a good value afterwards brings the manager back.
    rewrite(&path, &second);
    let started = Instant::now();
    while patch(&d, &id, "v4").await.0 != 200 {
        assert!(started.elapsed() < DEADLINE, "not back:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rewrite(&path, "");
    let started = Instant::now();
    while renewals(&d, "build_failed").await < 1.0 {
        assert!(started.elapsed() < DEADLINE, "not noticed:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = patch(&d, &id, "v5").await;
    assert_eq!(status, 502, "the rotated-out token is not used: {body}");
    let third = token(&openbao).await;
    rewrite(&path, &third);
    let started = Instant::now();
    while patch(&d, &id, "v6").await.0 != 200 {
        assert!(started.elapsed() < DEADLINE, "not back:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Key Vault stops accepting the cached Entra token (revoked, or the app's secret rotated):
/// the SDK's own retry sends the same token again; the renewal asks Entra ID for a new one,
/// once, and the request succeeds.
#[tokio::test]
async fn key_vault_refusing_the_cached_entra_token_gets_a_new_one_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let azure = common::fakes::azure(dir.path()).await;
    let d = Daemon::start(|c, dir| {
        let manager = azure.manager(dir, false);
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        route(c, &[("Production", "kv")]);
        common::set(c, "backends", "access_check_interval", "1h");
    })
    .await;
    let id = d.create("Production", json!({"k": "v1"})).await;
    let before = azure.state().token_requests;
    // The vault no longer accepts the token the daemon holds.
    azure.state().issued_token = Some("revoked-everywhere".into());
    let (status, body) = patch(&d, &id, "v2").await;
    assert_eq!(status, 200, "{body}\n{}", d.logs());
    assert_eq!(azure.state().token_requests, before + 1, "one new token");
    assert_eq!(renewals(&d, "renewed").await, 1.0);
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!((status, body["secrets"]["k"].as_str()), (200, Some("v2")));
}
