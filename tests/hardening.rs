//! Hostile input through the real socket: each test here is a defect an attacker or an unlucky
//! caller found (issue #13), kept so it stays fixed. Values sent in these tests carry the word
//! CANARY; no answer and no log line may repeat one.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, DEADLINE};
use hyper::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `request` as raw bytes, shuts down the write side when `half_close`, and returns
/// everything the daemon answered before closing.
async fn raw(socket: &Path, request: &[u8], half_close: bool) -> String {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(request).await.unwrap();
    if half_close {
        s.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the daemon answers and closes")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn post(path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Reads of any secrets manager so far, whatever their outcome.
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

fn code(answer: &(u16, Value)) -> (u16, &str) {
    (answer.0, answer.1["error"]["code"].as_str().unwrap_or(""))
}

fn assert_no_canary(d: &Daemon, answers: &[String]) {
    for a in answers {
        assert!(!a.contains("CANARY"), "an answer quotes a value: {a}");
    }
    let logs = d.logs();
    assert!(!logs.contains("CANARY"), "the log quotes a value:\n{logs}");
}

#[tokio::test]
async fn half_closed_clients_get_their_answer() {
    let d = Daemon::start(|_, _| {}).await;
    let id = d.create("Production", json!({"k": "v"})).await;
    for _ in 0..20 {
        let health = raw(
            &d.socket,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
            true,
        )
        .await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health:?}");
        let read = raw(
            &d.socket,
            format!("GET /v1/credentials/{id} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
            true,
        )
        .await;
        assert!(
            read.starts_with("HTTP/1.1 200") && read.contains("\"k\""),
            "{read:?}"
        );
    }
    // A body sent in full before the half-close is read and answered too.
    let created = raw(
        &d.socket,
        &post(
            "/v1/credentials",
            "Content-Type: application/json\r\n",
            r#"{"environment":"P","integration_type":"x","secrets":{"a":"b"}}"#,
        ),
        true,
    )
    .await;
    assert!(created.starts_with("HTTP/1.1 201"), "{created:?}");
}

#[tokio::test]
async fn out_of_range_expiry_is_refused_and_a_stored_one_cannot_panic_a_read() {
    let d = Daemon::start(|_, _| {}).await;
    let id = d.create("Production", json!({"access_token": "t"})).await;
    let path = format!("/v1/credentials/{id}");
    for expires_at in [json!(253_402_300_800_i64), json!(i64::MAX), json!(-1)] {
        let answer = d
            .call(
                Method::PATCH,
                &path,
                Some(json!({"expires_at": expires_at})),
            )
            .await;
        assert_eq!(code(&answer), (400, "invalid_request"), "{}", answer.1);
    }
    let answer = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(json!({"environment": "P", "integration_type": "x",
                        "secrets": {"access_token": "a", "refresh_token": "r"},
                        "oauth": {"token_url": "https://idp.example/token", "client_id": "c",
                                  "expires_at": i64::MAX}})),
        )
        .await;
    assert_eq!(code(&answer), (400, "invalid_request"), "{}", answer.1);

    // A row written before the range was checked (or edited by hand) holds a year past 9999.
    let mut d = d;
    d.stop().await;
    let db = d.dir.path().join("data/credproxy.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let changed = conn
        .execute(
            "UPDATE credentials SET expires_at = ?1 WHERE id = ?2",
            rusqlite::params![i64::MAX, id],
        )
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let d = d.restart(|_| {}).await;
    for _ in 0..2 {
        let (status, body) = d.call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["expires_at"], "9999-12-31T23:59:59Z");
    }
    let logs = d
        .log_until("each read's audit line", |l| {
            l.matches("route=\"credential_get\"").count() >= 2
        })
        .await;
    assert!(!logs.contains("panic"), "{logs}");
}

#[tokio::test]
async fn a_caller_that_may_not_see_a_credential_cannot_tell_it_exists() {
    let (uid, _) = credproxy::sys::effective_ids();
    let rule = |environments: &[&str]| {
        let mut t = toml::Table::new();
        t.insert("uid".into(), (uid as i64).into());
        t.insert(
            "environments".into(),
            toml::Value::Array(environments.iter().map(|e| (*e).into()).collect()),
        );
        t.insert("write".into(), true.into());
        toml::Value::Array(vec![toml::Value::Table(t)])
    };
    let d = Daemon::start(|c, _| {
        c.insert("access".into(), rule(&["*"]));
    })
    .await;
    let production = d.create("Production", json!({"k": "CANARY-prod"})).await;
    let sandbox = d.create("Sandbox", json!({"k": "s"})).await;
    let mut d = d;
    d.stop().await;
    let d = d
        .restart(|c| {
            c.insert("access".into(), rule(&["Sandbox"]));
        })
        .await;
    let reads_before = store_reads(&d).await;
    let missing = "no-such-credential";
    for method in [Method::GET, Method::DELETE] {
        let existing = d
            .call(
                method.clone(),
                &format!("/v1/credentials/{production}"),
                None,
            )
            .await;
        let absent = d
            .call(method.clone(), &format!("/v1/credentials/{missing}"), None)
            .await;
        assert_eq!(
            code(&existing),
            (404, "not_found"),
            "{method} {}",
            existing.1
        );
        assert_eq!(existing, absent, "{method}: forbidden and missing differ");
    }
    let patch = |id: String| {
        let d = &d;
        async move {
            d.call(
                Method::PATCH,
                &format!("/v1/credentials/{id}"),
                Some(json!({"secrets": {"k": "x"}})),
            )
            .await
        }
    };
    assert_eq!(patch(production.clone()).await, patch(missing.into()).await);
    let refresh = |id: String| {
        let d = &d;
        async move {
            d.call(Method::POST, &format!("/v1/credentials/{id}/refresh"), None)
                .await
        }
    };
    assert_eq!(
        refresh(production.clone()).await,
        refresh(missing.into()).await
    );
    // Nothing was read from the store for a caller who may not see the credential.
    let reads_after = store_reads(&d).await;
    assert_eq!(reads_before, reads_after);
    // While a credential the caller may see is read from the store (the cache is cold after
    // the restart): the metric does count reads.
    let (status, _) = d
        .call(Method::GET, &format!("/v1/credentials/{sandbox}"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(store_reads(&d).await, reads_after + 1.0);
    assert!(!d.logs().contains("CANARY"));
}

#[tokio::test]
async fn error_details_name_keys_and_positions_never_values() {
    let d = Daemon::start(|_, _| {}).await;
    let mut answers = Vec::new();
    let bodies = [
        json!({"environment": "P", "integration_type": "x", "secrets": {"a": "b"},
               "metadata": {"n": 1}, "external_id": 7, "secrets_manager_id": "CANARY-pin"}),
        json!({"environment": "CANARY-not-a-name!", "integration_type": "x", "secrets": {"a": "b"}}),
        json!({"environment": "P", "integration_type": ["CANARY-in-list"], "secrets": {"a": "b"}}),
        json!({"environment": 5, "integration_type": "CANARY-type", "secrets": {"a": "b"}}),
        json!({"environment": "P", "integration_type": "x", "secrets": {"a": "b"},
               "oauth": {"token_url": "https://idp.example/t", "client_id": "c",
                         "client_auth": "CANARY-variant"}}),
        json!({"environment": "P", "integration_type": "x", "secrets": {"a": "b"},
               "oauth": {"token_url": "CANARY-url", "client_id": "c"}}),
        json!({"environment": "P", "integration_type": "x", "secrets": {"a": "b"},
               "secrets_manager_id": "CANARY-pin"}),
    ];
    for body in bodies {
        let (status, answer) = d.call(Method::POST, "/v1/credentials", Some(body)).await;
        assert_eq!(status, 400, "{answer}");
        answers.push(answer.to_string());
    }
    // serde's own message for a wrong type, now with the key's path and position instead.
    assert!(
        answers[3].contains("`environment`: invalid type: integer")
            && answers[3].contains("line 1 column"),
        "{}",
        answers[3]
    );
    assert!(answers[4].contains("`oauth.client_auth`"), "{}", answers[4]);
    let (status, answer) = d
        .call(
            Method::PUT,
            "/v1/routing",
            Some(json!({"default": "CANARY-manager"})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    answers.push(answer.to_string());

    // A TOML syntax error on a line holding an inline token: the reload names the place only.
    let config = std::fs::read_to_string(&d.config_path).unwrap();
    std::fs::write(
        &d.config_path,
        format!("{config}\n[oauth]\nclient_secret_hint = \"CANARY-inline-token\" oops\n"),
    )
    .unwrap();
    let (status, answer) = d.call(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 422, "{answer}");
    let detail = answer["error"]["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("line") && detail.contains("column"),
        "{detail}"
    );
    answers.push(answer.to_string());
    assert_no_canary(&d, &answers);
}

#[tokio::test]
async fn lenient_parsing_is_gone() {
    let d = Daemon::start(|_, _| {}).await;
    let id = d.create("Production", json!({"a": "1", "b": "2"})).await;
    let send = |headers: &'static str, body: String| {
        let d = &d;
        async move { raw(&d.socket, &post("/v1/credentials", headers, &body), false).await }
    };
    let json_ct = "Content-Type: application/json\r\n";
    let valid = r#"{"environment":"P","integration_type":"x","secrets":{"a":"b"}}"#.to_owned();
    let cases: Vec<(&'static str, String, &str)> = vec![
        (
            json_ct,
            r#"{"environment":"P","integration_type":"x","secrets":{"a":"CANARY-1","a":"CANARY-2"}}"#.into(),
            "HTTP/1.1 400",
        ),
        ("Content-Type: application/jsonfoo\r\n", valid.clone(), "HTTP/1.1 415"),
        ("Content-Type: application/json; charset=latin1\r\n", valid.clone(), "HTTP/1.1 415"),
        (
            "Content-Type: application/json\r\nContent-Type: text/plain\r\n",
            valid.clone(),
            "HTTP/1.1 400",
        ),
        (json_ct, r#"["P","x",null,null,{"a":"CANARY"}]"#.into(), "HTTP/1.1 400"),
        (
            json_ct,
            r#"{"environment":"P","integration_type":"x","secrets":{"":"CANARY"}}"#.into(),
            "HTTP/1.1 400",
        ),
        (
            json_ct,
            r#"{"environment":"P","integration_type":"x","secrets":{"a\nb":"CANARY"}}"#.into(),
            "HTTP/1.1 400",
        ),
        (
            json_ct,
            format!(
                r#"{{"environment":"P","integration_type":"x","secrets":{{"{}":"CANARY"}}}}"#,
                "n".repeat(10 * 1024)
            ),
            "HTTP/1.1 400",
        ),
        (json_ct, format!("{valid} {{}}"), "HTTP/1.1 400"),
        (
            json_ct,
            r#"{"environment":"P","integration_type":"x","secrets":{"a":"b"},"oauth":["https://idp.example/t","c"]}"#.into(),
            "HTTP/1.1 400",
        ),
    ];
    let mut answers = Vec::new();
    for (headers, body, expected) in cases {
        let answer = send(headers, body.clone()).await;
        assert!(answer.starts_with(expected), "{body:.80}: {answer}");
        answers.push(answer);
    }
    // The charset parameter may name UTF-8, and the media type is case-insensitive.
    let answer = send(
        "Content-Type: Application/JSON; charset=\"utf-8\"\r\n",
        valid,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");

    // A query parameter given twice is refused, not resolved by a guess.
    let (status, answer) = d
        .call(
            Method::GET,
            &format!("/v1/credentials/{id}?fields=a&fields=b"),
            None,
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    let (status, answer) = d
        .call(Method::GET, &format!("/v1/credentials/{id}?fields=b"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["secrets"], json!({"b": "2"}));
    assert_no_canary(&d, &answers);
}

#[tokio::test]
async fn a_credential_cannot_grow_past_its_limits() {
    let d = Daemon::start(|c, _| {
        common::set(
            c,
            "credentials",
            "max_secret_bytes",
            toml::Value::Integer(16 * 1024),
        );
        common::set(c, "credentials", "max_secret_fields", 8);
    })
    .await;
    let id = d.create("Production", json!({"f0": "x"})).await;
    let path = format!("/v1/credentials/{id}");
    let chunk = "y".repeat(6000);
    let mut refused = None;
    for i in 1..10 {
        let (status, body) = d
            .call(
                Method::PATCH,
                &path,
                Some(json!({"secrets": {format!("f{i}"): chunk}})),
            )
            .await;
        if status != 200 {
            refused = Some((i, status, body));
            break;
        }
    }
    let (at, status, body) = refused.expect("growth is stopped");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("credential_too_large")),
        "{body}"
    );
    assert_eq!(
        at, 3,
        "two 6000-byte fields fit in 16 KiB, a third does not"
    );
    // What was stored before stays whole and readable.
    let (status, body) = d.call(Method::GET, &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["secrets"].as_object().unwrap().len(), 3);

    let many: serde_json::Map<String, Value> =
        (0..9).map(|i| (format!("k{i}"), json!("v"))).collect();
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(json!({"environment": "P", "integration_type": "x", "secrets": many})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("credential_too_large"))
    );
}

#[tokio::test]
async fn metadata_keys_that_name_secrets_are_refused() {
    let d = Daemon::start(|_, _| {}).await;
    for (metadata, key) in [
        (json!({"api_key": "CANARY"}), "metadata.api_key"),
        (
            json!({"hubspot": {"refreshToken": "CANARY"}}),
            "metadata.hubspot.refreshToken",
        ),
        (
            json!({"list": [{"Client-Secret": "CANARY"}]}),
            "metadata.list.Client-Secret",
        ),
    ] {
        let (status, body) = d
            .call(
                Method::POST,
                "/v1/credentials",
                Some(json!({"environment": "P", "integration_type": "x",
                            "secrets": {"a": "b"}, "metadata": metadata})),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        let detail = body["error"]["detail"].as_str().unwrap();
        assert!(
            detail.contains(key) && detail.contains("`secrets`"),
            "{detail}"
        );
        assert!(!detail.contains("CANARY"));
    }
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(
                json!({"environment": "P", "integration_type": "x", "secrets": {"a": "b"},
                        "metadata": {"portal_id": 42, "monkey": "ok", "key_id": "k1"}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // The list is configurable: emptied, nothing is refused.
    let mut d = d;
    d.stop().await;
    let d = d
        .restart(|c| {
            common::set(
                c,
                "credentials",
                "sensitive_metadata_keys",
                toml::Value::Array(vec![]),
            )
        })
        .await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/credentials",
            Some(
                json!({"environment": "P", "integration_type": "x", "secrets": {"a": "b"},
                        "metadata": {"token_hint": "x"}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// A caller trickling bodies over many connections holds at most its own share of the request
/// limit; everybody else is still served, and a trickled body is cut off at the body-read
/// timeout, not the request timeout.
#[tokio::test]
async fn one_noisy_caller_cannot_starve_the_rest() {
    let port = common::free_port();
    let d = Daemon::start(|c, dir| {
        let token = dir.join("tcp.token");
        std::fs::write(&token, "tcp-token\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut tcp = toml::Table::new();
        tcp.insert("listen".into(), format!("127.0.0.1:{port}").into());
        tcp.insert("token_file".into(), token.display().to_string().into());
        common::set(c, "server", "tcp", tcp);
        common::set(c, "server", "max_concurrent_requests", 8);
        common::set(c, "server", "max_requests_per_caller", 4);
        common::set(c, "server", "request_timeout", "60s");
        common::set(c, "server", "body_read_timeout", "10s");
    })
    .await;
    let id = d.create("Production", json!({"k": "v"})).await;
    // Eight slow bodies from this uid: a request line and headers promising 100 bytes, then
    // nothing.
    let mut hogs = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
        s.write_all(
            b"POST /v1/credentials HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
        hogs.push(s);
    }
    let started = Instant::now();
    let (answers, mut answered) = tokio::sync::mpsc::unbounded_channel();
    for mut s in hogs {
        let answers = answers.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            let _ = answers.send(String::from_utf8_lossy(&out).into_owned());
        });
    }
    let (mut shed, mut timed_out) = (0, 0);
    while shed + timed_out < 8 {
        let out = tokio::time::timeout(DEADLINE, answered.recv())
            .await
            .expect("every slow body is answered")
            .unwrap();
        if out.starts_with("HTTP/1.1 503") && out.contains("max_requests_per_caller") {
            shed += 1;
        } else if out.starts_with("HTTP/1.1 408") && out.contains("body_timeout") {
            timed_out += 1;
        } else {
            panic!("unexpected answer to a slow body: {out}");
        }
        if shed == 4 && timed_out == 0 {
            // The caller's four admitted requests still hold their slots; another caller (the
            // TCP listener) is served meanwhile.
            let mut t = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            t.write_all(
                format!("GET /v1/credentials/{id} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Credproxy-Token: tcp-token\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut answer = String::new();
            t.read_to_string(&mut answer).await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
    }
    assert_eq!((shed, timed_out), (4, 4));
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "trickled bodies end at the 10 s body-read timeout, not the 60 s request timeout"
    );
}

/// Out of file descriptors: the accept loop backs off and logs a line per 10 s, not one per
/// 50 ms, and clients are served again as soon as descriptors are free.
#[tokio::test]
async fn running_out_of_descriptors_is_logged_sparingly_and_recovered_from() {
    let d = Daemon::start(|_, _| {}).await;
    let limit = d.pid().to_string();
    let set = std::process::Command::new("prlimit")
        .args(["--pid", &limit, "--nofile=64:64"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(set.success());
    // Idle connections until the daemon cannot accept any more.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(tokio::net::UnixStream::connect(&d.socket).await.unwrap());
    }
    let started = Instant::now();
    while !d.logs().contains("accepting a connection failed") {
        assert!(
            started.elapsed() < DEADLINE,
            "no accept failure:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = d.logs().matches("accepting a connection failed").count();
    assert!(lines <= 2, "{lines} lines in two seconds:\n{}", d.logs());
    drop(held);
    // Served again once descriptors are free (the back-off is at most a second).
    let started = Instant::now();
    loop {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            raw(
                &d.socket,
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                false,
            ),
        )
        .await;
        if answer.is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "not served again:\n{}",
            d.logs()
        );
    }
}
