//! The client-credentials grant against the real authorization server in tests/peers (which
//! serves it as well as rotating refresh tokens): a credential holding only its client secret
//! gets its access token on the first read, renewed ahead of expiry by two daemons sharing one
//! database, with `audience` and `resource` sent; a refused client marks it for
//! re-authorisation; malformed descriptions are refused naming the key.

mod common;

use std::time::{Duration, Instant};

use common::peers::{self, oauth_admin, oauth_stats, oauth_token_valid, Peer, CLIENT_SECRET};
use common::{fast_refresh, share_store, Daemon, DEADLINE};
use hyper::Method;
use serde_json::{json, Value};

const CLIENT: &str = "credproxy-cc-client";
const AUDIENCE: &str = "https://api.example.test";
const RESOURCE: &str = "https://api.example.test/v2";

async fn register_client(server: &Peer, secret: &str) {
    oauth_admin(
        server,
        reqwest::Method::POST,
        "/admin/clients",
        Some(json!({"client_id": CLIENT, "client_secret": secret})),
    )
    .await;
}

fn credential(server: &Peer) -> Value {
    json!({
        "environment": "Production",
        "integration_type": "example-api",
        "secrets": {"client_secret": CLIENT_SECRET},
        "oauth": {
            "token_url": format!("{}/token", server.url()),
            "client_id": CLIENT,
            "grant": "client_credentials",
            "audience": AUDIENCE,
            "resource": RESOURCE,
        },
    })
}

async fn create(d: &Daemon, body: Value) -> String {
    let (status, body) = d.call(Method::POST, "/v1/credentials", Some(body)).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

async fn read(d: &Daemon, id: &str) -> (u16, Value) {
    d.call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await
}

fn stat(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_buy_tokens_with_the_client_secret_once_per_expiry() {
    const LIFETIME: u64 = 2;
    const RUN: Duration = Duration::from_secs(10);
    let server = peers::oauth_server(LIFETIME).await;
    register_client(&server, CLIENT_SECRET).await;
    let a = Daemon::start(|c, _| fast_refresh(c, "100ms")).await;
    let b = Daemon::start(|c, _| {
        fast_refresh(c, "100ms");
        share_store(c, &a);
    })
    .await;
    let id = create(&a, credential(&server)).await;

    // The first read (or the background refresher, which finds it due at once) buys the token,
    // with the audience and resource; the next reads reuse it.
    let (status, body) = read(&b, &id).await;
    assert_eq!(status, 200, "{body}");
    let token = body["secrets"]["access_token"].as_str().unwrap().to_owned();
    assert!(oauth_token_valid(&server, &token).await);
    assert_eq!(body["secrets"]["client_secret"], CLIENT_SECRET);
    assert!(body["secrets"].get("refresh_token").is_none(), "{body}");
    let stats = oauth_stats(&server).await;
    assert_eq!(stat(&stats, "client_credentials_issued"), 1, "{stats}");
    assert_eq!(
        (&stats["last_audience"], &stats["last_resource"]),
        (&json!(AUDIENCE), &json!(RESOURCE))
    );
    let (_, again) = read(&a, &id).await;
    assert_eq!(again["secrets"]["access_token"], token.as_str());
    assert_eq!(stat(&oauth_stats(&server).await, "token_requests"), 1);

    let started = Instant::now();
    let (mut reads, mut failed, mut rejected) = (0, 0, 0);
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
    eprintln!(
        "client credentials, two daemons, {elapsed:.1}s: {reads} reads, {requests} token \
         requests for {:.1} lifetimes; reads failed {failed}, tokens rejected {rejected}",
        elapsed / LIFETIME as f64
    );
    assert_eq!(stat(&stats, "other_errors"), 0, "{stats}");
    assert_eq!(
        requests,
        stat(&stats, "client_credentials_issued"),
        "every request was answered with a token: {stats}"
    );
    assert!(
        requests >= RUN.as_secs() / LIFETIME,
        "tokens were renewed: {stats}"
    );
    // Renewed at half of a 2-second life (refresh_before is capped at half the lifetime):
    // about one request a second between the two daemons, never one each.
    assert!(
        requests as f64 <= elapsed + 2.0,
        "the daemons did not both buy each token: {stats}"
    );
    assert_eq!(failed, 0, "every read was answered");
    assert_eq!(rejected, 0, "every token handed out was valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_is_marked_for_reauthorisation_and_not_asked_again() {
    let server = peers::oauth_server(1).await;
    register_client(&server, CLIENT_SECRET).await;
    let d = Daemon::start(|c, _| fast_refresh(c, "100ms")).await;
    let id = create(&d, credential(&server)).await;
    assert_eq!(read(&d, &id).await.0, 200);
    // The client's secret was rotated at the provider: credproxy's copy is refused.
    register_client(&server, "rotated-elsewhere").await;
    let started = Instant::now();
    loop {
        let (status, body) = read(&d, &id).await;
        if status == 409 {
            assert_eq!(body["error"]["code"], "needs_reauth", "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(started.elapsed() < DEADLINE, "never marked: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        d.metric(r#"credproxy_oauth_refreshes_total{outcome="rejected"}"#)
            .await,
        1.0
    );
    assert_eq!(d.metric("credproxy_credentials_needing_reauth").await, 1.0);
    let asked = stat(&oauth_stats(&server).await, "token_requests");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(read(&d, &id).await.0, 409);
    assert_eq!(
        stat(&oauth_stats(&server).await, "token_requests"),
        asked,
        "a refused client is not asked again"
    );

    // Re-authorisation: the new client secret stored with PATCH; the next read buys a token.
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            Some(json!({"secrets": {"client_secret": "rotated-elsewhere"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = d
        .call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = read(&d, &id).await;
    assert_eq!(status, 200, "{body}");
    assert!(oauth_token_valid(&server, body["secrets"]["access_token"].as_str().unwrap()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_client_credentials_descriptions_are_refused_by_key() {
    let server = peers::oauth_server(60).await;
    let d = Daemon::start(|_, _| {}).await;
    let mut no_secret = credential(&server);
    no_secret["secrets"] = json!({"api_key": "CANARY-not-a-client-secret"});
    let mut unknown_grant = credential(&server);
    unknown_grant["oauth"]["grant"] = json!("password");
    let mut fragment = credential(&server);
    fragment["oauth"]["resource"] = json!("https://api.example.test/#CANARY-fragment");
    let mut empty_audience = credential(&server);
    empty_audience["oauth"]["audience"] = json!("");
    for (body, names) in [
        (no_secret, "secrets.client_secret"),
        (unknown_grant, "grant"),
        (fragment, "oauth.resource"),
        (empty_audience, "oauth.audience"),
    ] {
        let (status, answer) = d.call(Method::POST, "/v1/credentials", Some(body)).await;
        assert_eq!(status, 400, "{answer}");
        let text = answer.to_string();
        assert!(text.contains(names), "{names} in {text}");
        assert!(!text.contains("CANARY"), "a value in the error: {text}");
    }
}
