//! The API contract through the real binary and its Unix socket.

mod common;

use common::{contains_bytes, Daemon};
use hyper::Method;
use serde_json::json;

#[tokio::test]
async fn create_read_patch_delete_round_trip() {
    let d = Daemon::start(|_, _| {}).await;
    let (status, created) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(json!({
                "environment": "Production",
                "integration_type": "github",
                "metadata": {"team": "core"},
                "secrets": {"access_token": "at-1", "refresh_token": "rt-1"},
                "oauth": {"token_url": "https://github.com/login/oauth/access_token", "client_id": "cid", "expires_at": "2099-01-01T00:00:00Z"}
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(
        created.get("secrets").is_none(),
        "create never echoes secrets: {created}"
    );
    assert!(!created.to_string().contains("at-1"));
    assert_eq!(created["secrets_manager_id"], "local");
    assert_eq!(created["reference"]["version"], "1");
    let id = created["id"].as_str().unwrap();

    let reply = d
        .call_raw(Method::GET, &format!("/v1/credentials/{id}"), &[], None)
        .await;
    assert_eq!(reply.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(
        body["secrets"],
        json!({"access_token": "at-1", "refresh_token": "rt-1"})
    );
    assert_eq!(body["environment"], "Production");
    assert_eq!(body["metadata"], json!({"team": "core"}));
    assert_eq!(body["expires_at"], "2099-01-01T00:00:00Z");
    assert_eq!(
        reply.headers["cache-status"], "hit",
        "a create primes the cache"
    );

    let (_, only) = d
        .call(
            Method::GET,
            &format!("/v1/credentials/{id}?fields=access_token"),
            None,
        )
        .await;
    assert_eq!(only["secrets"], json!({"access_token": "at-1"}));

    let (status, patched) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets": {"access_token": "at-2"}, "metadata": {"team": "edge"}})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["reference"]["version"], "2", "versions advance");
    let (_, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        body["secrets"],
        json!({"access_token": "at-2", "refresh_token": "rt-1"}),
        "patch merges fields"
    );
    assert_eq!(body["metadata"], json!({"team": "edge"}));

    let (status, _) = d
        .call(Method::DELETE, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (_, listed) = d
        .call(
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=local",
            None,
        )
        .await;
    assert_eq!(listed, json!([]), "delete removes the sealed rows too");
}

#[tokio::test]
async fn a_restarted_daemon_reads_from_the_store_then_caches() {
    let mut d = Daemon::start(|_, _| {}).await;
    let id = d.create("Sandbox", json!({"api_key": "k-1"})).await;
    d.stop().await;
    let again = d.restart(|_| {}).await;
    let first = again
        .call_raw(Method::GET, &format!("/v1/credentials/{id}"), &[], None)
        .await;
    assert_eq!(
        (first.status.as_u16(), &first.headers["cache-status"]),
        (200, &"miss".parse().unwrap())
    );
    let second = again
        .call_raw(Method::GET, &format!("/v1/credentials/{id}"), &[], None)
        .await;
    assert_eq!(second.headers["cache-status"], "hit");
    let body: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(body["secrets"]["api_key"], "k-1");
}

#[tokio::test]
async fn bad_input_gets_precise_errors_and_never_a_half_written_credential() {
    let d = Daemon::start(|c, _| common::set(c, "server", "max_body_bytes", 2048)).await;
    let post =
        |body: &'static [u8]| d.call_raw(Method::POST, "/v1/credentials", &[], Some(body.to_vec()));
    let code = |r: &credproxy::client::Reply| {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        (
            r.status.as_u16(),
            v["error"]["code"].as_str().unwrap().to_owned(),
            v["error"]["detail"].as_str().unwrap_or("").to_owned(),
        )
    };

    let r = post(br#"{"environment": "P", "secrets": {"a": "CANARY-SYNTAX""#).await;
    let (s, c, detail) = code(&r);
    assert_eq!((s, c.as_str()), (400, "invalid_json"));
    assert!(
        detail.contains("line 1") && !detail.contains("CANARY"),
        "{detail}"
    );

    let (s, c, detail) = code(
        &post(
            br#"{"environment": "P", "integration_type": "x", "secrets": {"a": "b"}, "colour": 1}"#,
        )
        .await,
    );
    assert_eq!((s, c.as_str()), (400, "invalid_json"));
    assert!(detail.contains("unknown field `colour`"), "{detail}");

    for body in [
        &br#"{"environment": "P", "integration_type": "x", "secrets": "CANARY-AS-STRING"}"#[..],
        br#"{"environment": "P", "integration_type": "x", "secrets": {"a": ["CANARY-IN-LIST"]}}"#,
        br#"{"environment": "P", "integration_type": "x", "secrets": {"a": 424242}}"#,
    ] {
        let r = d
            .call_raw(Method::POST, "/v1/credentials", &[], Some(body.to_vec()))
            .await;
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!(r.status, 400, "{text}");
        assert!(
            !text.contains("CANARY") && !text.contains("424242"),
            "{text}"
        );
    }

    let (s, c, _) = code(
        &post(br#"{"environment": "bad env!", "integration_type": "x", "secrets": {"a": "b"}}"#)
            .await,
    );
    assert_eq!((s, c.as_str()), (400, "invalid_request"));
    let (s, c, _) =
        code(&post(br#"{"environment": "P", "integration_type": "x", "secrets": {}}"#).await);
    assert_eq!((s, c.as_str()), (400, "invalid_request"));
    let r_pin = post(br#"{"environment": "P", "integration_type": "x", "secrets_manager_id": "nope", "secrets": {"a": "b"}}"#).await;
    let (s, c, _) = code(&r_pin);
    assert_eq!((s, c.as_str()), (400, "unknown_secrets_manager"));
    assert!(
        !String::from_utf8_lossy(&r_pin.body).contains("nope"),
        "the id is not repeated"
    );

    let big = format!(
        r#"{{"environment": "P", "integration_type": "x", "secrets": {{"a": "{}"}}}}"#,
        "x".repeat(4096)
    );
    let r = d
        .call_raw(Method::POST, "/v1/credentials", &[], Some(big.into_bytes()))
        .await;
    assert_eq!(code(&r).0, 413);

    let r = d
        .call_raw(
            Method::POST,
            "/v1/credentials",
            &[("content-type", "text/plain")],
            Some(b"{}".to_vec()),
        )
        .await;
    assert_eq!(r.status, 415);
    let r = d.call_raw(Method::GET, "/v2/nothing", &[], None).await;
    assert_eq!(code(&r).1, "route_not_found");
    let r = d.call_raw(Method::PUT, "/v1/credentials", &[], None).await;
    assert_eq!(
        (r.status.as_u16(), code(&r).1.as_str()),
        (405, "method_not_allowed")
    );
    let r = d
        .call_raw(
            Method::PATCH,
            "/v1/credentials/missing-id",
            &[],
            Some(br#"{"metadata": {}}"#.to_vec()),
        )
        .await;
    assert_eq!(r.status, 404);

    let (_, listed) = d
        .call(
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=local",
            None,
        )
        .await;
    assert_eq!(
        listed,
        json!([]),
        "no rejected request left a secret behind"
    );
    let (status, _) = d.call(Method::GET, "/healthz", None).await;
    assert_eq!(status, 200, "still alive after all of that");
}

#[tokio::test]
async fn canary_secrets_never_reach_logs_metrics_errors_or_the_database_in_clear() {
    let canary = "CANARY-7f3a9c-SECRET";
    let d = Daemon::start(|c, _| common::set(c, "log", "level", "trace")).await;
    let id = d
        .create(
            "Production",
            json!({"access_token": canary, "client_secret": format!("{canary}-2")}),
        )
        .await;
    let (_, got) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(got["secrets"]["access_token"], canary);
    d.call(
        Method::PATCH,
        &format!("/v1/credentials/{id}"),
        Some(json!({"secrets": {"access_token": format!("{canary}-3")}})),
    )
    .await;
    d.call(
        Method::GET,
        &format!("/v1/credentials/{id}?fields=access_token"),
        None,
    )
    .await;
    // A rejected request carrying a canary.
    d.call_raw(
        Method::POST,
        "/v1/credentials",
        &[],
        Some(format!(r#"{{"environment":"P","secrets":"{canary}"}}"#).into_bytes()),
    )
    .await;
    let metrics = d.metrics_text().await;

    // The rejected request's line is the last one; once it is there, all of them are.
    let logs = d
        .log_until("the audit lines", |l| {
            l.contains("credproxy::audit") && l.contains("status=400")
        })
        .await;
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "trace logging was on"
    );
    assert!(
        !logs.contains("CANARY"),
        "a secret reached the log:\n{logs}"
    );
    assert!(!metrics.contains("CANARY"), "a secret reached /metrics");
    assert!(
        !metrics.contains(&id),
        "a credential id became a metric label"
    );

    for file in common::all_files(&d.dir.path().join("data")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains_bytes(&bytes, b"CANARY"),
            "{} holds a secret in clear",
            file.display()
        );
    }
}

#[tokio::test]
async fn managers_routing_and_instructions_describe_the_setup() {
    let d = Daemon::start(|c, _| {
        let mut envs = toml::Table::new();
        envs.insert("Dev".into(), "local".into());
        common::set(c, "routing", "environments", envs);
    })
    .await;
    let (_, managers) = d.call(Method::GET, "/v1/secretsmanagers", None).await;
    assert_eq!(managers[0]["id"], "local");
    assert!(
        !managers.to_string().contains("master"),
        "no access details: {managers}"
    );
    let (_, routing) = d.call(Method::GET, "/v1/routing", None).await;
    assert_eq!(
        routing,
        json!({"workspace": "default", "default": "local", "environments": {"Dev": "local"},
               "fallback": "local", "source": "file"})
    );
    let (_, instructions) = d
        .call(Method::GET, "/v1/secretsmanagers/instructions", None)
        .await;
    let types: std::collections::BTreeSet<&str> = instructions
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        ["aws", "azure", "composio", "gcp", "hashicorp"]
    );
    for i in instructions.as_array().unwrap() {
        assert!(
            i["key"].is_string()
                && i["label"].is_string()
                && !i["instructions"].as_str().unwrap().is_empty()
        );
    }
}

#[tokio::test]
async fn manager_listing_pages_and_filters() {
    let d = Daemon::start(|_, _| {}).await;
    for env in ["Alpha", "Alpha", "Alpha", "Beta"] {
        d.create(env, json!({"k": "v"})).await;
    }
    let reply = d
        .call_raw(
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=local&query=Alpha&limit=2",
            &[],
            None,
        )
        .await;
    let page: Vec<serde_json::Value> = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(reply.headers["x-next-offset"], "2");
    for item in &page {
        assert!(item["name"].as_str().unwrap().starts_with("Alpha/"));
        for key in ["id", "created_at", "updated_at", "description"] {
            assert!(item.get(key).is_some(), "{key} missing");
        }
    }
    let (_, rest) = d
        .call(
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=local&query=Alpha&limit=2&offset=2",
            None,
        )
        .await;
    assert_eq!(rest.as_array().unwrap().len(), 1);
    let (status, _) = d
        .call(
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=local&limit=zillion",
            None,
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn metrics_pass_promtool_and_count_requests() {
    let d = Daemon::start(|_, _| {}).await;
    let id = d.create("Production", json!({"k": "v"})).await;
    d.call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    d.call(Method::GET, "/v1/credentials/does-not-exist", None)
        .await;
    let text = d.metrics_text().await;
    for family in [
        "credproxy_http_requests_total{route=\"credential_get\",status=\"200\"} 1",
        "credproxy_http_request_duration_seconds_bucket",
        "credproxy_cache_requests_total{result=\"hit\"} 1",
        "credproxy_cache_evictions_total",
        "credproxy_cache_entries",
        "credproxy_backend_requests_total{manager=\"local\",operation=\"put\",outcome=\"success\"} 1",
        "credproxy_backend_request_duration_seconds_bucket",
        "credproxy_oauth_refreshes_total",
        "credproxy_credentials_needing_reauth",
        "credproxy_config_reloads_total",
        "credproxy_build_info{version=",
    ] {
        assert!(text.contains(family), "missing {family} in\n{text}");
    }
    let file = d.dir.path().join("metrics.txt");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect(
            "promtool (Debian package `prometheus`) must be installed; scripts/test.sh installs it",
        );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn pinning_is_recorded_and_can_be_removed() {
    let d = Daemon::start(|_, _| {}).await;
    let created = d
        .create_pinned("Production", "local", json!({"a": "b"}))
        .await;
    assert_eq!(created["pinned_secrets_manager_id"], "local");
    let id = created["id"].as_str().unwrap();
    let (status, patched) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets_manager_id": null})),
        )
        .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(
        patched["pinned_secrets_manager_id"],
        serde_json::Value::Null
    );
    let (_, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (
            body["secrets"]["a"].as_str(),
            body["secrets_manager_id"].as_str()
        ),
        (Some("b"), Some("local"))
    );
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets_manager_id": "ghost"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_secrets_manager"))
    );
}
