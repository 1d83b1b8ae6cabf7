//! OAuth refresh against a real authorization server (tests/peers/oauth-server: rotating
//! refresh tokens, the whole token family revoked when a spent refresh token is replayed),
//! through the daemon's socket, with write-back checked directly in moto and OpenBao.

mod common;

use common::wait_for;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::inprocess::{InProcess, PASS, WRITES_DOWN};
use common::peers::{
    self, aws_manager, oauth_admin, oauth_credential, oauth_grant, oauth_stats, oauth_token_valid,
    vault_manager, Peer, CLIENT_ID, CLIENT_SECRET,
};
use common::{fast_refresh, now, route, set, share_store, Daemon};
use hyper::Method;
use serde_json::{json, Value};

async fn create_oauth(
    d: &Daemon,
    server: &Peer,
    environment: &str,
    tokens: &(String, String),
    lifetime: i64,
) -> String {
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(oauth_credential(server, environment, tokens, lifetime)),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn read(d: &Daemon, id: &str) -> (u16, Value) {
    d.call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await
}

async fn access_token(d: &Daemon, id: &str) -> String {
    let (status, body) = read(d, id).await;
    assert_eq!(status, 200, "{body}");
    body["secrets"]["access_token"].as_str().unwrap().to_owned()
}

/// `expires_at` of a credential as the API shows it (RFC 3339, to the millisecond), in Unix
/// milliseconds; `None` for an answer without one (an error).
fn expires_at_ms(body: &Value) -> Option<i64> {
    credproxy::time::parse_rfc3339_ms(body["expires_at"].as_str()?)
}

fn now_ms() -> i64 {
    credproxy::time::now_unix_ms()
}

fn stat(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap()
}

async fn vault_secret(openbao: &Peer, name: &str) -> Value {
    let (status, body) = peers::bao(
        openbao,
        reqwest::Method::GET,
        &format!("/v1/secret/data/{name}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    body["data"]["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_ahead_of_expiry_and_written_back_to_each_store() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    // Refreshed tokens live an hour; the first ones live 4 seconds.
    let server = peers::oauth_server(3600).await;
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![aws_manager(dir, &moto), vault_manager(dir, &openbao)]),
        );
        route(c, &[("Production", "aws"), ("Staging", "vault")]);
        fast_refresh(c, "100ms");
    })
    .await;

    let mut creds = Vec::new();
    for environment in ["Production", "Staging", "Development"] {
        let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 4).await;
        let id = create_oauth(&d, &server, environment, &tokens, 4).await;
        creds.push((environment, id, tokens));
    }
    wait_for("three background refreshes", || async {
        stat(&oauth_stats(&server).await, "token_requests") >= 3
    })
    .await;

    let stats = oauth_stats(&server).await;
    assert_eq!(
        stat(&stats, "token_requests"),
        3,
        "one request per credential"
    );
    assert_eq!(stat(&stats, "invalid_grant"), 0);
    assert_eq!(stat(&stats, "family_revocations"), 0);
    for left in stats["remaining_at_refresh"].as_array().unwrap() {
        assert!(
            left.as_f64().unwrap() > 0.0,
            "refreshed before expiry: {stats}"
        );
    }

    let aws = peers::aws_client(&moto).await;
    for (environment, id, (old_access, old_refresh)) in &creds {
        let (status, body) = read(&d, id).await;
        assert_eq!(status, 200, "{body}");
        let access = body["secrets"]["access_token"].as_str().unwrap();
        let refresh = body["secrets"]["refresh_token"].as_str().unwrap();
        assert_ne!(access, old_access);
        assert_ne!(refresh, old_refresh, "the server rotates refresh tokens");
        assert_eq!(
            body["secrets"]["client_secret"], CLIENT_SECRET,
            "other fields kept"
        );
        assert!(expires_at_ms(&body).unwrap() > now_ms() + 3_000_000);
        assert!(oauth_token_valid(&server, access).await);

        // The new tokens are in the store itself, not only in credproxy's cache.
        let stored: Value = match *environment {
            "Production" => {
                let name = format!("credproxy/Production/{id}");
                let s = aws
                    .get_secret_value()
                    .secret_id(&name)
                    .send()
                    .await
                    .unwrap();
                serde_json::from_str(s.secret_string().unwrap()).unwrap()
            }
            "Staging" => vault_secret(&openbao, &format!("credproxy/Staging/{id}")).await,
            _ => continue,
        };
        assert_eq!(stored["access_token"], access, "{environment}");
        assert_eq!(stored["refresh_token"], refresh, "{environment}");
    }
    assert_eq!(
        d.metric(r#"credproxy_oauth_refreshes_total{outcome="success"}"#)
            .await,
        3.0
    );
    assert!(
        !d.logs().contains(CLIENT_SECRET),
        "the client secret never reaches the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_reads_of_an_expiring_token_make_one_token_request() {
    let server = peers::oauth_server(3600).await;
    // No background refresher to speak of: the reads must do it.
    let d = Arc::new(Daemon::start(|c, _| fast_refresh(c, "1h")).await);
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 10).await;
    let id = create_oauth(&d, &server, "Production", &tokens, 10).await;
    // A 10-second token is due half a second (a twentieth of its life) before it expires;
    // the server answers slowly so every read arrives while the refresh is in flight.
    let expires = expires_at_ms(&read(&d, &id).await.1).unwrap();
    let due = expires - 500;
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/mode",
        Some(json!({"delay_ms": 200})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis((due + 50 - now_ms()).max(0) as u64)).await;

    let reads: Vec<_> = (0..50)
        .map(|_| {
            let (d, id) = (Arc::clone(&d), id.clone());
            tokio::spawn(async move { access_token(&d, &id).await })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for r in reads {
        seen.insert(r.await.unwrap());
    }
    let stats = oauth_stats(&server).await;
    assert_eq!(stat(&stats, "token_requests"), 1, "{stats}");
    // Readers wait for the refresh up to a budget, then take the still-valid current token: on
    // a loaded machine some may get the old one (valid when handed out, maybe not by now), but
    // nobody gets a third.
    assert!(seen.len() <= 2, "{seen:?}");
    assert!(
        seen.iter().any(|t| *t != tokens.0),
        "the refresh was handed out"
    );
    for token in seen.iter().filter(|t| **t != tokens.0) {
        assert!(oauth_token_valid(&server, token).await);
    }
    assert_ne!(access_token(&d, &id).await, tokens.0);
}

/// Two daemons on one SQLite database, both refreshing in the background and on read, with
/// 2-second tokens and a server that revokes the token family on any replayed refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_the_database_refresh_once_per_expiry() {
    const LIFETIME: u64 = 2;
    const RUN: Duration = Duration::from_secs(12);
    let server = peers::oauth_server(LIFETIME).await;
    let a = Daemon::start(|c, _| fast_refresh(c, "100ms")).await;
    let b = Daemon::start(|c, _| {
        fast_refresh(c, "100ms");
        share_store(c, &a);
    })
    .await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, LIFETIME).await;
    let id = create_oauth(&a, &server, "Production", &tokens, LIFETIME as i64).await;

    let started = Instant::now();
    let (mut reads, mut rejected, mut failed) = (0, 0, 0);
    while started.elapsed() < RUN {
        for d in [&a, &b] {
            let sent = credproxy::time::now_unix_ms();
            let (status, body) = read(d, &id).await;
            reads += 1;
            if status != 200 {
                failed += 1;
                eprintln!("read failed: {status} {body}");
                continue;
            }
            let token = body["secrets"]["access_token"].as_str().unwrap();
            if !peers::oauth_token_valid_since(&server, token, sent).await {
                rejected += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = oauth_stats(&server).await;
    let requests = stat(&stats, "token_requests");
    // With 2-second tokens refreshed 1 second ahead, a new token is needed about every second.
    eprintln!(
        "two processes, {elapsed:.1}s: {reads} reads, {requests} token requests, {} tokens issued, \
         {:.2} requests per expiry; reads failed {failed}, tokens rejected {rejected}",
        stat(&stats, "issued"),
        requests as f64 / stat(&stats, "issued").max(1) as f64
    );
    assert_eq!(stat(&stats, "invalid_grant"), 0, "{stats}");
    assert_eq!(stat(&stats, "reuse_detected"), 0, "{stats}");
    assert_eq!(stat(&stats, "family_revocations"), 0, "{stats}");
    assert_eq!(requests, stat(&stats, "issued"), "every request was used");
    assert!(
        requests >= (RUN.as_secs() / LIFETIME) - 1,
        "tokens were refreshed: {stats}"
    );
    assert!(
        requests as f64 <= elapsed + 2.0,
        "at most one request per expiry (~1 per second): {stats}"
    );
    assert_eq!(failed, 0, "every read was answered");
    assert_eq!(rejected, 0, "every token handed out was valid");
    const SUCCESS: &str = r#"credproxy_oauth_refreshes_total{outcome="success"}"#;
    assert_eq!(
        (a.metric(SUCCESS).await + b.metric(SUCCESS).await) as u64,
        requests,
        "each process counted only its own refreshes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_marks_the_credential_for_reauthorisation_and_stops_refreshing() {
    let server = peers::oauth_server(3600).await;
    let d = Daemon::start(|c, _| fast_refresh(c, "100ms")).await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let id = create_oauth(&d, &server, "Production", &tokens, 3).await;
    // The user revoked the app at the provider: the refresh token is dead.
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/revoke",
        Some(json!({"refresh_token": tokens.1})),
    )
    .await;
    wait_for("the background refresh to be rejected", || async {
        stat(&oauth_stats(&server).await, "invalid_grant") == 1
    })
    .await;
    wait_for("needs_reauth in the API", || async {
        read(&d, &id).await.1["needs_reauth"] == true
    })
    .await;
    assert_eq!(d.metric("credproxy_credentials_needing_reauth").await, 1.0);
    assert_eq!(
        d.metric(r#"credproxy_oauth_refreshes_total{outcome="invalid_grant"}"#)
            .await,
        1.0
    );

    // Never retried: not by the refresher, not by a forced refresh, not after expiry.
    let (status, body) = d
        .call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("needs_reauth")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = read(&d, &id).await;
    assert_eq!(status, 409, "an expired token is never handed out: {body}");
    assert_eq!(body["error"]["code"], "needs_reauth");
    assert_eq!(stat(&oauth_stats(&server).await, "token_requests"), 1);

    // Re-authorisation: the user's new tokens are stored with PATCH, and refreshing resumes.
    let fresh = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({
                "secrets": {"access_token": fresh.0, "refresh_token": fresh.1},
                "expires_at": now() + 3600,
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = d
        .call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["refreshed"], true);
    let token = access_token(&d, &id).await;
    assert!(oauth_token_valid(&server, &token).await);
    assert_eq!(read(&d, &id).await.1["needs_reauth"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_token_endpoint_serves_the_current_token_until_it_expires_then_a_clear_error() {
    let server = peers::oauth_server(3600).await;
    let d = Daemon::start(|c, _| fast_refresh(c, "100ms")).await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 10).await;
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/mode",
        Some(json!({"down": true})),
    )
    .await;
    let id = create_oauth(&d, &server, "Production", &tokens, 10).await;

    wait_for("a refresh attempt against the down endpoint", || async {
        stat(&oauth_stats(&server).await, "unavailable") >= 1
    })
    .await;
    // Inside the window (the last half second of a 10-second token), refresh failing: the
    // current, still valid token is served.
    let asked = now_ms();
    let (status, body) = read(&d, &id).await;
    if status == 200 {
        assert_eq!(body["secrets"]["access_token"], tokens.0);
        assert!(expires_at_ms(&body).unwrap() > asked, "{body}");
    } else {
        // Only a machine too loaded to read within the half second gets here.
        assert_eq!(body["error"]["code"], "token_unavailable", "{body}");
    }
    wait_for("the token to expire", || async {
        read(&d, &id).await.0 != 200
    })
    .await;
    let reply = d
        .call_raw(Method::GET, &format!("/v1/credentials/{id}"), &[], None)
        .await;
    assert_eq!(reply.status, 503);
    assert!(reply.headers.contains_key("retry-after"));
    let body: Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"]["code"], "token_unavailable", "{body}");
    assert!(!String::from_utf8_lossy(&reply.body).contains(&tokens.0));
    let attempts = stat(&oauth_stats(&server).await, "token_requests");
    assert!(attempts < 30, "backed off instead of hammering: {attempts}");

    // Back up: the next attempt after the back-off succeeds.
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/mode",
        Some(json!({"down": false})),
    )
    .await;
    wait_for("a fresh token", || async { read(&d, &id).await.0 == 200 }).await;
    let token = access_token(&d, &id).await;
    assert!(oauth_token_valid(&server, &token).await);
    let stats = oauth_stats(&server).await;
    assert_eq!(stat(&stats, "invalid_grant"), 0, "{stats}");
    assert!(
        d.metric(r#"credproxy_oauth_refreshes_total{outcome="unavailable"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_requests_that_cannot_be_served_are_refused_clearly() {
    let server = peers::oauth_server(3600).await;
    let d = Daemon::start(|c, _| fast_refresh(c, "1h")).await;
    let plain = d.create("Production", json!({"api_key": "k"})).await;
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/credentials/{plain}/refresh"),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_refreshable")),
        "{body}"
    );
    let (status, _) = d
        .call(Method::POST, "/v1/credentials/no-such-id/refresh", None)
        .await;
    assert_eq!(status, 404);

    // Client secrets and refresh tokens are never sent in clear over the network.
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let mut body = oauth_credential(&server, "Production", &tokens, 3600);
    for (url, ok) in [
        ("http://oauth.example.com/token", false),
        ("ftp://oauth.example.com/token", false),
        ("https://user:pw@oauth.example.com/token", false),
        ("https://oauth.example.com/token", true),
        ("http://localhost:1/token", true),
    ] {
        body["oauth"]["token_url"] = json!(url);
        let (status, reply) = d
            .call(Method::POST, "/v1/credentials", Some(body.clone()))
            .await;
        assert_eq!(status == 201, ok, "{url}: {reply}");
        if !ok {
            assert_eq!(reply["error"]["code"], "invalid_request");
            assert!(!reply.to_string().contains("pw@"), "{reply}");
        }
    }
    body["oauth"]["client_auth"] = json!("digest");
    let (status, _) = d
        .call(Method::POST, "/v1/credentials", Some(body.clone()))
        .await;
    assert_eq!(status, 400);

    // Body client authentication works too.
    body["oauth"]["client_auth"] = json!("body");
    body["oauth"]["token_url"] = json!(format!("{}/token", server.url()));
    let (status, created) = d.call(Method::POST, "/v1/credentials", Some(body)).await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().unwrap();
    let (status, reply) = d
        .call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["refreshed"], true);
}

/// An answer whose write-back failed is sealed in the metadata database and applied by the
/// next attempt, without a second token request (which would replay a spent refresh token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_answer_whose_write_back_failed_is_applied_later_without_asking_again() {
    let server = peers::oauth_server(3600).await;
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), |c| fast_refresh(c, "1h")).await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let id = d
        .create_json(oauth_credential(&server, "Production", &tokens, 3600))
        .await;

    d.set(WRITES_DOWN);
    let (status, _) = d.post(&format!("/v1/credentials/{id}/refresh")).await;
    assert_eq!(status, 503, "the write-back failed");
    assert_eq!(stat(&oauth_stats(&server).await, "token_requests"), 1);
    // The spent refresh token is still the stored one; replaying it would revoke the family.
    let (_, _, _, body) = d.get(&id).await;
    assert_eq!(body["secrets"]["refresh_token"], tokens.1);

    d.set(PASS);
    let (status, body) = d.post(&format!("/v1/credentials/{id}/refresh")).await;
    assert_eq!(status, 200, "{body}");
    let stats = oauth_stats(&server).await;
    assert_eq!(
        stat(&stats, "token_requests"),
        1,
        "no second request: {stats}"
    );
    assert_eq!(stat(&stats, "family_revocations"), 0);
    let (_, _, _, body) = d.get(&id).await;
    assert_ne!(body["secrets"]["refresh_token"], tokens.1);
    assert!(oauth_token_valid(&server, body["secrets"]["access_token"].as_str().unwrap()).await);

    // And the rotated refresh token works.
    let (status, body) = d.post(&format!("/v1/credentials/{id}/refresh")).await;
    assert_eq!((status, &body["refreshed"]), (200, &json!(true)), "{body}");
    assert_eq!(stat(&oauth_stats(&server).await, "invalid_grant"), 0);
    d.stop().await;
}

