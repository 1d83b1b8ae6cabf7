//! AWS Secrets Manager (moto) and Vault (OpenBao dev server) through the daemon's socket, each
//! checked directly in the store as well.

mod common;

use std::time::Duration;

use common::peers::{self, aws_manager, bao, vault_manager, Peer};
use common::{contains_bytes, route, Daemon};
use hyper::Method;
use serde_json::json;

/// A daemon with both managers configured and these environment routes.
async fn with_both(moto: &Peer, openbao: &Peer, routes: &[(&str, &str)]) -> Daemon {
    Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![aws_manager(dir, moto), vault_manager(dir, openbao)]),
        );
        route(c, routes);
    })
    .await
}

async fn vault_data(openbao: &Peer, name: &str) -> (u16, serde_json::Value) {
    let (status, body) = bao(
        openbao,
        reqwest::Method::GET,
        &format!("/v1/secret/data/{name}"),
        None,
    )
    .await;
    (status, body["data"].clone())
}

#[tokio::test]
async fn routing_sends_each_environment_to_its_manager_and_the_rest_to_the_local_store() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let canary = "CANARY-routing-5d1e";
    let d = with_both(
        &moto,
        &openbao,
        &[("Production", "vault"), ("Sandbox", "aws")],
    )
    .await;

    let prod = d
        .create(
            "Production",
            json!({"access_token": format!("{canary}-prod")}),
        )
        .await;
    let sandbox = d
        .create(
            "Sandbox",
            json!({"access_token": format!("{canary}-sandbox")}),
        )
        .await;
    let staging = d
        .create(
            "Staging",
            json!({"access_token": format!("{canary}-staging")}),
        )
        .await;

    let (status, data) = vault_data(&openbao, &format!("credproxy/Production/{prod}")).await;
    assert_eq!(status, 200);
    assert_eq!(data["data"]["access_token"], format!("{canary}-prod"));
    assert_eq!(data["metadata"]["version"], 1);

    let aws = peers::aws_client(&moto).await;
    let secret = aws
        .get_secret_value()
        .secret_id(format!("credproxy/Sandbox/{sandbox}"))
        .send()
        .await
        .unwrap();
    let stored: serde_json::Value = serde_json::from_str(secret.secret_string().unwrap()).unwrap();
    assert_eq!(stored["access_token"], format!("{canary}-sandbox"));

    for (id, manager) in [(&prod, "vault"), (&sandbox, "aws"), (&staging, "local")] {
        let (status, body) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!(
            (status, body["secrets_manager_id"].as_str()),
            (200, Some(manager)),
            "{body}"
        );
    }
    // Neither store's secret reached the metadata database; the local one is sealed there.
    for file in common::all_files(&d.dir.path().join("data")) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !contains_bytes(&bytes, canary.as_bytes()),
            "{} holds a secret",
            file.display()
        );
    }
    assert!(!d.logs().contains(canary));
}

#[tokio::test]
async fn pinning_overrides_the_environment_and_a_pin_change_moves_the_secret() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let d = with_both(&moto, &openbao, &[("Production", "vault")]).await;
    let created = d
        .create_pinned("Production", "aws", json!({"k": "pinned"}))
        .await;
    assert_eq!(created["secrets_manager_id"], "aws");
    let id = created["id"].as_str().unwrap().to_owned();
    let aws = peers::aws_client(&moto).await;
    let name = format!("credproxy/Production/{id}");
    assert!(aws.get_secret_value().secret_id(&name).send().await.is_ok());
    assert_eq!(
        vault_data(&openbao, &name).await.0,
        404,
        "not in the environment's manager"
    );

    // Unpin: the chain now says vault, so the secret moves there and leaves AWS.
    let (status, patched) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets_manager_id": null})),
        )
        .await;
    assert_eq!(
        (status, patched["secrets_manager_id"].as_str()),
        (200, Some("vault")),
        "{patched}"
    );
    let (status, data) = vault_data(&openbao, &name).await;
    assert_eq!((status, data["data"]["k"].as_str()), (200, Some("pinned")));
    assert!(
        aws.get_secret_value()
            .secret_id(&name)
            .send()
            .await
            .is_err(),
        "the old copy is deleted"
    );
    let (_, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(body["secrets"]["k"], "pinned");
}

