//! The egress proxy, `ANY /v1/proxy/{credential_id}/{path…}`, through the real binary against a
//! local HTTPS upstream with a test CA (tests/common/upstream.rs): the four ways a secret is
//! applied and the worker headers dropped; OAuth 401 → one refresh → one retry against the real
//! OAuth server; path escapes sent as raw bytes, Host and absolute-form tricks and redirects that
//! must never reach another host; the `use`/`read` access rights and the audit line; 100 MB
//! streamed each way in bounded memory; the limits (body size, concurrency, timeouts,
//! unreachable upstreams, 429 passed through) and their metrics; upstreams added by reload, and
//! `check-config` refusing plain HTTP to a remote host.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::peers::{self, oauth_credential, oauth_grant, oauth_stats, oauth_token_valid};
use common::peers::{CLIENT_ID, CLIENT_SECRET};
use common::upstream::{
    self as up, create_typed, entry, get, one_upstream, raw, request, set_upstreams, Evil,
    Expected, Outgoing, RssSampler, Upstream, Via,
};
use common::{set, wait_for, Daemon};
use hyper::Method;
use serde_json::{json, Value};

const BEARER: &str = "CANARY-bearer-6a1f0c";
const USER: &str = "CANARY-user-93b2";
const PASSWORD: &str = "CANARY-pass:with-colon-77d1";
const API_KEY: &str = "CANARY-apikey-e4c8";
/// Characters a query value must have percent-encoded.
const QUERY_KEY: &str = "CANARY-q/+ &=?#%-5b0e";

fn basic_blob() -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
}

