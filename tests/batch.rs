//! `POST /v1/credentials:batchGet` through the real binary and its Unix socket: each id answered
//! as a single read would answer it, in order, with no existence oracle across environments.

mod common;

use std::time::{Duration, Instant};

use common::peers::{self, vault_manager};
use common::{contains_bytes, route, Daemon};
use hyper::Method;
use serde_json::{json, Value};

const BATCH: &str = "/v1/credentials:batchGet";

fn access_rule(environments: &[&str]) -> toml::Value {
    let (uid, _) = credproxy::sys::effective_ids();
    let mut t = toml::Table::new();
    t.insert("uid".into(), (uid as i64).into());
    t.insert(
        "environments".into(),
        toml::Value::Array(environments.iter().map(|e| toml::Value::from(*e)).collect()),
    );
    t.insert("write".into(), true.into());
    toml::Value::Table(t)
}

/// The raw answer to a batch read, and its parsed items.
async fn batch(d: &Daemon, body: Value) -> (u16, Vec<u8>, Value) {
    let reply = d
        .call_raw(
            Method::POST,
            BATCH,
            &[("content-type", "application/json")],
            Some(body.to_string().into_bytes()),
        )
        .await;
    let parsed = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status.as_u16(), reply.body.to_vec(), parsed)
}

fn items(body: &Value) -> &Vec<Value> {
    body["credentials"].as_array().expect("a credentials array")
}

fn unknown_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The audit lines of batch reads: (credential, status), in the order they were written.
fn batch_audit_lines(logs: &str) -> Vec<(String, u16)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!(" {name}="))? + name.len() + 2;
        let value = line[start..].split_whitespace().next()?;
        Some(value.trim_matches('"').to_owned())
    };
    logs.lines()
        .filter(|l| l.contains("credproxy::audit") && l.contains("credential_batch_get"))
        .filter_map(|l| Some((field(l, "credential")?, field(l, "status")?.parse().ok()?)))
        .collect()
}

