//! Store faults a real peer cannot be made to take on demand (hangs, outages), injected by
//! wrapping the real local store, with the daemon served in-process on a temporary socket.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use credproxy::backend::{
    Backend, BackendError, BackendInfo, ListRequest, Page, PutRequest, Versioned,
};
use credproxy::client::send;
use credproxy::config::Config;
use hyper::Method;
use serde_json::json;

const PASS: u8 = 0;
const DOWN: u8 = 1;
const HANG: u8 = 2;
const SLOW: u8 = 3;

struct Faulty {
    inner: Arc<dyn Backend>,
    mode: AtomicU8,
    gets: AtomicUsize,
}

impl Faulty {
    async fn fault(&self) -> Result<(), BackendError> {
        match self.mode.load(Ordering::SeqCst) {
            DOWN => Err(BackendError::Transient("injected outage".into())),
            HANG => std::future::pending().await,
            SLOW => {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Backend for Faulty {
    fn describe(&self) -> BackendInfo {
        self.inner.describe()
    }
    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, BackendError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.fault().await?;
        self.inner.get(name, version).await
    }
    async fn put(&self, request: PutRequest<'_>) -> Result<String, BackendError> {
        self.fault().await?;
        self.inner.put(request).await
    }
    async fn delete(&self, name: &str) -> Result<(), BackendError> {
        self.fault().await?;
        self.inner.delete(name).await
    }
    async fn list(&self, request: ListRequest) -> Result<Page, BackendError> {
        self.inner.list(request).await
    }
}

struct InProcess {
    socket: PathBuf,
    faulty: Arc<Faulty>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    async fn start(dir: &Path, edit: impl FnOnce(&mut toml::Table)) -> InProcess {
        let mut table = common::base_config(dir);
        edit(&mut table);
        let config = Config::parse(&toml::to_string(&table).unwrap()).unwrap();
        let socket = config.server.socket.clone();
        let mut parts = credproxy::daemon::build(config).await.unwrap();
        let faulty = Arc::new(Faulty {
            inner: Arc::clone(parts.registry.get("local").unwrap()),
            mode: AtomicU8::new(PASS),
            gets: AtomicUsize::new(0),
        });
        parts.registry.insert("local", faulty.clone());
        let keys = Arc::clone(&parts.keys);
        let listeners = credproxy::daemon::bind(&parts.config).await.unwrap();
        let app = credproxy::daemon::assemble(parts, unsafe { libc::getegid() }).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = socket.clone();
        let task = tokio::spawn(async move {
            credproxy::daemon::serve_app(app, listeners, keys, &path, async {
                let _ = stopped.await;
            })
            .await
        });
        InProcess {
            socket,
            faulty,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    fn set(&self, mode: u8) {
        self.faulty.mode.store(mode, Ordering::SeqCst);
    }

    async fn get(&self, id: &str) -> (u16, String, Option<String>, serde_json::Value) {
        let r = send(
            &self.socket,
            Method::GET,
            &format!("/v1/credentials/{id}"),
            &[],
            None,
        )
        .await
        .unwrap();
        let header = |h: &str| r.headers.get(h).map(|v| v.to_str().unwrap().to_owned());
        let body = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
        (
            r.status.as_u16(),
            header("cache-status").unwrap_or_default(),
            header("retry-after"),
            body,
        )
    }

    async fn create(&self, secrets: serde_json::Value) -> String {
        let body =
            json!({"environment": "Production", "integration_type": "t", "secrets": secrets});
        let r = send(
            &self.socket,
            Method::POST,
            "/v1/credentials",
            &[],
            Some(body.to_string().into_bytes()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 201);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_cold_reads_cost_one_store_read() {
    let dir = tempfile::tempdir().unwrap();
    let first = InProcess::start(dir.path(), |_| {}).await;
    let id = first.create(json!({"token": "cold"})).await;
    first.stop().await;

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
        common::set(c, "cache", "stale_if_error", "3s");
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
    let id = d.create(json!({"token": "t"})).await;
    // A metadata-only change invalidates the cache entry without touching the store.
    let r = send(
        &d.socket,
        Method::PATCH,
        &format!("/v1/credentials/{id}"),
        &[],
        Some(br#"{"metadata":{"x":1}}"#.to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
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