/// A read-only store's credentials (Composio refreshes its own tokens) are never refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_read_only_store_are_never_refreshed() {
    let server = peers::oauth_server(3600).await;
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), |c| fast_refresh(c, "100ms")).await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let id = d
        .create_json(oauth_credential(&server, "Production", &tokens, 2))
        .await;
    d.faulty
        .read_only
        .store(true, std::sync::atomic::Ordering::SeqCst);

    let (status, body) = d.post(&format!("/v1/credentials/{id}/refresh")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("read_only_store")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, _, _, _) = d.get(&id).await;
    assert_eq!(status, 200);
    assert_eq!(stat(&oauth_stats(&server).await, "token_requests"), 0);
    d.stop().await;
}

/// Tokens and the client secret, old and new, never reach the log (at TRACE), the metrics,
/// an error body or a file of the data directory in clear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_keeps_every_token_out_of_logs_metrics_and_files() {
    let server = peers::oauth_server(3600).await;
    let d = Daemon::start(|c, _| {
        fast_refresh(c, "100ms");
        set(c, "log", "level", "trace");
    })
    .await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 2).await;
    let id = create_oauth(&d, &server, "Production", &tokens, 2).await;
    wait_for("a background refresh", || async {
        stat(&oauth_stats(&server).await, "issued") >= 1
    })
    .await;
    let (status, body) = read(&d, &id).await;
    assert_eq!(status, 200);
    let new_access = body["secrets"]["access_token"].as_str().unwrap().to_owned();
    let new_refresh = body["secrets"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    // A rejected refresh too: its error path must not echo the token either.
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/revoke",
        Some(json!({"refresh_token": new_refresh})),
    )
    .await;
    let (status, error) = d
        .call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
        .await;
    assert_eq!(status, 409);

    let logs = d.logs();
    let metrics = d.metrics_text().await;
    assert!(
        logs.contains("refreshed OAuth token"),
        "the refresh is logged"
    );
    for secret in [
        &tokens.0,
        &tokens.1,
        &new_access,
        &new_refresh,
        &CLIENT_SECRET.to_owned(),
    ] {
        assert!(!logs.contains(secret.as_str()), "a token in the log");
        assert!(!metrics.contains(secret.as_str()), "a token in the metrics");
        assert!(
            !error.to_string().contains(secret.as_str()),
            "a token in an error"
        );
        for file in common::all_files(d.dir.path()) {
            if file == d.log_path {
                continue;
            }
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(
                !common::contains_bytes(&bytes, secret.as_bytes()),
                "a token in {}",
                file.display()
            );
        }
    }
}

