//! Azure Key Vault, Google Secret Manager and Composio through the daemon's socket, driven by
//! the real SDK crates against the wire-level fakes in `tests/common/fakes.rs` (no emulator of
//! these services runs here), and checked in the fakes' state directly.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fakes::{self, AzureFake, ComposioFake, GcpFake};
use common::{file_ref, route, set, table, Daemon, DEADLINE};
use hyper::Method;
use serde_json::{json, Value};

fn gcp_manager(fake: &GcpFake) -> toml::Value {
    table(&[
        ("id", "gsm".into()),
        ("type", "gcp".into()),
        ("project_id", fakes::GCP_PROJECT.into()),
        ("endpoint", fake.endpoint().into()),
        (
            "credentials",
            table(&[("file", fake.key_file.display().to_string().into())]),
        ),
    ])
}

fn composio_manager(dir: &Path, fake: &ComposioFake) -> toml::Value {
    table(&[
        ("id", "composio".into()),
        ("type", "composio".into()),
        ("base_url", fake.base_url().into()),
        (
            "api_key",
            file_ref(dir, "composio-key", fakes::COMPOSIO_API_KEY),
        ),
    ])
}

async fn start(managers: Vec<toml::Value>, routes: &[(&str, &str)]) -> Daemon {
    Daemon::start(|c, _| {
        c.insert("secrets_manager".into(), toml::Value::Array(managers));
        route(c, routes);
        // Short-lived cache entries so reads reach the store.
        set(c, "cache", "ttl", "50ms");
        set(c, "cache", "stale_if_error", "0s");
    })
    .await
}

async fn read(d: &Daemon, id: &str) -> (u16, Value) {
    d.call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await
}