#[tokio::test]
async fn round_trips_advance_versions_and_delete_removes_the_secret() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let d = with_both(
        &moto,
        &openbao,
        &[("Production", "vault"), ("Sandbox", "aws")],
    )
    .await;
    let aws = peers::aws_client(&moto).await;
    for env in ["Production", "Sandbox"] {
        let id = d.create(env, json!({"a": "1", "b": "x"})).await;
        let name = format!("credproxy/{env}/{id}");
        let (_, first) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        let (status, patched) = d
            .call(
                Method::PATCH,
                &format!("/v1/credentials/{id}"),
                Some(json!({"secrets": {"a": "2"}})),
            )
            .await;
        assert_eq!(status, 200, "{patched}");
        assert_ne!(
            patched["reference"]["version"], first["reference"]["version"],
            "{env}: version advances"
        );
        let (_, body) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!(body["secrets"], json!({"a": "2", "b": "x"}));
        if env == "Production" {
            assert_eq!(
                vault_data(&openbao, &name).await.1["metadata"]["version"],
                2
            );
        } else {
            let v = aws
                .get_secret_value()
                .secret_id(&name)
                .send()
                .await
                .unwrap();
            assert_eq!(
                Some(patched["reference"]["version"].as_str().unwrap()),
                v.version_id()
            );
        }
        let (status, _) = d
            .call(Method::DELETE, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!(status, 204);
        if env == "Production" {
            let (status, _) = bao(
                &openbao,
                reqwest::Method::GET,
                &format!("/v1/secret/metadata/{name}"),
                None,
            )
            .await;
            assert_eq!(status, 404, "every version is gone from Vault");
        } else {
            assert!(
                aws.get_secret_value()
                    .secret_id(&name)
                    .send()
                    .await
                    .is_err(),
                "gone from AWS"
            );
        }
    }
}

#[tokio::test]
async fn listing_shows_what_each_store_holds_with_paging() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let d = with_both(
        &moto,
        &openbao,
        &[("Production", "vault"), ("Sandbox", "aws")],
    )
    .await;
    // Something credproxy did not write, too.
    bao(
        &openbao,
        reqwest::Method::POST,
        "/v1/secret/data/other/app",
        Some(json!({"data": {"x": "y"}})),
    )
    .await;
    for _ in 0..3 {
        d.create("Production", json!({"k": "v"})).await;
        d.create("Sandbox", json!({"k": "v"})).await;
    }
    for manager in ["vault", "aws"] {
        let reply = d
            .call_raw(Method::GET, &format!("/v1/secretsmanagers/secrets?secretsmanager_id={manager}&query=credproxy&limit=2"), &[], None)
            .await;
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let page: Vec<serde_json::Value> = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(page.len(), 2, "{manager}: {page:?}");
        assert_eq!(reply.headers["x-next-offset"], "2");
        assert!(page
            .iter()
            .all(|p| p["name"].as_str().unwrap().starts_with("credproxy/")));
        assert!(
            page.iter().all(|p| p["created_at"].is_string()),
            "{manager}: {page:?}"
        );
        let (_, rest) = d
            .call(Method::GET, &format!("/v1/secretsmanagers/secrets?secretsmanager_id={manager}&query=credproxy&limit=2&offset=2"), None)
            .await;
        assert_eq!(rest.as_array().unwrap().len(), 1, "{manager}: {rest}");
    }
    let (_, all) = d
        .call(
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=vault",
            None,
        )
        .await;
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "other/app"),
        "the manager's own content: {all}"
    );
}

#[tokio::test]
async fn a_store_that_goes_down_serves_stale_then_503_and_cold_reads_fail_fast() {
    let (mut openbao, moto) = (peers::openbao().await, peers::moto().await);
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao), aws_manager(dir, &moto)]),
        );
        route(c, &[("Production", "vault")]);
        common::set(c, "cache", "ttl", "1s");
        common::set(c, "cache", "stale_if_error", "8s");
        common::set(c, "backends", "timeout", "1s");
    })
    .await;
    let warm = d.create("Production", json!({"k": "warm"})).await;
    let cold = d.create("Production", json!({"k": "cold"})).await;
    // A metadata-only change drops the cached copy without touching the store.
    d.call(
        Method::PATCH,
        &format!("/v1/credentials/{cold}"),
        Some(json!({"metadata": {"n": 1}})),
    )
    .await;
    openbao.kill();

    let reply = d
        .call_raw(Method::GET, &format!("/v1/credentials/{cold}"), &[], None)
        .await;
    assert_eq!(reply.status, 503);
    assert!(reply.headers.contains_key("retry-after"));

    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        let reply = d
            .call_raw(Method::GET, &format!("/v1/credentials/{warm}"), &[], None)
            .await;
        assert_eq!(reply.status, 200, "served from cache until the grace ends");
        if reply.headers["cache-status"] == "stale" {
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(body["secrets"]["k"], "warm");
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let reply = d
            .call_raw(Method::GET, &format!("/v1/credentials/{warm}"), &[], None)
            .await;
        if reply.status == 503 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "stale past the grace");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = d.metrics_text().await;
    assert!(
        text.contains("manager=\"vault\",operation=\"get\",outcome=\"unavailable\"")
            || text.contains("manager=\"vault\",operation=\"get\",outcome=\"timeout\""),
        "{text}"
    );
}

#[tokio::test]
async fn a_concurrent_writer_in_vault_is_a_conflict_not_an_overwrite() {
    let openbao = peers::openbao().await;
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        route(c, &[("Production", "vault")]);
    })
    .await;
    let id = d.create("Production", json!({"token": "mine"})).await;
    let name = format!("credproxy/Production/{id}");
    // Someone else writes version 2 behind credproxy's back.
    bao(
        &openbao,
        reqwest::Method::POST,
        &format!("/v1/secret/data/{name}"),
        Some(json!({"data": {"token": "theirs"}})),
    )
    .await;
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets": {"token": "new"}})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{body}"
    );
    let (_, data) = vault_data(&openbao, &name).await;
    assert_eq!(data["data"]["token"], "theirs", "not silently overwritten");
}

