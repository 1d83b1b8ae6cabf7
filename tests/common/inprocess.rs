//! A daemon served in-process on a temporary socket, with its local store wrapped in `Faulty`
//! so tests can inject faults a real peer cannot be made to take on demand (hangs, outages,
//! writes that land but report failure, a store that turns read-only).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::contract::send;
use async_trait::async_trait;
use credproxy::config::Config;
use credproxy::manager::{
    ListRequest, ManagerError, ManagerInfo, Page, PutRequest, SecretsManager, Versioned,
};
use hyper::Method;
use serde_json::json;

pub const PASS: u8 = 0;
pub const DOWN: u8 = 1;
pub const HANG: u8 = 2;
pub const SLOW: u8 = 3;
/// Writes land in the store, then the call reports a failure (a timeout after the fact).
pub const LAND_THEN_FAIL: u8 = 4;
/// Reads work, writes and deletes fail.
pub const WRITES_DOWN: u8 = 5;

pub struct Faulty {
    pub inner: Arc<dyn SecretsManager>,
    pub mode: AtomicU8,
    pub gets: AtomicUsize,
    /// Reports the store as read-only (as Composio is).
    pub read_only: AtomicBool,
}

impl Faulty {
    async fn fault(&self) -> Result<(), ManagerError> {
        match self.mode.load(Ordering::SeqCst) {
            DOWN => Err(ManagerError::Transient("injected outage".into())),
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
impl SecretsManager for Faulty {
    fn describe(&self) -> ManagerInfo {
        let mut info = self.inner.describe();
        info.capabilities.read_only |= self.read_only.load(Ordering::SeqCst);
        info
    }
    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.fault().await?;
        self.inner.get(name, version).await
    }
    async fn put(&self, request: PutRequest<'_>) -> Result<String, ManagerError> {
        match self.mode.load(Ordering::SeqCst) {
            LAND_THEN_FAIL => {
                self.inner.put(request).await?;
                return Err(ManagerError::Timeout);
            }
            WRITES_DOWN => return Err(ManagerError::Transient("injected write outage".into())),
            _ => {}
        }
        self.fault().await?;
        self.inner.put(request).await
    }
    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        if self.mode.load(Ordering::SeqCst) == WRITES_DOWN {
            return Err(ManagerError::Transient("injected write outage".into()));
        }
        self.fault().await?;
        self.inner.delete(name).await
    }
    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        self.inner.list(request).await
    }
}

pub struct InProcess {
    pub socket: PathBuf,
    pub faulty: Arc<Faulty>,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    pub async fn start(dir: &Path, edit: impl FnOnce(&mut toml::Table)) -> InProcess {
        let mut table = super::base_config(dir);
        edit(&mut table);
        let config = Config::parse(&toml::to_string(&table).unwrap()).unwrap();
        let socket = config.server.socket.clone();
        let mut parts = credproxy::daemon::build(config).await.unwrap();
        let faulty = Arc::new(Faulty {
            inner: Arc::clone(parts.registry.get("local").unwrap()),
            mode: AtomicU8::new(PASS),
            gets: AtomicUsize::new(0),
            read_only: AtomicBool::new(false),
        });
        parts.registry.insert("local", faulty.clone());
        let keys = Arc::clone(&parts.keys);
        let listeners = credproxy::daemon::bind(&parts.config).await.unwrap();
        let app = credproxy::daemon::assemble(parts, credproxy::sys::effective_ids().1).unwrap();
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

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
    }

    pub fn set(&self, mode: u8) {
        self.faulty.mode.store(mode, Ordering::SeqCst);
    }

    pub async fn get(&self, id: &str) -> (u16, String, Option<String>, serde_json::Value) {
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

    pub async fn create(&self, secrets: serde_json::Value) -> String {
        self.create_json(
            json!({"environment": "Production", "integration_type": "t", "secrets": secrets}),
        )
        .await
    }

    /// `POST /v1/credentials` with this body; returns the new id.
    pub async fn create_json(&self, body: serde_json::Value) -> String {
        let r = send(
            &self.socket,
            Method::POST,
            "/v1/credentials",
            &[],
            Some(body.to_string().into_bytes()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// A bodiless POST.
    pub async fn post(&self, path: &str) -> (u16, serde_json::Value) {
        let r = send(&self.socket, Method::POST, path, &[], None)
            .await
            .unwrap();
        (
            r.status.as_u16(),
            serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
        )
    }
}

impl InProcess {
    /// Creates a credential, then drops it from the cache with a metadata-only change (which
    /// does not touch the store), so the next read goes to the store.
    pub async fn create_cold(&self, secrets: serde_json::Value) -> String {
        let id = self.create(secrets).await;
        let r = send(
            &self.socket,
            Method::PATCH,
            &format!("/v1/credentials/{id}"),
            &[],
            Some(br#"{"metadata":{}}"#.to_vec()),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        id
    }
}

/// Stores a credential with a daemon that then stops, so the next one starts with a cold cache.
pub async fn created_in_an_earlier_run(dir: &Path, secrets: serde_json::Value) -> String {
    let earlier = InProcess::start(dir, |_| {}).await;
    let id = earlier.create(secrets).await;
    earlier.stop().await;
    id
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
