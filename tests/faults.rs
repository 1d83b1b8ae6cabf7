//! Store faults a real peer cannot be made to take on demand (hangs, outages), injected by
//! wrapping the real local store, with the daemon served in-process on a temporary socket.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::inprocess::*;
use credproxy::client::send;
use credproxy::config::Config;
use credproxy::manager::{PutRequest, SecretsManager};
use hyper::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_cold_reads_cost_one_store_read() {
    let dir = tempfile::tempdir().unwrap();
    let id = created_in_an_earlier_run(dir.path(), json!({"token": "cold"})).await;

    // A fresh process has an empty cache; the store answers slowly so the reads overlap.
    let daemon = Arc::new(InProcess::start(dir.path(), |_| {}).await);
    daemon.set(SLOW);
    let reads: Vec<_> = (0..16)
        .map(|_| {
            let (d, id) = (Arc::clone(&daemon), id.clone());
            tokio::spawn(async move { d.get(&id).await })
        })
        .collect();
    for r in reads {
        let (status, _, _, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["secrets"]["token"], "cold");
    }
    assert_eq!(
        daemon.faulty.gets.load(Ordering::SeqCst),
        1,
        "one store read for 16 cold reads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_serves_stale_within_the_grace_then_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), |c| {
        common::set(c, "cache", "ttl", "1s");
        common::set(c, "cache", "stale_if_error", "8s");
    })
    .await;
    let id = d.create(json!({"token": "keep-serving"})).await;
    assert_eq!(d.get(&id).await.1, "hit");

    d.set(DOWN);
    let deadline = std::time::Instant::now() + common::DEADLINE;
    let stale = loop {
        let (status, cache, _, body) = d.get(&id).await;
        if cache == "stale" {
            break (status, body);
        }
        assert_eq!(status, 200, "before expiry the cached value is served");
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stale.0, 200);
    assert_eq!(stale.1["secrets"]["token"], "keep-serving");

    let (retry_after, body) = loop {
        let (status, _, retry, body) = d.get(&id).await;
        if status == 503 {
            break (retry, body);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stale value served past the grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(retry_after.is_some_and(|r| r.parse::<u64>().unwrap() >= 1));
    assert_eq!(body["error"]["code"], "store_unavailable");

    d.set(PASS);
    let (status, cache, _, body) = d.get(&id).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    assert_eq!(body["secrets"]["token"], "keep-serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_read_of_a_hanging_store_is_a_bounded_503() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), |c| {
        common::set(c, "backends", "timeout", "300ms")
    })
    .await;
    let id = d.create_cold(json!({"token": "t"})).await;
    d.set(HANG);
    let (status, _, retry_after, body) = d.get(&id).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable");
    assert!(retry_after.is_some());

    // A write against the hanging store fails cleanly and leaves nothing half-written.
    let r = send(
        &d.socket,
        Method::PATCH,
        &format!("/v1/credentials/{id}"),
        &[],
        Some(br#"{"secrets":{"token":"new"}}"#.to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 503);
    d.set(PASS);
    let (status, _, _, body) = d.get(&id).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["secrets"]["token"], "t",
        "the failed write changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_left_by_a_crash_are_removed_and_referenced_ones_kept() {
    use credproxy::manager::local::LocalManager;
    use credproxy::metadata::JournalEntry;
    use credproxy::secret::{SecretFields, SecretString};

    let dir = tempfile::tempdir().unwrap();
    let kept = created_in_an_earlier_run(dir.path(), json!({"token": "kept"})).await;

    // What a crash between "write the secret" and "record the credential" leaves behind: a
    // sealed copy nobody refers to, and its journal entry. Plus a stale entry that points at a
    // live credential's copy, which must survive.
    let config =
        Config::parse(&toml::to_string(&common::base_config(dir.path())).unwrap()).unwrap();
    let parts = credproxy::daemon::build(config).await.unwrap();
    let local = LocalManager::new(Arc::clone(&parts.keys), Arc::clone(&parts.metadata));
    let mut value = SecretFields::new();
    value.insert("token", SecretString::from("orphan"));
    local
        .put(PutRequest {
            name: "Production/ghost",
            value: &value,
            expected_version: None,
            idempotency_key: "g",
        })
        .await
        .unwrap();
    let long_ago = credproxy::time::now_unix() - 3600;
    for (credential, name) in [
        ("ghost", "Production/ghost".to_owned()),
        (kept.as_str(), format!("Production/{kept}")),
    ] {
        parts
            .metadata
            .journal_add(&JournalEntry {
                id: 0,
                kind: credproxy::metadata::JournalKind::Copy,
                credential_id: credential.into(),
                manager_id: "local".into(),
                name,
                created_at: long_ago,
            })
            .await
            .unwrap();
    }
    drop(parts);

    let d = InProcess::start(dir.path(), |_| {}).await;
    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        let r = send(
            &d.socket,
            Method::GET,
            "/v1/secretsmanagers/secrets?secretsmanager_id=local",
            &[],
            None,
        )
        .await
        .unwrap();
        let names: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
        if !names.iter().any(|n| n["name"] == "Production/ghost") {
            assert_eq!(names.len(), 1, "the referenced copy stays: {names:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "orphan never cleaned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, _, body) = d.get(&kept).await;
    assert_eq!(
        (status, body["secrets"]["token"].as_str()),
        (200, Some("kept"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let id = created_in_an_earlier_run(dir.path(), json!({"token": "in-flight"})).await;

    let mut d = InProcess::start(dir.path(), |_| {}).await;
    d.set(SLOW);
    let socket = d.socket.clone();
    let read = tokio::spawn(async move {
        send(
            &socket,
            Method::GET,
            &format!("/v1/credentials/{id}"),
            &[],
            None,
        )
        .await
    });
    let deadline = std::time::Instant::now() + common::DEADLINE;
    while d.faulty.gets.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the read never reached the store"
        );
        tokio::task::yield_now().await;
    }
    // The read is now inside the (slow) store call: stop the server under it.
    let _ = d.stop.take().unwrap().send(());
    let reply = read
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(reply.status, 200);
    d.task.take().unwrap().await.unwrap();
    assert!(!d.socket.exists(), "socket removed after the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_landed_but_was_never_recorded_does_not_wedge_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), |_| {}).await;
    let id = d.create(json!({"token": "v1"})).await;
    let patch = |token: &'static str| {
        let (socket, id) = (d.socket.clone(), id.clone());
        async move {
            let body = json!({"secrets": {"token": token}})
                .to_string()
                .into_bytes();
            send(
                &socket,
                Method::PATCH,
                &format!("/v1/credentials/{id}"),
                &[],
                Some(body),
            )
            .await
            .unwrap()
            .status
            .as_u16()
        }
    };
    d.set(LAND_THEN_FAIL);
    assert_eq!(
        patch("lost").await,
        503,
        "the caller is told the write failed"
    );
    d.set(PASS);
    assert_eq!(
        d.get(&id).await.3["secrets"]["token"],
        "v1",
        "the unrecorded version is not served"
    );
    assert_eq!(
        patch("v2").await,
        200,
        "the next write goes through instead of conflicting forever"
    );
    assert_eq!(d.get(&id).await.3["secrets"]["token"], "v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_503_request_timeout_and_its_audit_line() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.log");
    let d = InProcess::start(dir.path(), |c| {
        common::set(c, "server", "request_timeout", "500ms");
        common::set(c, "backends", "timeout", "60s");
        common::set(c, "log", "audit_file", audit.display().to_string());
        common::set(c, "log", "audit_flush_interval", "10ms");
    })
    .await;
    let id = d.create_cold(json!({"token": "t"})).await;
    d.set(HANG);
    let r = send(
        &d.socket,
        Method::GET,
        &format!("/v1/credentials/{id}"),
        &[],
        None,
    )
    .await
    .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (r.status.as_u16(), body["error"]["code"].as_str()),
        (503, Some("request_timeout"))
    );
    assert!(r.headers.contains_key("retry-after"));
    // The request that was cut is in the audit trail: who asked for which credential, and
    // that nothing was handed out.
    let want = format!("credential=\"{id}\" fields=- status=503");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let lines = std::fs::read_to_string(&audit).unwrap_or_default();
        if lines
            .lines()
            .any(|l| l.contains("route=\"credential_get\"") && l.contains(&want))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no audit line with {want}; the file holds:\n{lines}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_concurrency_limit_are_shed_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let d = InProcess::start(dir.path(), |c| {
        common::set(c, "server", "max_concurrent_requests", 2);
        common::set(c, "server", "request_timeout", "60s");
        common::set(c, "backends", "timeout", "60s");
        common::set(c, "metrics", "listen", metrics.clone());
    })
    .await;
    let id = d.create_cold(json!({"token": "t"})).await;
    d.set(HANG);
    // Two reads hold both permits while the store hangs.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (socket, id) = (d.socket.clone(), id.clone());
            tokio::spawn(async move {
                send(
                    &socket,
                    Method::GET,
                    &format!("/v1/credentials/{id}"),
                    &[],
                    None,
                )
                .await
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        let r = send(&d.socket, Method::GET, "/healthz", &[], None)
            .await
            .unwrap();
        if r.status == 503 {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(body["error"]["code"], "overloaded");
            assert!(r.headers.contains_key("retry-after"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the third request was never shed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counted apart from other 503s, by which limit shed it.
    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let shed: f64 = ["all", "caller"]
        .iter()
        .map(|scope| {
            let sample = format!("credproxy_requests_shed_total{{scope=\"{scope}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(sample.as_str())?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {sample} in {text}"))
        })
        .sum();
    assert!(shed >= 1.0, "{text}");
    for h in held {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let d = InProcess::start(dir.path(), |c| {
        common::set(c, "server", "header_read_timeout", "300ms")
    })
    .await;
    let mut stream = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    // The server closes the connection (hyper answers 408 or just closes): read sees EOF.
    tokio::time::timeout(common::DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("slowloris connection was never closed")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}