/// Audit lines may be written a little after the answer: polls the log until `want` are there.
async fn wait_for_audit(d: &Daemon, want: &[(String, u16)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = batch_audit_lines(&d.logs());
        if want.iter().all(|w| lines.contains(w)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "audit lines {want:?} not all in the log; batch lines so far: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_id_is_answered_as_its_single_read_and_other_environments_look_absent() {
    let mut d = Daemon::start(|_, _| {}).await;
    let sandbox = d
        .create("Sandbox", json!({"a": "sandbox-a", "b": "sandbox-b"}))
        .await;
    let other = d.create("Sandbox", json!({"a": "other-a"})).await;
    let hidden = d
        .create("Production", json!({"a": "production-canary"}))
        .await;
    // The caller may read Sandbox only.
    d.stop().await;
    let d = d
        .restart(|c| {
            c.insert(
                "access".into(),
                toml::Value::Array(vec![access_rule(&["Sandbox"])]),
            );
        })
        .await;
    let missing = unknown_id();
    let ids = [&sandbox, &hidden, &missing, &other];
    let (status, raw, body) = batch(&d, json!({ "ids": ids })).await;
    assert_eq!(status, 200, "{body}");
    let items = items(&body);
    assert_eq!(items.len(), 4);
    for (item, id) in items.iter().zip(ids) {
        assert_eq!(item["id"], **id, "request order: {body}");
    }
    assert_eq!(
        (items[0]["status"].as_u64(), items[3]["status"].as_u64()),
        (Some(200), Some(200))
    );
    assert_eq!(
        items[0]["credential"]["secrets"],
        json!({"a": "sandbox-a", "b": "sandbox-b"})
    );
    assert_eq!(items[3]["credential"]["secrets"], json!({"a": "other-a"}));

    // Another environment's credential and an id nobody has are the same answer, byte for byte
    // once the id itself is taken out.
    let without_id = |item: &Value| {
        let mut item = item.as_object().unwrap().clone();
        item.remove("id");
        serde_json::to_vec(&item).unwrap()
    };
    assert_eq!(items[1]["status"], 404);
    assert_eq!(
        items[1]["error"],
        json!({"code": "not_found", "message": "credential not found"})
    );
    assert_eq!(without_id(&items[1]), without_id(&items[2]));
    let raw_item = |id: &str| {
        let text = String::from_utf8(raw.clone()).unwrap();
        let start = text.find(&format!("{{\"id\":\"{id}\"")).unwrap();
        let end = start + text[start..].find('}').unwrap();
        text[start..end].replace(id, "ID")
    };
    assert_eq!(raw_item(&hidden), raw_item(&missing));
    assert!(
        !contains_bytes(&raw, b"production-canary"),
        "no secret leaks"
    );
    assert!(!contains_bytes(&raw, b"Production"), "no metadata leaks");
    // As the single read answers.
    let (status, single) = d
        .call(Method::GET, &format!("/v1/credentials/{hidden}"), None)
        .await;
    assert_eq!((status, &single["error"]), (404, &items[1]["error"]));

    // Each credential is the very body a single read answers.
    let single = d
        .call_raw(
            Method::GET,
            &format!("/v1/credentials/{sandbox}"),
            &[],
            None,
        )
        .await;
    assert_eq!(single.status, 200);
    let (_, raw, _) = batch(&d, json!({ "ids": [&sandbox] })).await;
    assert!(
        contains_bytes(&raw, &single.body),
        "{}\nholds\n{}",
        String::from_utf8_lossy(&raw),
        String::from_utf8_lossy(&single.body)
    );

    wait_for_audit(
        &d,
        &[
            (sandbox.clone(), 200),
            (hidden.clone(), 404),
            (missing.clone(), 404),
            (other.clone(), 200),
        ],
    )
    .await;
}

#[tokio::test]
async fn fields_limit_every_credential_as_the_query_does_for_one() {
    let d = Daemon::start(|_, _| {}).await;
    let first = d
        .create(
            "Production",
            json!({"access_token": "at-1", "refresh_token": "rt-1"}),
        )
        .await;
    let second = d.create("Production", json!({"api_key": "k-2"})).await;
    let (status, raw, body) = batch(
        &d,
        json!({"ids": [&first, &second], "fields": ["access_token", "api_key", "absent"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let items = items(&body);
    assert_eq!(
        items[0]["credential"]["secrets"],
        json!({"access_token": "at-1"})
    );
    assert_eq!(items[1]["credential"]["secrets"], json!({"api_key": "k-2"}));
    assert!(!contains_bytes(&raw, b"rt-1"));
    let single = d
        .call_raw(
            Method::GET,
            &format!("/v1/credentials/{first}?fields=access_token,api_key,absent"),
            &[],
            None,
        )
        .await;
    assert!(
        contains_bytes(&raw, &single.body),
        "the same bytes as ?fields="
    );

    let (_, _, body) = batch(&d, json!({"ids": [&first], "fields": []})).await;
    assert_eq!(body["credentials"][0]["credential"]["secrets"], json!({}));
}

#[tokio::test]
async fn one_unavailable_store_fails_only_its_own_credential() {
    let mut openbao = peers::openbao().await;
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        route(c, &[("Vault", "vault")]);
        common::set(c, "backends", "timeout", "1s");
    })
    .await;
    let before = d.create("Production", json!({"k": "local-1"})).await;
    let in_vault = d.create("Vault", json!({"k": "vault-1"})).await;
    let after = d.create("Production", json!({"k": "local-2"})).await;
    // A metadata-only change drops the cached copy without touching the store.
    let (status, _) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{in_vault}"),
            Some(json!({"metadata": {"n": 1}})),
        )
        .await;
    assert_eq!(status, 200);
    openbao.kill();

    let (status, _, body) = batch(&d, json!({"ids": [&before, &in_vault, &after]})).await;
    assert_eq!(status, 200, "{body}");
    let items = items(&body);
    assert_eq!(items[0]["credential"]["secrets"]["k"], "local-1");
    assert_eq!(items[2]["credential"]["secrets"]["k"], "local-2");
    assert_eq!(items[1]["status"], 503, "{body}");
    assert_eq!(items[1]["error"]["code"], "store_unavailable");
    assert!(items[1]["error"]["message"].is_string());
    assert!(items[1].get("credential").is_none());
    wait_for_audit(&d, &[(in_vault, 503), (before, 200), (after, 200)]).await;
}

#[tokio::test]
async fn a_batch_holds_one_to_a_hundred_distinct_ids() {
    let d = Daemon::start(|_, _| {}).await;
    let hundred: Vec<String> = (0..100).map(|_| unknown_id()).collect();
    let (status, _, body) = batch(&d, json!({ "ids": hundred })).await;
    assert_eq!(status, 200);
    assert_eq!(items(&body).len(), 100);
    assert!(items(&body).iter().all(|i| i["status"] == 404));

    let mut too_many = hundred.clone();
    too_many.push(unknown_id());
    for (request, detail) in [
        (
            json!({ "ids": too_many }),
            "`ids` must hold 1 to 100 credential ids",
        ),
        (
            json!({"ids": []}),
            "`ids` must hold 1 to 100 credential ids",
        ),
        (
            json!({"ids": [&hundred[0], &hundred[1], &hundred[0]]}),
            "`ids[2]` repeats `ids[0]`",
        ),
        (
            json!({"ids": [&hundred[0], "not/an id canary"]}),
            "`ids[1]` is not a credential id",
        ),
    ] {
        let (status, raw, body) = batch(&d, request).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_request");
        assert_eq!(body["error"]["detail"], detail);
        assert!(
            !contains_bytes(&raw, hundred[0].as_bytes()),
            "ids are not repeated back"
        );
        assert!(!contains_bytes(&raw, b"canary"));
    }
    let (status, _, body) = batch(&d, json!({"ids": [&hundred[0]], "colour": 1})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, _, body) = batch(&d, json!({"fields": ["a"]})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, body) = d.call(Method::GET, BATCH, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
}

#[tokio::test]
async fn a_caller_who_may_read_nothing_is_refused_whole() {
    let mut d = Daemon::start(|_, _| {}).await;
    let id = d.create("Production", json!({"a": "canary"})).await;
    let (uid, _) = credproxy::sys::effective_ids();
    d.stop().await;
    let d = d
        .restart(|c| {
            let mut rule = toml::Table::new();
            rule.insert("uid".into(), (uid.wrapping_add(1) as i64).into());
            rule.insert("environments".into(), toml::Value::Array(vec!["*".into()]));
            c.insert(
                "access".into(),
                toml::Value::Array(vec![toml::Value::Table(rule)]),
            );
        })
        .await;
    let (status, raw, body) = batch(&d, json!({"ids": [&id]})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    assert!(!contains_bytes(&raw, b"canary"));
    wait_for_audit(&d, &[("-".to_owned(), 403)]).await;
}

#[tokio::test]
async fn cold_ids_load_once_and_then_are_cache_hits() {
    let mut d = Daemon::start(|_, _| {}).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            d.create("Production", json!({ "k": format!("v-{n}") }))
                .await,
        );
    }
    // A new process: every id is cold.
    d.stop().await;
    let d = d.restart(|_| {}).await;
    let request = json!({ "ids": ids });
    let (first, second) = tokio::join!(batch(&d, request.clone()), batch(&d, request.clone()));
    for (status, _, body) in [&first, &second] {
        assert_eq!(*status, 200);
        for (n, item) in items(body).iter().enumerate() {
            assert_eq!(item["status"], 200, "{item}");
            assert_eq!(item["credential"]["secrets"]["k"], format!("v-{n}"));
        }
    }
    let gets =
        "credproxy_backend_requests_total{manager=\"local\",operation=\"get\",outcome=\"success\"}";
    assert_eq!(
        d.metric(gets).await,
        20.0,
        "two overlapping batches of 20 cold ids read the store 20 times"
    );
    let (_, _, body) = batch(&d, request).await;
    assert!(
        items(&body).iter().all(|i| i["cache_status"] == "hit"),
        "{body}"
    );
    assert_eq!(d.metric(gets).await, 20.0);
}
