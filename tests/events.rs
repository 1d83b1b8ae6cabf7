//! Re-authorisation events end to end: the real OAuth server refusing or failing refreshes,
//! the Composio fake's accounts changing status, and a local webhook receiver that checks
//! every signature and answers 500 to the first attempts. Every event arrives, exactly the
//! expected set, each accepted once: across a `kill -9` of the daemon, and from a fleet of two
//! instances on one PostgreSQL database.

mod common;

use common::wait_for;

use std::path::Path;
use std::time::Duration;

use common::fakes::{self, Receiver, WEBHOOK_SECRET};
use common::peers::{self, oauth_admin, oauth_grant, CLIENT_ID, CLIENT_SECRET};
use common::{fast_refresh, file_ref, set, table, Daemon};
use hyper::Method;
use serde_json::{json, Value};

/// `[events]` with one webhook for every workspace, retried within a second. The poll interval
/// is left at its default (30 s): retries are looked for when they are due, not by polling.
fn webhook(c: &mut toml::Table, dir: &Path, receiver: &Receiver) {
    set(c, "events", "retry_max", "1s");
    let hook = table(&[
        ("url", receiver.url().into()),
        ("secret", file_ref(dir, "webhook-secret", WEBHOOK_SECRET)),
        // Long enough that a stalled test machine does not make a second delivery.
        ("timeout", "10s".into()),
    ]);
    set(c, "events", "webhooks", toml::Value::Array(vec![hook]));
}

