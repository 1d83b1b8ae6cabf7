//! Cache bypass (`Cache-Control: no-cache`) against a real OpenBao: a key rotated in the store
//! behind credproxy's back is served at once to the caller who asks, replaces the cached one,
//! and the per-credential limit keeps such reads from reaching the store more than once per
//! `cache.bypass_interval`.

mod common;

use std::time::{Duration, Instant};

use common::peers::{self, bao, vault_manager, Peer};
use common::{route, Daemon, DEADLINE};
use hyper::Method;
use serde_json::{json, Value};

/// A daemon with OpenBao as the Production manager and this bypass interval.
async fn daemon(openbao: &Peer, bypass_interval: &str) -> Daemon {
    let interval = bypass_interval.to_owned();
    Daemon::start(move |c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, openbao)]),
        );
        route(c, &[("Production", "vault")]);
        common::set(c, "cache", "bypass_interval", interval);
    })
    .await
}

/// Writes a new KV v2 version of the credential's secret directly in OpenBao, as an operator
/// rotating the key in the store's own console would.
async fn rotate_in_openbao(openbao: &Peer, id: &str, token: &str) {
    let (status, body) = bao(
        openbao,
        reqwest::Method::POST,
        &format!("/v1/secret/data/credproxy/Production/{id}"),
        Some(json!({"data": {"token": token}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// One read: status, `cache-status` header, and the `token` secret (or the error code).
async fn read(d: &Daemon, id: &str, cache_control: Option<&str>) -> (u16, String, String) {
    let headers: Vec<(&str, &str)> = cache_control
        .map(|v| vec![("cache-control", v)])
        .unwrap_or_default();
    let reply = d
        .call_raw(
            Method::GET,
            &format!("/v1/credentials/{id}"),
            &headers,
            None,
        )
        .await;
    let body: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    let status = reply
        .headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let value = body["secrets"]["token"]
        .as_str()
        .or(body["error"]["code"].as_str())
        .unwrap_or_default()
        .to_owned();
    (reply.status.as_u16(), status, value)
}

/// Reads of secrets managers so far (every manager, every outcome).
async fn store_reads(d: &Daemon) -> f64 {
    d.metrics_text()
        .await
        .lines()
        .filter(|l| {
            l.starts_with("credproxy_backend_requests_total{") && l.contains("operation=\"get\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn bypasses(d: &Daemon, outcome: &str) -> f64 {
    d.metric(&format!(
        "credproxy_cache_bypasses_total{{outcome=\"{outcome}\"}}"
    ))
    .await
}

fn ok(value: &str, status: &str) -> (u16, String, String) {
    (200, status.to_owned(), value.to_owned())
}

#[tokio::test]
async fn a_no_cache_read_serves_a_key_rotated_in_the_store_and_replaces_the_cached_one() {
    let openbao = peers::openbao().await;
    let mut d = daemon(&openbao, "5s").await;
    let id = d.create("Production", json!({"token": "key-1"})).await;
    // A fresh start: the create's own cache entry is gone, so the first read is a miss.
    d.stop().await;
    let d = d.restart(|_| {}).await;
    assert_eq!(read(&d, &id, None).await, ok("key-1", "miss"));
    assert_eq!(read(&d, &id, None).await, ok("key-1", "hit"));

    rotate_in_openbao(&openbao, &id, "key-2").await;
    // A plain read keeps serving the cached key until the TTL (5 minutes here)...
    assert_eq!(read(&d, &id, None).await, ok("key-1", "hit"));
    // ...the caller whose upstream refused it gets the current one at once...
    let reads_before = store_reads(&d).await;
    assert_eq!(read(&d, &id, Some("no-cache")).await, ok("key-2", "bypass"));
    assert_eq!(store_reads(&d).await, reads_before + 1.0);
    // ...and so does everyone after: it replaced the cached entry.
    assert_eq!(read(&d, &id, None).await, ok("key-2", "hit"));

    // Within the interval a second bypass makes no store read: rotated again, it is still
    // answered with the value the first bypass loaded, and says it was limited.
    rotate_in_openbao(&openbao, &id, "key-3").await;
    let reads_before = store_reads(&d).await;
    assert_eq!(
        read(&d, &id, Some("max-age=0")).await,
        ok("key-2", "bypass-limited")
    );
    assert_eq!(store_reads(&d).await, reads_before, "no store read");
    assert_eq!(
        (bypasses(&d, "loaded").await, bypasses(&d, "limited").await),
        (1.0, 1.0)
    );

    // Once the interval has passed, a bypass reads the store again.
    let started = Instant::now();
    loop {
        let answer = read(&d, &id, Some("No-Cache")).await;
        if answer.1 == "bypass" {
            assert_eq!(answer, ok("key-3", "bypass"));
            break;
        }
        assert_eq!(answer, ok("key-2", "bypass-limited"));
        assert!(started.elapsed() < DEADLINE, "still limited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5) + Duration::from_secs(2),
        "limited for longer than the interval"
    );

    // The credential now follows the rotated version: after a restart (nothing cached) a
    // plain read loads key-3, not the version credproxy wrote first.
    let mut d = d;
    d.stop().await;
    let d = d.restart(|_| {}).await;
    assert_eq!(read(&d, &id, None).await, ok("key-3", "miss"));
    let logs = d.logs();
    assert!(
        !logs.contains("key-2") && !logs.contains("key-3"),
        "a secret value in the log"
    );
}

#[tokio::test]
async fn a_failed_bypass_answers_the_store_error_and_leaves_the_cached_value() {
    let mut openbao = peers::openbao().await;
    let d = daemon(&openbao, "0s").await;
    let id = d.create("Production", json!({"token": "key-1"})).await;
    assert_eq!(read(&d, &id, None).await, ok("key-1", "hit"));
    openbao.kill();
    let (status, cache_status, code) = read(&d, &id, Some("no-cache")).await;
    assert_eq!(
        (status, cache_status.as_str(), code.as_str()),
        (503, "", "store_unavailable")
    );
    assert_eq!(bypasses(&d, "failed").await, 1.0);
    // Plain reads go on with the entry the failed bypass could not replace.
    assert_eq!(read(&d, &id, None).await, ok("key-1", "hit"));
}

fn access_rule(environments: &[&str]) -> toml::Value {
    let (uid, _) = credproxy::sys::effective_ids();
    let mut t = toml::Table::new();
    t.insert("uid".into(), (uid as i64).into());
    t.insert(
        "environments".into(),
        toml::Value::Array(environments.iter().map(|e| toml::Value::from(*e)).collect()),
    );
    t.insert("write".into(), true.into());
    toml::Value::Array(vec![toml::Value::Table(t)])
}

#[tokio::test]
async fn a_bypass_of_a_credential_the_caller_may_not_read_is_not_found_and_reads_no_store() {
    let openbao = peers::openbao().await;
    let mut d = daemon(&openbao, "0s").await;
    let hidden = d
        .create("Production", json!({"token": "CANARY-hidden"}))
        .await;
    d.stop().await;
    // The caller may read Sandbox only.
    let d = d
        .restart(|c| {
            c.insert("access".into(), access_rule(&["Sandbox"]));
        })
        .await;
    let reads_before = store_reads(&d).await;
    let missing = "0123456789abcdef0123456789abcdef";
    let forbidden = d
        .call_raw(
            Method::GET,
            &format!("/v1/credentials/{hidden}"),
            &[("cache-control", "no-cache")],
            None,
        )
        .await;
    let absent = d
        .call_raw(
            Method::GET,
            &format!("/v1/credentials/{missing}"),
            &[("cache-control", "no-cache")],
            None,
        )
        .await;
    assert_eq!(forbidden.status.as_u16(), 404);
    assert_eq!(absent.status.as_u16(), 404);
    assert_eq!(
        &forbidden.body[..],
        &absent.body[..],
        "forbidden and missing differ"
    );
    assert_eq!(store_reads(&d).await, reads_before, "OpenBao was asked");
    for outcome in ["loaded", "limited", "failed"] {
        assert_eq!(bypasses(&d, outcome).await, 0.0, "{outcome}");
    }
}