async fn patch(d: &Daemon, id: &str, secrets: Value) -> Value {
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets": secrets})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Pages through a manager's listing with `limit`; returns the names.
async fn list_all(d: &Daemon, manager: &str, limit: usize) -> (Vec<String>, usize) {
    let (mut names, mut pages, mut offset) = (Vec::new(), 0, 0);
    loop {
        let reply = d
            .call_raw(
                Method::GET,
                &format!("/v1/secretsmanagers/secrets?secretsmanager_id={manager}&limit={limit}&offset={offset}"),
                &[],
                None,
            )
            .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let page: Vec<Value> = serde_json::from_slice(&reply.body).unwrap();
        pages += 1;
        offset += page.len();
        names.extend(page.iter().map(|p| p["name"].as_str().unwrap().to_owned()));
        if !reply.headers.contains_key("x-next-offset") {
            return (names, pages);
        }
    }
}

async fn wait_for_status(d: &Daemon, id: &str, want: u16) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = read(d, id).await;
        if status == want {
            return body;
        }
        assert!(started.elapsed() < DEADLINE, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Waits until Key Vault holds no deleted secret: the background purge has made every purge.
async fn until_purged(fake: &AzureFake) {
    let started = Instant::now();
    loop {
        {
            let s = fake.state();
            if s.deleted.is_empty() && s.deleting.is_empty() {
                return;
            }
        }
        assert!(started.elapsed() < DEADLINE, "not purged in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_key_vault_round_trips_versions_lists_and_purges() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::azure(dir.path()).await;
    let d = start(
        vec![fake.manager(dir.path(), true)],
        &[("Production", "kv")],
    )
    .await;

    let id = d
        .create(
            "Production",
            json!({"access_token": "az-1", "refresh_token": "r"}),
        )
        .await;
    let name = format!("credproxy-2fProduction-2f{}", id.replace('-', "--"));
    {
        let s = fake.state();
        assert_eq!(s.secrets[&name].len(), 1, "stored under the mapped name");
        assert!(
            s.challenges >= 1,
            "the first request met the bearer challenge"
        );
        assert_eq!(s.token_requests, 1);
        let stored: Value = serde_json::from_str(&s.secrets[&name][0].1).unwrap();
        assert_eq!(stored["access_token"], "az-1");
    }
    let (status, body) = read(&d, &id).await;
    assert_eq!(
        (status, &body["secrets"]["access_token"]),
        (200, &json!("az-1"))
    );
    let first_version = body["reference"]["version"].as_str().unwrap().to_owned();
    assert_eq!(first_version.len(), 32);

    // Each write is a new version, and the reference follows it.
    let patched = patch(&d, &id, json!({"access_token": "az-2"})).await;
    let second = patched["reference"]["version"].as_str().unwrap();
    assert_ne!(second, first_version);
    assert_eq!(fake.state().secrets[&name].len(), 2);
    let (_, body) = read(&d, &id).await;
    assert_eq!(body["secrets"]["access_token"], "az-2");
    assert_eq!(fake.state().token_requests, 1, "the token is cached");

    // 429 with Retry-After, then success: honoured by the SDK's retry policy.
    tokio::time::sleep(Duration::from_millis(60)).await;
    fake.state().throttle_next = 1;
    let (status, body) = read(&d, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.state().throttled, 1);

    // Listing with paging through nextLink; names decoded back.
    for i in 0..4 {
        d.create("Production", json!({"k": format!("v{i}")})).await;
    }
    let (names, pages) = list_all(&d, "kv", 2).await;
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(pages >= 3);
    assert!(
        names.contains(&format!("credproxy/Production/{id}")),
        "{names:?}"
    );

    // Delete: soft delete, then purge in the background (purge_on_delete), so the name can be
    // reused.
    let (status, _) = d
        .call(Method::DELETE, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 204);
    assert!(!fake.state().secrets.contains_key(&name));
    until_purged(&fake).await;

    // A secret removed behind credproxy's back is a clear 502, not a crash.
    let other = d.create("Production", json!({"k": "gone"})).await;
    fake.state().secrets.clear();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (status, body) = read(&d, &other).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("secret_missing")),
        "{body}"
    );
    assert!(!d.logs().contains(fakes::AZURE_CLIENT_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_secret_manager_round_trips_checksums_destroys_and_lists() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::gcp(dir.path()).await;
    let d = start(vec![gcp_manager(&fake)], &[("Production", "gsm")]).await;

    let id = d.create("Production", json!({"api_key": "g-1"})).await;
    let secret = format!("credproxy-2fProduction-2f{}", id.replace('-', "--"));
    assert_eq!(fake.state().secrets[&secret].len(), 1);
    assert!(
        fake.state().authenticated >= 2,
        "signed service-account JWTs were accepted"
    );
    let (status, body) = read(&d, &id).await;
    assert_eq!((status, &body["secrets"]["api_key"]), (200, &json!("g-1")));
    assert_eq!(body["reference"]["version"], "1");

    // Writes add versions; the one before the previous is destroyed (billed while enabled).
    for i in 2..=4 {
        let p = patch(&d, &id, json!({"api_key": format!("g-{i}")})).await;
        assert_eq!(p["reference"]["version"], i.to_string());
    }
    {
        let s = fake.state();
        let versions = &s.secrets[&secret];
        assert_eq!(versions.len(), 4);
        let destroyed: Vec<bool> = versions.iter().map(|v| v.destroyed).collect();
        assert_eq!(
            destroyed,
            [true, true, false, false],
            "current and previous stay"
        );
    }
    let (_, body) = read(&d, &id).await;
    assert_eq!(body["secrets"]["api_key"], "g-4");

    // RESOURCE_EXHAUSTED (429) then success.
    tokio::time::sleep(Duration::from_millis(60)).await;
    fake.state().throttle_next = 1;
    let (status, body) = read(&d, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.state().throttled, 1);

    // Listing with page tokens.
    for i in 0..4 {
        d.create("Production", json!({"k": format!("v{i}")})).await;
    }
    let (names, pages) = list_all(&d, "gsm", 2).await;
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(pages >= 3);
    assert!(names.contains(&format!("credproxy/Production/{id}")));

    let (status, _) = d
        .call(Method::DELETE, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 204);
    assert!(!fake.state().secrets.contains_key(&secret));
    let other = d.create("Production", json!({"k": "gone"})).await;
    fake.state().secrets.clear();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (status, body) = read(&d, &other).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (502, Some("secret_missing")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composio_accounts_are_read_by_reference_and_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::composio().await;
    let d = start(vec![composio_manager(dir.path(), &fake)], &[]).await;
    fake.account(
        "ca_oauth",
        "ACTIVE",
        "OAUTH2",
        json!({"access_token": "gho_composio", "refresh_token": "ghr_never_out", "token_type": "bearer", "expires_in": 1}),
    );
    fake.account("ca_key", "ACTIVE", "API_KEY", json!({"api_key": "key-123"}));
    fake.account(
        "ca_masked",
        "ACTIVE",
        "OAUTH2",
        json!({"access_token": "gho_...", "expires_in": 3600}),
    );
    fake.account(
        "ca_expired",
        "EXPIRED",
        "OAUTH2",
        json!({"access_token": "gho_old"}),
    );
    fake.account(
        "ca_revoked",
        "REVOKED",
        "OAUTH2",
        json!({"access_token": "gho_revoked"}),
    );

    let register = |external: &str| {
        let body = json!({"environment": "Production", "integration_type": "github",
                          "secrets_manager_id": "composio", "external_id": external});
        let d = &d;
        async move { d.call(Method::POST, "/v1/credentials", Some(body)).await }
    };
    let (status, created) = register("ca_oauth").await;
    assert_eq!(status, 201, "{created}");
    let oauth = created["id"].as_str().unwrap().to_owned();
    let (status, body) = read(&d, &oauth).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["secrets"]["access_token"], "gho_composio");
    assert!(
        body["secrets"].get("refresh_token").is_none(),
        "Composio's refresh token stays there"
    );
    let (_, created) = register("ca_key").await;
    let (_, body) = read(&d, created["id"].as_str().unwrap()).await;
    assert_eq!(body["secrets"]["api_key"], "key-123");

    // expires_in is honoured: a 1-second token is fetched again after a second.
    let before = fake.state().requests;
    let (_, _) = read(&d, &oauth).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    fake.account(
        "ca_oauth",
        "ACTIVE",
        "OAUTH2",
        json!({"access_token": "gho_renewed", "expires_in": 3600}),
    );
    let (_, body) = read(&d, &oauth).await;
    assert_eq!(body["secrets"]["access_token"], "gho_renewed");
    assert!(fake.state().requests > before);

    // Masked values and inactive accounts are clear errors, never handed out.
    let (_, masked) = register("ca_masked").await;
    let masked = masked["id"].as_str();
    assert!(
        masked.is_none(),
        "registration reads the account and refuses a masked one"
    );
    let (status, body) = register("ca_expired").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("credential_unusable")),
        "{body}"
    );
    assert!(body["error"]["detail"]
        .as_str()
        .unwrap()
        .contains("EXPIRED"));
    let (status, body) = register("ca_revoked").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("credential_unusable")),
        "{body}"
    );
    let detail = body["error"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("REVOKED") && detail.contains("reconnect"),
        "{detail}"
    );
    assert!(!body.to_string().contains("gho_revoked"));
    // An account that expires after registration.
    fake.account(
        "ca_key",
        "EXPIRED",
        "API_KEY",
        json!({"api_key": "key-123"}),
    );
    let body = wait_for_status(&d, created["id"].as_str().unwrap(), 409).await;
    assert_eq!(body["error"]["code"], "credential_unusable");
    assert!(!body.to_string().contains("key-123"));
    fake.account(
        "ca_oauth",
        "ACTIVE",
        "OAUTH2",
        json!({"access_token": "gho_abcd...", "expires_in": 3600}),
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    d.call(
        Method::PATCH,
        &format!("/v1/credentials/{oauth}"),
        Some(json!({"metadata": {}})),
    )
    .await;
    let body = wait_for_status(&d, &oauth, 409).await;
    assert!(
        body["error"]["detail"].as_str().unwrap().contains("masked"),
        "{body}"
    );
    assert!(!body.to_string().contains("gho_abcd"));

    // Read-only: no writes, no refreshes, no moves, never a routing target.
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{oauth}"),
            Some(json!({"secrets": {"access_token": "x"}})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("read_only_store")),
        "{body}"
    );
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/credentials/{oauth}/refresh"),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("read_only_store")),
        "{body}"
    );
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(json!({"environment": "Production", "integration_type": "x",
              "secrets_manager_id": "composio", "secrets": {"access_token": "x"}})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("read_only_store"))
    );
    let (status, _) = register("ca_does_not_exist").await;
    assert_eq!(status, 400);
    let bad = dir.path().join("bad.toml");
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
    set(&mut config, "routing", "default", "composio");
    std::fs::write(&bad, toml::to_string(&config).unwrap()).unwrap();
    let out = common::run_cli(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));

    // Listing walks Composio's cursors.
    let (names, pages) = list_all(&d, "composio", 1).await;
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(pages >= 4);
    let logs = d.logs();
    assert!(!logs.contains(fakes::COMPOSIO_API_KEY));
    assert!(!logs.contains("ghr_never_out"));
    // Every call went to the current API (v3.1), the default.
    let versions = fake.state().versions.clone();
    assert!(
        !versions.is_empty() && versions.iter().all(|v| v == "v3.1"),
        "{versions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composio_api_version_v3_is_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::composio().await;
    let mut manager = composio_manager(dir.path(), &fake);
    manager
        .as_table_mut()
        .unwrap()
        .insert("api_version".into(), "v3".into());
    let d = start(vec![manager], &[]).await;
    fake.account("ca_key", "ACTIVE", "API_KEY", json!({"api_key": "key-v3"}));
    let (status, created) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(
                json!({"environment": "Production", "integration_type": "github",
                        "secrets_manager_id": "composio", "external_id": "ca_key"}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let (status, body) = read(&d, created["id"].as_str().unwrap()).await;
    assert_eq!(
        (status, &body["secrets"]["api_key"]),
        (200, &json!("key-v3"))
    );
    let versions = fake.state().versions.clone();
    assert!(versions.iter().all(|v| v == "v3"), "{versions:?}");
    // Any other version is refused by the config check, naming the key.
    let bad = dir.path().join("bad.toml");
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
    config["secrets_manager"].as_array_mut().unwrap()[0]
        .as_table_mut()
        .unwrap()
        .insert("api_version".into(), "v4".into());
    std::fs::write(&bad, toml::to_string(&config).unwrap()).unwrap();
    let out = common::run_cli(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api_version"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instructions_list_every_type_and_credentials_move_between_clouds() {
    let dir = tempfile::tempdir().unwrap();
    let (azure, gcp) = (fakes::azure(dir.path()).await, fakes::gcp(dir.path()).await);
    let d = start(
        vec![azure.manager(dir.path(), true), gcp_manager(&gcp)],
        &[("Production", "kv")],
    )
    .await;
    let (status, instructions) = d
        .call(Method::GET, "/v1/secretsmanagers/instructions", None)
        .await;
    assert_eq!(status, 200);
    for kind in ["aws", "azure", "gcp", "hashicorp", "composio"] {
        assert!(
            instructions
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["type"] == kind),
            "{kind}"
        );
    }
    // A pin change moves the secret from Key Vault to Secret Manager.
    let id = d.create("Production", json!({"api_key": "travels"})).await;
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets_manager_id": "gsm"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["secrets_manager_id"], "gsm");
    assert!(azure.state().secrets.is_empty(), "the old copy is gone");
    until_purged(&azure).await;
    assert_eq!(gcp.state().secrets.len(), 1);
    let (_, body) = read(&d, &id).await;
    assert_eq!(body["secrets"]["api_key"], "travels");
}