async fn create(d: &Daemon, body: Value) -> String {
    let (status, body) = d.call(Method::POST, "/v1/credentials", Some(body)).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Every event `GET /v1/events` lists, paging `limit` at a time.
async fn all_events(d: &Daemon, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = d
            .call(
                Method::GET,
                &format!("/v1/events?after={after}&limit={limit}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["events"].as_array().unwrap().iter().cloned());
        after = page["next_after"].as_i64().unwrap();
        if page["more"] == false {
            return out;
        }
    }
}

async fn revoke(server: &peers::Peer, refresh_token: &str) {
    oauth_admin(
        server,
        reqwest::Method::POST,
        "/admin/revoke",
        Some(json!({"refresh_token": refresh_token})),
    )
    .await;
}

async fn token_endpoint_down(server: &peers::Peer, down: bool) {
    oauth_admin(
        server,
        reqwest::Method::POST,
        "/admin/mode",
        Some(json!({"down": down})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauthorisation_events_arrive_signed_and_once_each_through_failures_and_a_kill_9() {
    let server = peers::oauth_server(3600).await;
    let receiver = fakes::webhook_receiver(2).await;
    let mut d = Daemon::start(|c, dir| {
        fast_refresh(c, "100ms");
        webhook(c, dir, &receiver);
    })
    .await;

    // needs_reauth: the provider refuses the refresh token. The receiver is down meanwhile,
    // and the daemon is killed after its first failed attempt: the event waits in the
    // database, and the restarted daemon delivers it.
    receiver.state().down = true;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let revoked = create(
        &d,
        peers::oauth_credential(&server, "Production", &tokens, 3),
    )
    .await;
    revoke(&server, &tokens.1).await;
    wait_for("a first delivery attempt", || async {
        !receiver.state().attempts.is_empty()
    })
    .await;
    d.kill().await;
    receiver.state().down = false;
    let d = d.restart(|_| {}).await;
    wait_for("needs_reauth delivered", || async {
        receiver.accepted_of("needs_reauth").len() == 1
    })
    .await;
    let needs = &receiver.accepted_of("needs_reauth")[0];
    assert_eq!(needs["credential_id"], revoked.as_str());
    assert_eq!(needs["workspace"], "default");
    assert_eq!(needs["environment"], "Production");
    assert_eq!(needs["integration_type"], "example-oauth");
    assert!(
        needs["reason"].as_str().unwrap().contains("invalid_grant"),
        "{needs}"
    );
    assert!(credproxy::time::parse_rfc3339_ms(needs["at"].as_str().unwrap()).is_some());

    // reauthorized: the user's new tokens are stored with PATCH.
    let fresh = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let (status, body) = d
        .call(
            Method::PATCH,
            &format!("/v1/credentials/{revoked}"),
            Some(json!({
                "secrets": {"access_token": fresh.0, "refresh_token": fresh.1},
                "expires_at": common::now() + 3600,
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // refresh_failing: the token endpoint is down past a token's expiry. Retried many times,
    // reported once; and refresh_recovered once it answers again.
    let short = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    token_endpoint_down(&server, true).await;
    let failing = create(&d, peers::oauth_credential(&server, "Sandbox", &short, 1)).await;
    wait_for("refresh_failing delivered", || async {
        receiver.accepted_of("refresh_failing").len() == 1
    })
    .await;
    let retried = d
        .metric(r#"credproxy_oauth_refreshes_total{outcome="unavailable"}"#)
        .await;
    wait_for("more failed refreshes", || async {
        d.metric(r#"credproxy_oauth_refreshes_total{outcome="unavailable"}"#)
            .await
            >= retried + 2.0
    })
    .await;
    token_endpoint_down(&server, false).await;
    let (status, body) = d
        .call(
            Method::POST,
            &format!("/v1/credentials/{failing}/refresh"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    wait_for("reauthorized and refresh_recovered delivered", || async {
        receiver.accepted_of("reauthorized").len() == 1
            && receiver.accepted_of("refresh_recovered").len() == 1
    })
    .await;

    // Exactly the expected set, in order, each delivered; the webhook accepted each once.
    wait_for("every event delivered", || async {
        all_events(&d, 2)
            .await
            .iter()
            .all(|e| e["delivery"] == "delivered")
    })
    .await;
    let listed = all_events(&d, 2).await;
    let kinds: Vec<(&str, &str)> = listed
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["credential_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("needs_reauth", revoked.as_str()),
            ("reauthorized", revoked.as_str()),
            ("refresh_failing", failing.as_str()),
            ("refresh_recovered", failing.as_str()),
        ],
        "{listed:#?}"
    );
    let seqs: Vec<i64> = listed.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let accepted = receiver.accepted_ids();
    assert_eq!(accepted.len(), 4, "{accepted:?}");
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    for e in &listed {
        assert!(accepted.contains_key(e["id"].as_str().unwrap()));
    }
    {
        let state = receiver.state();
        assert_eq!(state.refused, 0, "every signature checked out");
        // The first two attempts at each event were answered 500.
        assert!(
            state.attempts.values().all(|n| *n >= 3),
            "{:?}",
            state.attempts
        );
        for body in &state.bodies {
            for canary in [CLIENT_SECRET, WEBHOOK_SECRET, &tokens.1, &fresh.0, &fresh.1] {
                assert!(!common::contains_bytes(body, canary.as_bytes()));
            }
        }
    }
    assert!(
        d.metric(r#"credproxy_event_deliveries_total{outcome="delivered"}"#)
            .await
            >= 2.0
    );
    assert!(
        d.metric(r#"credproxy_event_deliveries_total{outcome="retried"}"#)
            .await
            >= 4.0
    );
    assert_eq!(
        d.metric(r#"credproxy_events_total{type="refresh_failing"}"#)
            .await,
        1.0
    );
    wait_for("nothing queued", || async {
        d.metric("credproxy_events_queued").await == 0.0
    })
    .await;
    let logs = d.logs();
    assert!(!logs.contains(WEBHOOK_SECRET) && !logs.contains(CLIENT_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_composio_account_leaving_and_regaining_active_is_reported_once_each_way() {
    let fake = fakes::composio().await;
    // No webhook: the events are there for polling, marked as going nowhere.
    let d = Daemon::start(|c, dir| {
        let manager = table(&[
            ("id", "composio".into()),
            ("type", "composio".into()),
            ("base_url", fake.base_url().into()),
            (
                "api_key",
                file_ref(dir, "composio-key", fakes::COMPOSIO_API_KEY),
            ),
        ]);
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        set(c, "cache", "ttl", "50ms");
        set(c, "cache", "stale_if_error", "0s");
    })
    .await;
    fake.account("ca_1", "ACTIVE", "API_KEY", json!({"api_key": "key-1"}));
    let id = create(
        &d,
        json!({"environment": "Production", "integration_type": "github",
               "secrets_manager_id": "composio", "external_id": "ca_1"}),
    )
    .await;
    let path = format!("/v1/credentials/{id}");
    let read = || d.call(Method::GET, &path, None);
    assert_eq!(read().await.0, 200);

    fake.account("ca_1", "REVOKED", "API_KEY", json!({"api_key": "key-1"}));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let (status, body) = read().await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "credential_unusable");
    }
    fake.account("ca_1", "ACTIVE", "API_KEY", json!({"api_key": "key-2"}));
    tokio::time::sleep(Duration::from_millis(60)).await;
    let (status, body) = read().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["secrets"]["api_key"], "key-2");
    assert_eq!(body["needs_reauth"], false);

    let events = all_events(&d, 100).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["account_inactive", "account_active"], "{events:#?}");
    assert!(
        events[0]["reason"].as_str().unwrap().contains("REVOKED"),
        "{events:#?}"
    );
    assert!(events.iter().all(|e| e["delivery"] == "none"));
    assert_eq!(events[0]["credential_id"], id.as_str());
    // Paging from the last one seen returns nothing new.
    let last = events[1]["seq"].as_i64().unwrap();
    let (status, page) = d
        .call(Method::GET, &format!("/v1/events?after={last}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next_after"], last);
    // A bad query is refused by name.
    for bad in ["after=-1", "limit=0", "limit=501", "after=x", "since=1"] {
        let (status, body) = d
            .call(Method::GET, &format!("/v1/events?{bad}"), None)
            .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_two_delivers_each_event_once() {
    const EVENTS: usize = 4;
    let pg = peers::postgres().await;
    let server = peers::oauth_server(3600).await;
    let receiver = fakes::webhook_receiver(1).await;
    let key_dir = tempfile::tempdir().unwrap();
    let key = key_dir.path().join("master.key");
    assert!(common::run_cli(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let mut ds = Vec::new();
    for _ in 0..2 {
        ds.push(
            Daemon::start(|c, dir| {
                set(c, "store", "url", pg.url());
                set(c, "store", "master_key_file", key.display().to_string());
                set(c, "store", "generate_master_key", false);
                fast_refresh(c, "100ms");
                webhook(c, dir, &receiver);
            })
            .await,
        );
    }
    let mut ids = Vec::new();
    for i in 0..EVENTS {
        let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
        let id = create(
            &ds[i % 2],
            peers::oauth_credential(&server, "Production", &tokens, 3),
        )
        .await;
        revoke(&server, &tokens.1).await;
        ids.push(id);
    }
    wait_for("every event accepted", || async {
        receiver.accepted_ids().len() == EVENTS
    })
    .await;
    // Time for a second delivery, if either instance were to make one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let accepted = receiver.accepted_ids();
    assert!(accepted.values().all(|n| *n == 1), "{accepted:?}");
    let attempts = receiver.state().attempts.clone();
    assert!(
        attempts.values().all(|n| *n == 2),
        "one 500, then one 200, whichever instance sent them: {attempts:?}"
    );
    let mut reported: Vec<String> = receiver
        .accepted_of("needs_reauth")
        .iter()
        .map(|e| e["credential_id"].as_str().unwrap().to_owned())
        .collect();
    reported.sort();
    ids.sort();
    assert_eq!(reported, ids);
    let mut delivered = 0.0;
    for d in &ds {
        delivered += d
            .metric(r#"credproxy_event_deliveries_total{outcome="delivered"}"#)
            .await;
        assert_eq!(all_events(d, 3).await.len(), EVENTS);
    }
    assert_eq!(delivered, EVENTS as f64);
    assert_eq!(receiver.state().refused, 0);
}