/// Asserts no secret (raw or as it travels: base64 for basic) is in `text`.
fn assert_no_secret(what: &str, text: &[u8]) {
    for needle in ["CANARY", &basic_blob()] {
        assert!(
            !common::contains_bytes(text, needle.as_bytes()),
            "{what} holds a secret ({needle}):\n{}",
            String::from_utf8_lossy(text)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_kinds_apply_the_secret_and_drop_the_workers_credentials() {
    let upstream = Upstream::start().await;
    let d = Daemon::start(|c, dir| {
        let ca = upstream.write_ca(dir);
        let url = upstream.url("/api");
        let e = |t: &str, auth: &str, extra: &[(&str, toml::Value)]| {
            entry(t, &url, auth, Some(&ca), extra)
        };
        set_upstreams(
            c,
            vec![
                e("k-bearer", "bearer", &[]),
                e("k-basic", "basic", &[]),
                e(
                    "k-header",
                    "header",
                    &[
                        ("header", "X-Api-Key".into()),
                        ("prefix", "Token ".into()),
                        ("field", "api_key".into()),
                    ],
                ),
                e(
                    "k-query",
                    "query",
                    &[("parameter", "api_key".into()), ("field", "key".into())],
                ),
            ],
        );
    })
    .await;
    let env = "Production";
    let ids = [
        ("k-bearer", json!({"access_token": BEARER, "note": "x"})),
        ("k-basic", json!({"username": USER, "password": PASSWORD})),
        ("k-header", json!({"api_key": API_KEY})),
        ("k-query", json!({"key": QUERY_KEY})),
    ];
    let mut creds = Vec::new();
    for (kind, secrets) in ids {
        creds.push((kind, create_typed(&d, env, kind, secrets).await));
    }
    upstream.expect(Expected::Header(
        "authorization",
        format!("Bearer {BEARER}"),
    ));
    upstream.expect(Expected::Header(
        "authorization",
        format!("Basic {}", basic_blob()),
    ));
    upstream.expect(Expected::Header("x-api-key", format!("Token {API_KEY}")));
    upstream.expect(Expected::Query("api_key", QUERY_KEY.into()));

    let host = format!("127.0.0.1:{}", upstream.port());
    let worker_headers: &[(&str, &str)] = &[
        ("authorization", "Bearer worker-own-token"),
        ("cookie", "session=worker-cookie"),
        ("proxy-authorization", "Basic d29ya2VyOnB3"),
        ("proxy-foo", "worker-proxy"),
        ("x-api-key", "worker-api-key"),
        ("connection", "x-hop-header"),
        ("x-hop-header", "hop"),
        ("keep-alive", "timeout=5"),
        ("x-custom", "kept"),
        ("content-type", "application/json"),
    ];
    let path = "/v3/objects/contacts%20x/a.b";
    let query = "a=1&api_key=worker-supplied&b=two%20words&c=%2F";
    let body = br#"{"properties":{"email":"someone@example.com"}}"#;
    for (kind, id) in &creds {
        for method in [Method::GET, Method::POST] {
            let outgoing = match method {
                Method::POST => Outgoing::Bytes(body.to_vec()),
                _ => Outgoing::None,
            };
            let target = format!("/v1/proxy/{id}{path}?{query}");
            let before = upstream.seen_count();
            let answer = request(
                Via::Unix(&d.socket),
                method.clone(),
                &target,
                worker_headers,
                outgoing,
            )
            .await;
            let what = format!("{kind} {method}");
            assert_eq!(answer.status, 200, "{what}: {}", answer.describe());
            assert_eq!(answer.header("x-upstream"), Some("echo"), "{what}");
            let summary = answer.json();
            assert_eq!(summary["authorized"], true, "{what}: {summary}");
            assert_eq!(summary["method"], method.as_str());
            assert_no_secret(&format!("{what}: the worker's answer"), &answer.body);
            for (k, v) in &answer.headers {
                assert_no_secret(&what, format!("{k}: {v:?}").as_bytes());
            }

            assert_eq!(upstream.seen_count(), before + 1, "{what}: one request");
            let seen = upstream.last();
            assert_eq!(seen.method, method.as_str(), "{what}");
            assert_eq!(seen.path, format!("/api{path}"), "{what}: the path as sent");
            assert_eq!(seen.all("host"), [host.as_str()], "{what}");
            for dropped in [
                "cookie",
                "proxy-authorization",
                "proxy-foo",
                "x-hop-header",
                "keep-alive",
            ] {
                assert!(
                    seen.all(dropped).is_empty(),
                    "{what}: {dropped} reached the upstream"
                );
            }
            assert_eq!(seen.all("x-custom"), ["kept"], "{what}");
            let auth = seen.all("authorization");
            let api_key = seen.all("x-api-key");
            match *kind {
                "k-bearer" => assert_eq!(auth, [format!("Bearer {BEARER}")]),
                "k-basic" => assert_eq!(auth, [format!("Basic {}", basic_blob())]),
                _ => assert!(
                    auth.is_empty(),
                    "{what}: the worker's Authorization: {auth:?}"
                ),
            }
            match *kind {
                "k-header" => assert_eq!(api_key, [format!("Token {API_KEY}")], "{what}"),
                _ => assert_eq!(api_key, ["worker-api-key"], "{what}"),
            }
            let raw_query = seen.query.clone().unwrap_or_default();
            if *kind == "k-query" {
                let keys: Vec<_> = seen
                    .query_pairs()
                    .into_iter()
                    .filter(|(k, _)| k == "api_key")
                    .map(|(_, v)| v)
                    .collect();
                assert_eq!(keys, [QUERY_KEY], "{what}: replaced, once: {raw_query}");
                let rest: Vec<_> = raw_query
                    .split('&')
                    .filter(|p| !p.starts_with("api_key="))
                    .collect();
                assert_eq!(rest.join("&"), "a=1&b=two%20words&c=%2F", "{what}");
            } else {
                assert_eq!(raw_query, query, "{what}: the query as sent");
            }
            if method == Method::POST {
                assert_eq!(seen.body, body, "{what}");
                assert!(seen.body_complete);
                assert_eq!(seen.all("content-type"), ["application/json"], "{what}");
            } else {
                assert_eq!(seen.body_bytes, 0, "{what}");
            }
        }
    }

    // The route's own refusals reach no upstream.
    let before = upstream.seen_count();
    let none = create_typed(&d, env, "k-none", json!({"access_token": "CANARY-none"})).await;
    let answer = get(&d, &format!("/v1/proxy/{none}/x")).await;
    answer.assert_error(422, "no_upstream");
    let missing = create_typed(&d, env, "k-bearer", json!({"other": "CANARY-other"})).await;
    let answer = get(&d, &format!("/v1/proxy/{missing}/x")).await;
    // Not `secret_missing`, the 502 of a secret gone from its manager.
    answer.assert_error(422, "secret_field_missing");
    let answer = get(&d, "/v1/proxy/no-such-credential/x").await;
    answer.assert_error(404, "not_found");
    assert_eq!(upstream.seen_count(), before);
    assert_no_secret("the daemon's log", d.logs().as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_401_refreshes_once_and_retries_a_replayable_request_once() {
    let server = peers::oauth_server(3600).await;
    let upstream = Upstream::start().await;
    let d = Daemon::start(|c, dir| {
        one_upstream(c, dir, &upstream, "example-oauth", "bearer", &[]);
    })
    .await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(oauth_credential(&server, "Production", &tokens, 3600)),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let server_ref = &server;
    let token_requests = move || async move {
        oauth_stats(server_ref).await["token_requests"]
            .as_u64()
            .unwrap()
    };
    let before = token_requests().await;

    // The upstream no longer takes the current token (revoked on its side, say).
    upstream.reject_bearer(&tokens.0);
    let answer = get(&d, &format!("/v1/proxy/{id}/resource?page=2")).await;
    assert_eq!(answer.status, 200, "{}\n{}", answer.describe(), d.logs());
    assert_eq!(token_requests().await, before + 1, "exactly one refresh");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "the request and one retry: {seen:?}");
    assert_eq!(seen[0].bearer().as_deref(), Some(tokens.0.as_str()));
    let second = seen[1].bearer().unwrap();
    assert_ne!(second, tokens.0, "the retry carries the new token");
    assert!(oauth_token_valid(&server, &second).await);
    assert_eq!(seen[1].path, "/api/resource");
    assert_eq!(seen[1].query.as_deref(), Some("page=2"));
    let retries = r#"credproxy_proxy_retries_total{integration_type="example-oauth"}"#;
    assert_eq!(d.metric(retries).await, 1.0);

    // A streamed body (chunked, no Content-Length) cannot be replayed: the worker gets the 401,
    // and the token is refreshed for the next call anyway.
    upstream.reject_bearer(&second);
    let answer = request(
        Via::Unix(&d.socket),
        Method::POST,
        &format!("/v1/proxy/{id}/upload"),
        &[("content-type", "text/plain")],
        Outgoing::Chunks(vec![b"first chunk, ", b"second chunk"]),
    )
    .await;
    assert_eq!(answer.status, 401, "{}", answer.describe());
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3, "no retry of a streamed body: {seen:?}");
    assert_eq!(seen[2].bearer().as_deref(), Some(second.as_str()));
    assert_eq!(seen[2].body, b"first chunk, second chunk");
    wait_for(
        "the refresh after the unreplayable 401",
        move || async move { token_requests().await > before + 1 },
    )
    .await;
    let answer = get(&d, &format!("/v1/proxy/{id}/resource")).await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let third = upstream.last().bearer().unwrap();
    assert!(
        third != second && third != tokens.0,
        "a third token: {third}"
    );
    assert_eq!(upstream.seen_count(), 4, "no 401 on the next call");
    assert_eq!(token_requests().await, before + 2, "one per rejected token");

    // A body with a Content-Length within proxy.replay_buffer_bytes is sent again, whole.
    upstream.reject_bearer(&third);
    let body = b"{\"small\": true}".to_vec();
    let via = Via::Unix(&d.socket);
    let path = format!("/v1/proxy/{id}/upload");
    let answer = request(via, Method::POST, &path, &[], Outgoing::Bytes(body.clone())).await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6, "the request and its retry");
    assert_eq!(seen[4].bearer().as_deref(), Some(third.as_str()));
    assert!(seen[5].bearer().is_some_and(|t| t != third) && seen[5].body == body);
    assert_eq!(seen[4].body, body);
    assert_eq!(token_requests().await, before + 3);
    assert_eq!(d.metric(retries).await, 2.0);
    assert!(!d.logs().contains(&third) && !d.logs().contains(CLIENT_SECRET));
}

/// How an escape attempt must end.
enum Outcome {
    /// 400 `invalid_proxy_path`, nothing sent upstream.
    Refused,
    /// A 400 of any code, or a 200 from the right upstream at exactly this path and query.
    RefusedOr(&'static str, Option<&'static str>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_from_the_base_url_never_reach_another_host() {
    let upstream = Upstream::start().await;
    let evil = Evil::start().await;
    let d = Daemon::start(|c, dir| {
        one_upstream(c, dir, &upstream, "esc", "bearer", &[]);
    })
    .await;
    let id = create_typed(
        &d,
        "Production",
        "esc",
        json!({"access_token": "CANARY-esc"}),
    )
    .await;
    let ep = evil.port();
    upstream.redirect_to(&format!("http://127.0.0.1:{ep}/x"));
    let line = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
    };

    // The same raw form, well-formed: it works.
    let ok = raw(&d.socket, &line(&format!("/v1/proxy/{id}/x"), "localhost")).await;
    assert_eq!(ok.status, 200, "{} {:?}", ok.head, ok.body);
    assert_eq!(upstream.last().path, "/api/x");

    use Outcome::*;
    let attempts: Vec<(String, Outcome)> = vec![
        (format!("/v1/proxy/{id}/../../x"), Refused),
        (format!("/v1/proxy/{id}/..%2f..%2fx"), Refused),
        (format!("/v1/proxy/{id}/%2e%2e/x"), Refused),
        (format!("/v1/proxy/{id}/%2E%2E/%2E%2E/x"), Refused),
        (format!("/v1/proxy/{id}/./x"), Refused),
        (format!("/v1/proxy/{id}//evil.example/x"), Refused),
        (format!("/v1/proxy/{id}/http://127.0.0.1:{ep}/x"), Refused),
        (format!("/v1/proxy/{id}/%5c%5cevil/x"), Refused),
        (format!("/v1/proxy/{id}/a%00b"), Refused),
        (
            format!("/v1/proxy/{id}/@evil/x"),
            RefusedOr("/api/@evil/x", None),
        ),
        (
            format!("/v1/proxy/{id}/x?y=1#frag"),
            RefusedOr("/api/x", Some("y=1")),
        ),
        (
            format!("http://127.0.0.1:{ep}/v1/proxy/{id}/x"),
            RefusedOr("/api/x", None),
        ),
    ];
    for (target, outcome) in attempts {
        let before = upstream.seen_count();
        let answer = raw(&d.socket, &line(&target, "localhost")).await;
        let body = String::from_utf8_lossy(&answer.body).into_owned();
        eprintln!("{target}: {} {body}", answer.status);
        match outcome {
            Refused => {
                assert_eq!(
                    (answer.status, answer.code().as_str()),
                    (400, "invalid_proxy_path"),
                    "{target}: {} {body}",
                    answer.head
                );
                assert_eq!(
                    upstream.seen_count(),
                    before,
                    "{target} reached the upstream"
                );
            }
            RefusedOr(path, query) => {
                if answer.status == 200 {
                    let seen = upstream.last();
                    assert_eq!(upstream.seen_count(), before + 1, "{target}");
                    assert_eq!(seen.path, path, "{target}");
                    assert_eq!(seen.query.as_deref(), query, "{target}");
                } else {
                    assert_eq!(answer.status, 400, "{target}: {} {body}", answer.head);
                    assert_eq!(upstream.seen_count(), before, "{target}");
                }
            }
        }
    }

    // A Host header naming the evil listener changes nothing: the upstream gets its own host.
    let answer = raw(
        &d.socket,
        &line(&format!("/v1/proxy/{id}/x"), &format!("127.0.0.1:{ep}")),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(
        upstream.last().all("host"),
        [format!("127.0.0.1:{}", upstream.port())]
    );
    // A redirect goes back to the worker as it is; nobody follows it.
    let answer = raw(
        &d.socket,
        &line(&format!("/v1/proxy/{id}/redirect"), "localhost"),
    )
    .await;
    assert_eq!(answer.status, 302, "{}", answer.head);
    assert_eq!(
        answer.header("location"),
        Some(format!("http://127.0.0.1:{ep}/x"))
    );

    upstream.assert_paths_under("/api/");
    assert_eq!(
        (evil.connections(), evil.bytes()),
        (0, 0),
        "the evil listener was reached"
    );
    assert!(!d.logs().contains("CANARY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn use_without_read_proxies_but_cannot_read_and_the_audit_line_names_the_call() {
    let upstream = Upstream::start().await;
    let port = common::free_port();
    let token = "tcp-token-for-proxy-tests";
    let uid = credproxy::sys::effective_ids().0 as i64;
    let rules = |use_: bool| {
        toml::Value::Array(vec![
            common::table(&[
                ("tcp", true.into()),
                ("environments", vec!["*"].into()),
                ("write", true.into()),
            ]),
            common::table(&[
                ("uid", uid.into()),
                ("environments", vec!["Production"].into()),
                // A rule granting nothing is refused: the one without `use` may read.
                ("read", (!use_).into()),
                ("use", use_.into()),
            ]),
        ])
    };
    let d = Daemon::start(|c, dir| {
        one_upstream(c, dir, &upstream, "acc", "bearer", &[]);
        up::tcp_listener(c, dir, port, token);
        c.insert("access".into(), rules(true));
    })
    .await;
    let tcp = Via::Tcp(port, token);
    let created = request(
        tcp,
        Method::POST,
        "/v1/credentials",
        &[("content-type", "application/json")],
        Outgoing::Bytes(
            json!({"environment": "Production", "integration_type": "acc",
                   "secrets": {"access_token": "CANARY-acc"}})
            .to_string()
            .into_bytes(),
        ),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.describe());
    let id = created.json()["id"].as_str().unwrap().to_owned();

    let answer = get(
        &d,
        &format!("/v1/proxy/{id}/contacts?email=QVAL-4d2a%40example.com"),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    assert_eq!(upstream.last().bearer().as_deref(), Some("CANARY-acc"));
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert!(!body.to_string().contains("CANARY"));

    // The TCP listener proxies too; its token never goes upstream.
    let answer = request(
        tcp,
        Method::GET,
        &format!("/v1/proxy/{id}/tcp"),
        &[],
        Outgoing::None,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let seen = upstream.last();
    assert_eq!(seen.path, "/api/tcp");
    assert!(seen.all("x-credproxy-token").is_empty(), "{seen:?}");
    assert!(!format!("{:?}", seen.headers).contains(token));

    // The audit line: route, credential, method, upstream host and status; no query value.
    let logs = d
        .log_until("the proxied call's audit line", |l| {
            l.lines().any(|l| {
                l.contains("credproxy::audit")
                    && l.contains("\"proxy\"")
                    && l.contains("status=200")
            })
        })
        .await;
    let audit: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("credproxy::audit") && l.contains("route=\"proxy\""))
        .collect();
    let line = audit
        .iter()
        .find(|l| l.contains("transport=\"unix\""))
        .unwrap_or_else(|| panic!("no unix proxy audit line:\n{logs}"));
    for wanted in [
        format!("credential=\"{id}\""),
        "GET".into(),
        "127.0.0.1".into(),
        "status=200".into(),
    ] {
        assert!(line.contains(&wanted), "{wanted} missing from {line}");
    }
    for l in &audit {
        assert!(!l.contains("QVAL-4d2a") && !l.contains("CANARY"), "{l}");
    }
    assert!(!logs.contains("CANARY-acc") && !logs.contains(token));

    // The same uid with `read` but without `use`: refused, and nothing goes upstream.
    let reloads = d.logs().matches("configuration reloaded").count();
    up::edit_config(&d, |c| {
        c.insert("access".into(), rules(false));
    });
    common::signal(d.pid(), libc::SIGHUP);
    d.log_until("the reload", |l| {
        l.matches("configuration reloaded").count() > reloads
    })
    .await;
    let before = upstream.seen_count();
    let answer = get(&d, &format!("/v1/proxy/{id}/contacts")).await;
    answer.assert_error(403, "forbidden");
    assert_eq!(upstream.seen_count(), before);
    let (status, _) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 200, "read is a right of its own");
    d.log_until("the refusal's audit line", |l| {
        l.lines()
            .any(|l| l.contains("route=\"proxy\"") && l.contains("status=403"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_megabytes_each_way_stream_in_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let d = Daemon::start(|c, dir| {
        set(c, "proxy", "max_body_bytes", 256 * 1024 * 1024_i64);
        set(c, "proxy", "timeout", "600s");
        one_upstream(c, dir, &upstream, "big", "bearer", &[]);
    })
    .await;
    let id = create_typed(
        &d,
        "Production",
        "big",
        json!({"access_token": "CANARY-big"}),
    )
    .await;
    // A first call sets up what lasts (the upstream's TLS client, the secret's cache entry).
    let warm = get(&d, &format!("/v1/proxy/{id}/warm")).await;
    assert_eq!(warm.status, 200, "{}", warm.describe());
    let baseline = up::vm_rss_kib(d.pid());
    let sampler = RssSampler::start(d.pid());

    let started = Instant::now();
    let answer = request(
        Via::Unix(&d.socket),
        Method::POST,
        &format!("/v1/proxy/{id}/upload"),
        &[("content-type", "application/octet-stream")],
        Outgoing::Generated(SIZE),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let seen = upstream.last();
    assert_eq!(seen.body_bytes, SIZE);
    assert!(
        seen.body_complete && seen.generated,
        "the upload arrived intact"
    );
    assert_eq!(answer.json()["body_bytes"], SIZE);
    let upload = started.elapsed();

    let started = Instant::now();
    let answer = get(&d, &format!("/v1/proxy/{id}/download/{SIZE}")).await;
    assert_eq!(answer.status, 200, "{}", answer.headers.len());
    assert_eq!(answer.body_bytes, SIZE);
    assert!(answer.generated, "the download arrived intact");
    let download = started.elapsed();

    let (peak, samples) = sampler.stop().await;
    eprintln!(
        "upload {upload:?}, download {download:?}, VmRSS {baseline} KiB before, peak {peak} KiB \
         ({samples} samples)"
    );
    assert!(samples >= 5, "{samples} samples");
    assert!(
        peak.saturating_sub(baseline) < 16 * 1024,
        "the daemon grew by {} KiB moving 2 x 100 MB",
        peak - baseline
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_timeouts_unreachable_upstreams_and_their_metrics() {
    let upstream = Upstream::start().await;
    // Nothing listens on 127.0.0.2:1 (a port another test could take between `free_port`
    // and the call would make this a TLS failure).
    let closed = "127.0.0.2:1";
    let d = Daemon::start(|c, dir| {
        let ca = upstream.write_ca(dir);
        set(c, "proxy", "max_body_bytes", 4096_i64);
        set(c, "proxy", "max_concurrent_per_credential", 1_i64);
        let url = upstream.url("/api");
        set_upstreams(
            c,
            vec![
                entry("lim", &url, "bearer", Some(&ca), &[]),
                entry(
                    "slow",
                    &url,
                    "bearer",
                    Some(&ca),
                    &[("timeout", "1s".into())],
                ),
                // The query kind: a failure's log line must not carry the URL it built.
                entry(
                    "closed",
                    &format!("https://{closed}/api"),
                    "query",
                    None,
                    &[
                        ("parameter", "key".into()),
                        ("field", "access_token".into()),
                    ],
                ),
                // The right upstream without its CA: a certificate nobody vouches for.
                entry("untrusted", &url, "bearer", None, &[]),
            ],
        );
    })
    .await;
    let secret = json!({"access_token": "CANARY-lim"});
    let a = create_typed(&d, "Production", "lim", secret.clone()).await;
    let b = create_typed(&d, "Production", "lim", secret.clone()).await;
    let slow = create_typed(&d, "Production", "slow", secret.clone()).await;
    let unreachable = create_typed(&d, "Production", "closed", secret.clone()).await;
    let untrusted = create_typed(&d, "Production", "untrusted", secret).await;
    let sock = Via::Unix(&d.socket);

    let answer = request(
        sock,
        Method::POST,
        &format!("/v1/proxy/{a}/echo"),
        &[],
        Outgoing::Bytes(vec![b'x'; 8192]),
    )
    .await;
    answer.assert_error(413, "payload_too_large");
    assert_eq!(
        upstream.seen_count(),
        0,
        "a refused body is not sent upstream"
    );

    // One call on `a` held open by the upstream: a second one on `a` is turned away, `b` is not.
    let held = {
        let (socket, a) = (d.socket.clone(), a.clone());
        tokio::spawn(async move {
            request(
                Via::Unix(&socket),
                Method::GET,
                &format!("/v1/proxy/{a}/hold"),
                &[],
                Outgoing::None,
            )
            .await
        })
    };
    wait_for("the upstream to hold the call", || async {
        upstream.holding() == 1
    })
    .await;
    let answer = get(&d, &format!("/v1/proxy/{a}/echo")).await;
    answer.assert_error(503, "overloaded");
    let retry_after = answer
        .header("retry-after")
        .expect("Retry-After on 503 overloaded");
    assert!(retry_after.parse::<u64>().is_ok(), "{retry_after}");
    let answer = get(&d, &format!("/v1/proxy/{b}/echo")).await;
    assert_eq!(
        answer.status,
        200,
        "another credential is not limited: {}",
        answer.describe()
    );
    upstream.release();
    assert_eq!(held.await.unwrap().status, 200);

    let started = Instant::now();
    let answer = get(&d, &format!("/v1/proxy/{slow}/never")).await;
    answer.assert_error(504, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    let answer = get(&d, &format!("/v1/proxy/{unreachable}/x")).await;
    answer.assert_error(502, "upstream_unreachable");
    let (before, connections) = (upstream.seen_count(), upstream.connections());
    let answer = get(&d, &format!("/v1/proxy/{untrusted}/x")).await;
    answer.assert_error(502, "upstream_unreachable");
    assert!(
        upstream.connections() > connections,
        "it did try the upstream"
    );
    assert_eq!(
        upstream.seen_count(),
        before,
        "no request over an unverified connection"
    );

    let answer = get(&d, &format!("/v1/proxy/{a}/status/429")).await;
    assert_eq!(answer.status, 429, "{}", answer.describe());
    assert_eq!(answer.header("retry-after"), Some("7"));
    assert_eq!(answer.json()["status"], 429, "the upstream's own body");
    let answer = get(&d, &format!("/v1/proxy/{a}/download/8192")).await;
    answer.assert_error(502, "upstream_too_large");

    // What the worker got, per class (credproxy's own errors included), and the failures.
    let requests = "credproxy_proxy_requests_total";
    let errors = "credproxy_proxy_upstream_errors_total";
    for (sample, want) in [
        (
            format!(r#"{requests}{{integration_type="lim",status_class="2xx"}}"#),
            2.0,
        ), // b, held
        (
            format!(r#"{requests}{{integration_type="lim",status_class="4xx"}}"#),
            2.0,
        ), // 413, 429
        (
            format!(r#"{requests}{{integration_type="lim",status_class="5xx"}}"#),
            2.0,
        ), // 503, 502
        (
            format!(r#"{errors}{{integration_type="slow",kind="timeout"}}"#),
            1.0,
        ),
        (
            format!(r#"{errors}{{integration_type="closed",kind="connect"}}"#),
            1.0,
        ),
        // A certificate refused is a `tls` error, not a `connect` one.
        (
            format!(r#"{errors}{{integration_type="untrusted",kind="tls"}}"#),
            1.0,
        ),
        ("credproxy_proxy_in_flight".to_owned(), 0.0),
    ] {
        assert_eq!(d.metric(&sample).await, want, "{sample}");
    }
    assert!(!d.logs().contains("CANARY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_added_by_reload_is_usable_at_once_and_removed_by_sighup() {
    let upstream = Upstream::start().await;
    let d = Daemon::start(|_, _| {}).await;
    let id = create_typed(
        &d,
        "Production",
        "later",
        json!({"access_token": "CANARY-later"}),
    )
    .await;
    let answer = get(&d, &format!("/v1/proxy/{id}/x")).await;
    answer.assert_error(422, "no_upstream");

    let ca = upstream.write_ca(d.dir.path());
    let edit = |entries| up::edit_config(&d, |c| set_upstreams(c, entries));
    edit(vec![entry(
        "later",
        &upstream.url("/api"),
        "bearer",
        Some(&ca),
        &[],
    )]);
    let (status, report) = d.call(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{report}");
    let answer = get(&d, &format!("/v1/proxy/{id}/x")).await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    assert_eq!(upstream.last().bearer().as_deref(), Some("CANARY-later"));

    edit(Vec::new());
    common::signal(d.pid(), libc::SIGHUP);
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        let answer = get(&d, &format!("/v1/proxy/{id}/x")).await;
        if answer.status == 422 {
            assert_eq!(answer.code(), "no_upstream");
            break;
        }
        assert_eq!(answer.status, 200, "{}", answer.describe());
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not remove the upstream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_upstream_refusing_every_token_costs_one_refresh_not_one_per_call() {
    let server = peers::oauth_server(3600).await;
    let upstream = Upstream::start().await;
    let d = Daemon::start(|c, dir| {
        one_upstream(c, dir, &upstream, "example-oauth", "bearer", &[]);
    })
    .await;
    let tokens = oauth_grant(&server, CLIENT_ID, CLIENT_SECRET, 3600).await;
    let body = oauth_credential(&server, "Production", &tokens, 3600);
    let (status, body) = d.call(Method::POST, "/v1/credentials", Some(body)).await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let token_requests = || async {
        oauth_stats(&server).await["token_requests"]
            .as_u64()
            .unwrap()
    };
    let before = token_requests().await;
    for _ in 0..4 {
        let answer = get(&d, &format!("/v1/proxy/{id}/always-401")).await;
        assert_eq!(answer.status, 401, "{}", answer.describe());
    }
    assert_eq!(
        token_requests().await,
        before + 1,
        "one refresh for four refusals"
    );
    // The first call and its retry, then one send each.
    assert_eq!(upstream.seen_count(), 5);
    // A path that takes the token still works, with the refreshed one.
    let answer = get(&d, &format!("/v1/proxy/{id}/fine")).await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    assert_ne!(upstream.last().bearer().as_deref(), Some(tokens.0.as_str()));
    assert_eq!(token_requests().await, before + 1);
}

#[tokio::test]
async fn answers_keep_the_secret_out_of_their_headers_and_bodiless_answers_pass() {
    let upstream = Upstream::start().await;
    let d = Daemon::start(|c, dir| {
        let ca = upstream.write_ca(dir);
        let url = upstream.url("/api");
        set(c, "proxy", "max_body_bytes", 4096_i64);
        let query = [("parameter", "key".into()), ("field", "api_key".into())];
        set_upstreams(
            c,
            vec![
                entry("maps", &url, "query", Some(&ca), &query),
                entry("files", &url, "bearer", Some(&ca), &[]),
            ],
        );
    })
    .await;
    let secret = "CANARY-maps&/=+";
    let maps = create_typed(&d, "Production", "maps", json!({"api_key": secret})).await;
    // A server adding a trailing slash quotes the query it got in `Location` (and `Link`).
    let answer = get(&d, &format!("/v1/proxy/{maps}/slash?address=x")).await;
    assert_eq!(answer.status, 301, "{}", answer.describe());
    let location = answer.header("location").unwrap().to_owned();
    assert!(location.contains("key=[REDACTED]"), "{location}");
    assert!(location.contains("address=x"), "{location}");
    assert!(!answer.contains(b"CANARY"), "{}", answer.describe());
    assert!(!answer.header("link").unwrap().contains("CANARY"));

    let files = create_typed(
        &d,
        "Production",
        "files",
        json!({"access_token": "CANARY-f"}),
    )
    .await;
    // HEAD of something larger than proxy.max_body_bytes: no body ever flows.
    let head = request(
        Via::Unix(&d.socket),
        Method::HEAD,
        &format!("/v1/proxy/{files}/download/1000000"),
        &[],
        Outgoing::None,
    )
    .await;
    assert_eq!(head.status, 200, "{}", head.describe());
    assert_eq!(head.header("content-length"), Some("1000000"));
    // An empty POST keeps its `Content-Length: 0` (servers answer 411 without one).
    let post = request(
        Via::Unix(&d.socket),
        Method::POST,
        &format!("/v1/proxy/{files}/empty"),
        &[("content-length", "0")],
        Outgoing::Bytes(Vec::new()),
    )
    .await;
    assert_eq!(post.status, 200, "{}", post.describe());
    assert_eq!(
        upstream.last().header("content-length").as_deref(),
        Some("0")
    );
    // Calls reuse a pooled connection (keep-alive) rather than open one each.
    let connections = upstream.connections();
    for _ in 0..5 {
        let answer = get(&d, &format!("/v1/proxy/{files}/again")).await;
        assert_eq!(answer.status, 200, "{}", answer.describe());
    }
    assert!(
        upstream.connections() <= connections + 1,
        "{} connections for 5 calls",
        upstream.connections() - connections
    );
    // An upstream's own 405 keeps its own `Allow`, and its 403 is no refusal of credproxy's.
    let denied = r"credproxy_access_denied_total";
    let before = d.metric(denied).await;
    let answer = get(&d, &format!("/v1/proxy/{files}/status/403")).await;
    assert_eq!(answer.status, 403, "{}", answer.describe());
    assert_eq!(d.metric(denied).await, before);
    let answer = get(&d, &format!("/v1/proxy/{files}/status/405")).await;
    assert_eq!(answer.status, 405, "{}", answer.describe());
    assert_eq!(answer.header("allow"), None, "the upstream sent none");
    assert!(!d.logs().contains("CANARY"));
}

#[tokio::test]
async fn a_worker_that_stops_reading_gives_its_slots_back_at_the_timeout() {
    use tokio::io::AsyncWriteExt;
    let upstream = Upstream::start().await;
    let d = Daemon::start(|c, dir| {
        set(c, "proxy", "max_concurrent_per_credential", 1_i64);
        let timeout = [("timeout", "5s".into())];
        one_upstream(c, dir, &upstream, "big", "bearer", &timeout);
    })
    .await;
    let id = create_typed(
        &d,
        "Production",
        "big",
        json!({"access_token": "CANARY-big"}),
    )
    .await;
    // Asks for 100 MB and reads none of it: the daemon's writes stall, and nothing polls the
    // answer's body any more.
    let mut stalled = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let head = format!("GET /v1/proxy/{id}/download/100000000 HTTP/1.1\r\nHost: l\r\n\r\n");
    stalled.write_all(head.as_bytes()).await.unwrap();
    let in_flight = "credproxy_proxy_in_flight";
    wait_for("the stalled call to hold its slot", || async {
        d.metric(in_flight).await == 1.0
    })
    .await;
    let busy = get(&d, &format!("/v1/proxy/{id}/x")).await;
    busy.assert_error(503, "overloaded");
    // Its upstream's `timeout` (5 s) frees the slot though the worker still holds the
    // connection open.
    wait_for("the slot to be given back", || async {
        d.metric(in_flight).await == 0.0
    })
    .await;
    let answer = get(&d, &format!("/v1/proxy/{id}/x")).await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let cut = r#"credproxy_proxy_upstream_errors_total{integration_type="big",kind="timeout"}"#;
    assert_eq!(d.metric(cut).await, 1.0);
    drop(stalled);
}

#[tokio::test]
async fn an_upstream_offering_http2_gets_http2_over_one_connection() {
    let upstream = Upstream::start_h2().await;
    let d = Daemon::start(|c, dir| {
        let header = [("header", "x-api-key".into()), ("field", "api_key".into())];
        one_upstream(c, dir, &upstream, "h2", "header", &header);
    })
    .await;
    let id = create_typed(&d, "Production", "h2", json!({"api_key": "CANARY-h2"})).await;
    // Once a connection is up, calls at once share it. (Before, concurrent calls each connect:
    // which protocol the upstream speaks is known only after the handshake.)
    let first = get(&d, &format!("/v1/proxy/{id}/items/first")).await;
    assert_eq!(first.status, 200, "{}", first.describe());
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let path = format!("/v1/proxy/{id}/items/{i}");
            let d = &d;
            async move { get(d, &path).await }
        })
        .collect();
    for answer in futures::future::join_all(calls).await {
        assert_eq!(answer.status, 200, "{}", answer.describe());
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 9);
    for s in &seen {
        assert_eq!(s.version, hyper::Version::HTTP_2);
        assert_eq!(s.header("x-api-key").as_deref(), Some("CANARY-h2"));
    }
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn a_host_label_from_the_credentials_metadata_picks_the_tenant() {
    let upstream = Upstream::start().await;
    let d = Daemon::start(|c, dir| {
        let ca = upstream.write_ca(dir);
        let base = format!("https://{{site}}.localhost:{}/api", upstream.port());
        set_upstreams(c, vec![entry("tenanted", &base, "bearer", Some(&ca), &[])]);
    })
    .await;
    let create = |site: Value| {
        let d = &d;
        async move {
            let (status, body) = d
                .call(
                    Method::POST,
                    "/v1/credentials",
                    Some(json!({
                        "environment": "Production",
                        "integration_type": "tenanted",
                        "metadata": {"site": site},
                        "secrets": {"access_token": "CANARY-tenant"},
                    })),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            body["id"].as_str().unwrap().to_owned()
        }
    };
    let acme = create(json!("Acme")).await;
    let answer = get(&d, &format!("/v1/proxy/{acme}/v1/items")).await;
    assert_eq!(answer.status, 200, "{}", answer.describe());
    let seen = upstream.last();
    let host = format!("acme.localhost:{}", upstream.port());
    assert_eq!(seen.header("host").as_deref(), Some(host.as_str()));
    assert_eq!(seen.bearer().as_deref(), Some("CANARY-tenant"));
    // A value that is not one DNS label never becomes part of a host.
    let before = upstream.seen_count();
    for site in [json!("evil.example"), json!("a/b"), json!(7), json!("")] {
        let id = create(site).await;
        get(&d, &format!("/v1/proxy/{id}/v1/items"))
            .await
            .assert_error(422, "upstream_unresolved");
    }
    assert_eq!(upstream.seen_count(), before);
    assert!(!d.logs().contains("CANARY-tenant"));
}

#[test]
fn check_config_refuses_plain_http_to_a_remote_host() {
    let dir = tempfile::tempdir().unwrap();
    let check = |base_url: &str| {
        let mut c = common::base_config(dir.path());
        set_upstreams(&mut c, vec![entry("x", base_url, "bearer", None, &[])]);
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml::to_string(&c).unwrap()).unwrap();
        common::run_cli(&["check-config", "--config", path.to_str().unwrap()])
    };
    let out = check("http://api.example.com/v2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("proxy.upstreams[0].base_url"), "{err}");
    for allowed in [
        "http://127.0.0.1:8080/v2",
        "http://localhost:8080",
        "https://api.example.com/v2",
    ] {
        let out = check(allowed);
        assert!(
            out.status.success(),
            "{allowed}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