#[tokio::test]
async fn approle_logs_in_renews_and_recovers_from_a_revoked_token() {
    let openbao = peers::openbao().await;
    let (role_id, secret_id) = peers::setup_approle(&openbao, "3s").await;
    let d = Daemon::start(|c, dir| {
        let manager = peers::approle_manager(dir, &openbao, &role_id, &secret_id);
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        route(c, &[("Production", "vault")]);
        common::set(c, "cache", "ttl", "100ms");
    })
    .await;
    let id = d.create("Production", json!({"k": "approle"})).await;

    // Past several 3-second token lifetimes: renewal (or re-login) keeps reads working.
    let until = std::time::Instant::now() + Duration::from_secs(7);
    while std::time::Instant::now() < until {
        let (status, body) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!(
            (status, body["secrets"]["k"].as_str()),
            (200, Some("approle")),
            "{body}\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    assert!(
        d.logs().contains("renewed the Vault token"),
        "the token was renewed, not just replaced"
    );

    // Revoke every token but root's: the daemon must log in again by itself.
    peers::revoke_all_but_root(&openbao).await;
    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered:\n{}",
            d.logs()
        );
    }
    assert!(d.logs().contains("logged in to Vault with AppRole"));
}

#[tokio::test]
async fn aws_assumes_the_configured_role() {
    let moto = peers::moto().await;
    let d = Daemon::start(|c, dir| {
        let mut manager = aws_manager(dir, &moto);
        manager.as_table_mut().unwrap().insert(
            "role_arn".into(),
            "arn:aws:iam::123456789012:role/credproxy".into(),
        );
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        common::set(c, "routing", "default", "aws");
    })
    .await;
    let id = d.create("Production", json!({"k": "via-role"})).await;
    let aws = peers::aws_client(&moto).await;
    let secret = aws
        .get_secret_value()
        .secret_id(format!("credproxy/Production/{id}"))
        .send()
        .await
        .unwrap();
    assert!(secret.secret_string().unwrap().contains("via-role"));
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (status, body["secrets"]["k"].as_str()),
        (200, Some("via-role"))
    );
}

#[test]
fn manager_settings_are_validated_by_their_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    for (body, expected) in [
        ("type = \"aws\"\n", "region"),
        ("type = \"aws\"\nregion = \"x\"\nregoin = \"y\"\n", "regoin"),
        (
            "type = \"aws\"\nregion = \"x\"\naccess_key_id = { env = \"A\" }\n",
            "secret_access_key",
        ),
        (
            "type = \"hashicorp\"\naddress = \"http://v\"\n",
            "exactly one of token or approle",
        ),
        (
            "type = \"hashicorp\"\naddress = \"vault:8200\"\ntoken = { env = \"T\" }\n",
            "address",
        ),
        (
            "type = \"hashicorp\"\naddress = \"http://v\"\ntoken = \"inline-secret\"\n",
            "never written inline",
        ),
    ] {
        std::fs::write(&path, format!("[[secrets_manager]]\nid = \"m\"\n{body}")).unwrap();
        let out = common::run_cli(&["check-config", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{body}");
        assert!(err.contains(expected), "{body}: {err}");
        assert!(!err.contains("inline-secret"), "{err}");
    }
}

#[tokio::test]
async fn vault_listing_pages_through_nested_folders_in_name_order() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let d = with_both(&moto, &openbao, &[]).await;
    // Folders and leaves interleave in name order: `walk/a-b` sorts before `walk/a/…`.
    let mut expected = vec![
        "walk/a-b",
        "walk/a/x",
        "walk/a/y/deep",
        "walk/a/z",
        "walk/b",
        "walk/c/d/e",
        "walk/c/f",
        "walk/d",
    ];
    for name in &expected {
        bao(
            &openbao,
            reqwest::Method::POST,
            &format!("/v1/secret/data/{name}"),
            Some(json!({"data": {"x": "y"}})),
        )
        .await;
    }
    expected.sort();
    let mut seen = Vec::new();
    let mut offset = 0;
    loop {
        let reply = d
            .call_raw(
                Method::GET,
                &format!("/v1/secretsmanagers/secrets?secretsmanager_id=vault&query=walk/&limit=3&offset={offset}"),
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
        let page: Vec<serde_json::Value> = serde_json::from_slice(&reply.body).unwrap();
        assert!(page.iter().all(|p| p["created_at"].is_string()), "{page:?}");
        seen.extend(page.iter().map(|p| p["name"].as_str().unwrap().to_owned()));
        match reply.headers.get("x-next-offset") {
            Some(next) => {
                assert_eq!(page.len(), 3);
                offset = next.to_str().unwrap().parse().unwrap();
            }
            None => break,
        }
    }
    assert_eq!(seen, expected);
}
