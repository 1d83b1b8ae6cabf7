//! Micro-benchmarks of the read path's pieces: a cache hit (with and without its body), and a
//! cold read from the local encrypted store (SQLite + AES-GCM open). `cargo bench`.

use std::sync::Arc;
use std::time::Duration;

use credproxy::cache::{view, Cache, LoadFailure, Loaded};
use credproxy::manager::local::{Keyring, LocalManager, MasterKey};
use credproxy::manager::{PutRequest, SecretsManager};
use credproxy::metadata::sqlite::SqliteMetadata;
use credproxy::metadata::{CredentialRecord, Location};
use credproxy::secret::{SecretFields, SecretString};
use criterion::{criterion_group, criterion_main, Criterion};

#[derive(Clone, Debug)]
struct Never;

impl LoadFailure for Never {
    fn allows_stale(&self) -> bool {
        false
    }
}

fn fields() -> SecretFields {
    let mut f = SecretFields::new();
    f.insert(
        "access_token",
        SecretString::from("gho_0123456789abcdef0123456789abcdef0123"),
    );
    f.insert(
        "refresh_token",
        SecretString::from("ghr_0123456789abcdef0123456789abcdef0123"),
    );
    f
}

fn loaded() -> Loaded {
    Loaded {
        record: Arc::new(CredentialRecord {
            id: "c".into(),
            workspace: "default".into(),
            environment: "Production".into(),
            integration_type: "github".into(),
            metadata: Default::default(),
            oauth: None,
            pinned_manager: None,
            location: Location {
                manager_id: "local".into(),
                name: "Production/c".into(),
                version: Some("1".into()),
            },
            expires_at_ms: None,
            token_at_ms: None,
            needs_reauth: false,
            row_version: 1,
            created_at: 0,
            updated_at: 0,
        }),
        secrets: fields(),
        valid_until: None,
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let cache: Cache<Never> = Cache::new(
        Duration::from_secs(3600),
        10_000,
        Duration::from_secs(60),
        None,
    );
    rt.block_on(cache.get_or_load("c", || async { Ok(loaded()) }))
        .unwrap();
    c.bench_function("cache_hit", |b| {
        b.to_async(&rt).iter(|| async {
            let (entry, _) = cache
                .get_or_load("c", || async { Ok(loaded()) })
                .await
                .unwrap();
            std::hint::black_box(entry);
        })
    });

    c.bench_function("cache_hit_body", |b| {
        b.to_async(&rt).iter(|| async {
            let (entry, _) = cache
                .get_or_load("c", || async { Ok(loaded()) })
                .await
                .unwrap();
            std::hint::black_box(view::body(&entry, None, false));
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteMetadata::open(&dir.path().join("bench.db")).unwrap());
    let local = LocalManager::new(Arc::new(Keyring::new(MasterKey::generate(), vec![])), store);
    let value = fields();
    rt.block_on(local.put(PutRequest {
        name: "Production/c",
        value: &value,
        expected_version: None,
        idempotency_key: "k",
    }))
    .unwrap();
    c.bench_function("local_store_cold_read", |b| {
        b.to_async(&rt).iter(|| async {
            std::hint::black_box(local.get("Production/c", Some("1")).await.unwrap());
        })
    });
}

criterion_group!(credproxy_benches, benches);
criterion_main!(credproxy_benches);