/// kill -9 while the token request is in flight: the server rotated the refresh token but the
/// answer never arrived. After the restart the spent token is tried exactly once, refused, and
/// the credential marked for re-authorisation; nothing retries it after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_the_token_request_costs_one_refused_try_and_no_loop() {
    let server = peers::oauth_server(3600).await;
    let mut d = Daemon::start(|c, _| fast_refresh(c, "100ms")).await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let id = create_oauth(&d, &server, "Production", &tokens, 3600).await;
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/mode",
        Some(json!({"delay_ms": 1000})),
    )
    .await;

    let socket = d.socket.clone();
    let path = format!("/v1/credentials/{id}/refresh");
    let forced = tokio::spawn(async move {
        credproxy::client::send(&socket, Method::POST, &path, &[], None).await
    });
    wait_for("the token request to reach the server", || async {
        stat(&oauth_stats(&server).await, "token_requests") == 1
    })
    .await;
    d.kill().await;
    assert!(
        forced.await.unwrap().is_err(),
        "the caller saw the connection drop"
    );
    wait_for("the server to finish the rotation", || async {
        stat(&oauth_stats(&server).await, "issued") == 1
    })
    .await;
    oauth_admin(
        &server,
        reqwest::Method::POST,
        "/admin/mode",
        Some(json!({"delay_ms": 0})),
    )
    .await;

    let d = d.restart(|_| {}).await;
    let (status, body) = d
        .call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("needs_reauth")),
        "{body}"
    );
    let (status, body) = read(&d, &id).await;
    assert_eq!(
        status, 200,
        "the current token is still served while valid: {body}"
    );
    assert_eq!(body["needs_reauth"], true);
    // Background passes and more forced refreshes send nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = d
        .call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
        .await;
    assert_eq!(status, 409);
    let stats = oauth_stats(&server).await;
    assert_eq!(stat(&stats, "token_requests"), 2, "{stats}");
    assert_eq!(stat(&stats, "invalid_grant"), 1, "{stats}");
}

/// More than a page of credentials that cannot be refreshed (the background pass reads 1,000
/// rows at a time) must not hide a due token. The pass used to read only the 1,000
/// soonest-expiring rows, so once those were all failing no other token was refreshed ahead
/// of time again; and a failure that is not the token endpoint's (here: no refresh token to
/// send) set no back-off, so the same rows headed every pass, 20 times a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_failing_by_the_thousand_do_not_hide_a_due_token() {
    use futures::StreamExt;
    const STUCK: usize = 1_001;
    let server = peers::oauth_server(3600).await;
    let mut d = Daemon::start(|c, _| {
        fast_refresh(c, "200ms");
        // One failed try each keeps them backing off for the rest of the test.
        set(c, "oauth", "retry_min", "5m");
        set(c, "oauth", "retry_max", "10m");
    })
    .await;
    let closed = format!("http://127.0.0.1:{}/token", common::free_port());
    let created: Vec<u16> = futures::stream::iter(0..STUCK)
        .map(|_| {
            let tokens = ("at-stuck".to_owned(), String::new());
            let mut body = oauth_credential(&server, "Production", &tokens, 1);
            body["secrets"]
                .as_object_mut()
                .unwrap()
                .remove("refresh_token");
            body["oauth"]["token_url"] = json!(closed);
            let d = &d;
            async move { d.call(Method::POST, "/v1/credentials", Some(body)).await.0 }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(
        created.iter().all(|s| *s == 201),
        "every create answered 201"
    );

    // Due at once (inside `refresh_before`), but expiring after every one of those.
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let id = create_oauth(&d, &server, "Production", &tokens, 30).await;
    wait_for(
        "the due token to be refreshed with no read asking",
        || async { stat(&oauth_stats(&server).await, "token_requests") >= 1 },
    )
    .await;
    let token = access_token(&d, &id).await;
    assert_ne!(token, tokens.0, "the read gets the refreshed token");
    assert!(oauth_token_valid(&server, &token).await);
    let failed = |d: &Daemon| {
        d.logs()
            .lines()
            .filter(|l| l.contains("background refresh failed"))
            .count()
    };
    wait_for("every stuck credential to be tried", || async {
        failed(&d) >= STUCK
    })
    .await;
    // A few more passes: none tries them again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failures = failed(&d);
    assert!(
        (STUCK..2 * STUCK).contains(&failures),
        "each stuck credential was tried once, then backed off: {failures} failed attempts"
    );
    d.stop().await;
}
