//! Fleet mode: the metadata store on a real PostgreSQL (Debian's server, started per test on
//! a free port), the same store suite as SQLite, and several daemons sharing one database.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::{self, vault_manager};
use common::{fast_refresh, set, Daemon, DEADLINE};
use credproxy::metadata::postgres::PostgresMetadata;
use credproxy::metadata::sqlite::SqliteMetadata;
use credproxy::metadata::{
    CredentialRecord, Delivery, EventKind, EventRecord, Invalidation, JournalEntry, JournalKind,
    Location, ManagerRecord, ManagerSource, ManagerState, Metadata, MetadataError, PurgeEntry,
    RoutingRecord, SealedRecord,
};
use hyper::Method;
use serde_json::json;

fn record(id: &str, expires_at_ms: Option<i64>) -> CredentialRecord {
    CredentialRecord {
        id: id.into(),
        workspace: "default".into(),
        environment: "Production".into(),
        integration_type: "github".into(),
        metadata: serde_json::Map::from_iter([("team".to_owned(), json!("core"))]),
        oauth: expires_at_ms.map(|_| credproxy::metadata::OAuthDescription {
            token_url: "https://t.example/token".into(),
            client_id: "c".into(),
            scopes: vec!["a".into()],
            client_auth: Default::default(),
            grant: Default::default(),
            audience: None,
            resource: None,
        }),
        pinned_manager: None,
        location: Location {
            manager_id: "local".into(),
            name: format!("Production/{id}"),
            version: Some("1".into()),
        },
        expires_at_ms,
        token_at_ms: None,
        needs_reauth: false,
        row_version: 1,
        created_at: 10,
        updated_at: 10,
    }
}

fn copy(id: &str, store: &str) -> JournalEntry {
    JournalEntry {
        id: 0,
        kind: JournalKind::Copy,
        credential_id: id.into(),
        manager_id: store.into(),
        name: format!("n/{id}"),
        created_at: 1,
    }
}

fn sealed(name: &str, version: i64) -> SealedRecord {
    SealedRecord {
        name: name.into(),
        version,
        key_id: "k1".into(),
        wrapped_key: vec![1, 2, 3],
        ciphertext: vec![version as u8; 8],
        created_at: version,
    }
}

/// An API-defined manager whose sealed auth holds every byte value, to show it is stored as
/// bytes and nothing else.
fn manager(id: &str, workspace: &str) -> ManagerRecord {
    ManagerRecord {
        id: id.into(),
        workspace: workspace.into(),
        name: format!("{id} vault"),
        kind: "hashicorp".into(),
        prefix: "credproxy/".into(),
        settings: serde_json::Map::from_iter([
            ("address".to_owned(), json!("https://vault.example")),
            ("timeout_secs".to_owned(), json!(5)),
            (
                "tls".to_owned(),
                json!({"verify": true, "roots": ["a", "b"]}),
            ),
        ]),
        auth_keys: vec!["role_id".into(), "secret_id".into()],
        auth: Some(SealedRecord {
            name: id.into(),
            version: 1,
            key_id: "k1".into(),
            wrapped_key: (0..=255).collect(),
            ciphertext: (0..=255).rev().chain([0, 0]).collect(),
            created_at: 7,
        }),
        source: ManagerSource::Api,
        state: ManagerState::Active,
        row_version: 1,
        created_at: 5,
        updated_at: 5,
    }
}

fn routing(workspace: &str, default: Option<&str>, environments: &[(&str, &str)]) -> RoutingRecord {
    RoutingRecord {
        workspace: workspace.into(),
        default: default.map(Into::into),
        environments: environments
            .iter()
            .map(|(e, m)| (e.to_string(), m.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// The control version, asserted to have moved past `last` (a change) or not (a read).
async fn control_version_after(store: &Arc<dyn Metadata>, last: &mut i64, changed: bool) {
    let now = store.control_version().await.unwrap();
    if changed {
        assert!(
            now > *last,
            "a change bumps the control version: {now} after {last}"
        );
    } else {
        assert_eq!(now, *last, "reads and failed writes leave it alone");
    }
    *last = now;
}

/// The control plane's rows: managers, routing and the control version. `other` reads what
/// `store` wrote, as another instance would.
async fn control_suite(store: &Arc<dyn Metadata>, other: &Arc<dyn Metadata>) {
    let mut v = store.control_version().await.unwrap();
    assert!(store.managers().await.unwrap().is_empty());
    assert!(store.routing_all().await.unwrap().is_empty());
    control_version_after(other, &mut v, false).await;
    // Insert, get, list in id order; the sealed auth comes back byte for byte.
    store
        .manager_insert(&manager("m2", "team-a"))
        .await
        .unwrap();
    control_version_after(other, &mut v, true).await;
    let mut from_file = manager("m1", "default");
    (from_file.auth, from_file.auth_keys) = (None, Vec::new());
    (from_file.source, from_file.settings) = (ManagerSource::File, Default::default());
    store.manager_insert(&from_file).await.unwrap();
    control_version_after(other, &mut v, true).await;
    assert_eq!(
        other.manager_get("m2").await.unwrap().unwrap(),
        manager("m2", "team-a")
    );
    assert_eq!(other.manager_get("m1").await.unwrap().unwrap(), from_file);
    assert!(other.manager_get("m3").await.unwrap().is_none());
    assert_eq!(
        other.managers().await.unwrap(),
        [from_file.clone(), manager("m2", "team-a")]
    );
    assert!(matches!(
        other.manager_insert(&manager("m2", "elsewhere")).await,
        Err(MetadataError::AlreadyExists)
    ));
    control_version_after(other, &mut v, false).await;
    // Update is compare-and-swap on row_version; a row that is gone is a conflict too.
    let mut m2 = manager("m2", "team-a");
    m2.row_version = 2;
    m2.updated_at = 6;
    m2.settings.insert("namespace".into(), json!("ops"));
    m2.auth_keys.push("ca_pem".into());
    let auth = m2.auth.as_mut().unwrap();
    (auth.version, auth.ciphertext) = (2, vec![9; 300]);
    store.manager_update(&m2, 1).await.unwrap();
    control_version_after(other, &mut v, true).await;
    assert!(matches!(
        other.manager_update(&m2, 1).await,
        Err(MetadataError::Conflict)
    ));
    assert!(matches!(
        other.manager_update(&manager("m3", "team-a"), 1).await,
        Err(MetadataError::Conflict)
    ));
    control_version_after(other, &mut v, false).await;
    assert_eq!(other.manager_get("m2").await.unwrap().unwrap(), m2);
    // Routing: put per workspace, listed in workspace order, replaced whole.
    let routes = [
        routing("default", Some("m2"), &[("Production", "m1")]),
        routing(
            "team-a",
            Some("m2"),
            &[("Production", "m2"), ("Staging", "m1")],
        ),
        routing(
            "team-b",
            None,
            &[("Staging", "local"), ("Production", "m2")],
        ),
    ];
    for r in routes.iter().rev() {
        store.routing_put(r).await.unwrap();
        control_version_after(other, &mut v, true).await;
    }
    assert_eq!(other.routing_all().await.unwrap(), routes);
    control_version_after(other, &mut v, false).await;
    let team_b = routing("team-b", Some("local"), &[("Production", "m2")]);
    store.routing_put(&team_b).await.unwrap();
    control_version_after(other, &mut v, true).await;
    assert_eq!(other.routing_all().await.unwrap()[2], team_b);
    // Retire: a stale retire changes nothing, routing included ...
    let mut retiring = m2.clone();
    (retiring.state, retiring.row_version) = (ManagerState::Retiring, 3);
    assert!(matches!(
        store.manager_retire(&retiring, 1).await,
        Err(MetadataError::Conflict)
    ));
    control_version_after(other, &mut v, false).await;
    assert_eq!(other.manager_get("m2").await.unwrap().unwrap(), m2);
    assert_eq!(other.routing_all().await.unwrap()[2], team_b);
    // ... a current one changes the state and drops every route naming it, everywhere.
    store.manager_retire(&retiring, 2).await.unwrap();
    control_version_after(other, &mut v, true).await;
    assert_eq!(other.manager_get("m2").await.unwrap().unwrap(), retiring);
    assert_eq!(
        other.routing_all().await.unwrap(),
        [
            routing("default", None, &[("Production", "m1")]),
            routing("team-a", None, &[("Staging", "m1")]),
            routing("team-b", Some("local"), &[]),
        ]
    );
    // An empty record removes the workspace's routing.
    store
        .routing_put(&routing("team-a", None, &[]))
        .await
        .unwrap();
    control_version_after(other, &mut v, true).await;
    let left: Vec<String> = other
        .routing_all()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.workspace)
        .collect();
    assert_eq!(left, ["default", "team-b"]);
    // An environment named like the default's storage is refused, not stored as the default.
    assert!(store
        .routing_put(&routing("team-c", None, &[("", "m1")]))
        .await
        .is_err());
    control_version_after(other, &mut v, false).await;
    // Delete; deleting what is not there succeeds (and changes nothing).
    store.manager_delete("m2").await.unwrap();
    control_version_after(other, &mut v, true).await;
    assert!(other.manager_get("m2").await.unwrap().is_none());
    other.manager_delete("m2").await.unwrap();
    control_version_after(other, &mut v, false).await;
    assert_eq!(other.managers().await.unwrap(), [from_file]);
}

/// What every metadata store must do. `other` is a second handle on the same database, as
/// another process would hold.
async fn store_suite(store: Arc<dyn Metadata>, other: Arc<dyn Metadata>) {
    store.ping().await.unwrap();
    // Credentials: create (settling its journal entry), read, compare-and-swap, delete.
    let j = store.journal_add(&copy("a", "local")).await.unwrap();
    store
        .create_credential(&record("a", None), j)
        .await
        .unwrap();
    assert!(store.journal_list().await.unwrap().is_empty());
    assert!(matches!(
        store.create_credential(&record("a", None), 0).await,
        Err(MetadataError::AlreadyExists)
    ));
    assert_eq!(
        other.get_credential("a").await.unwrap().unwrap(),
        record("a", None)
    );
    let mut next = record("a", None);
    next.row_version = 2;
    next.location.manager_id = "vault".into();
    let abandoned = store
        .update_credential(&next, 1, Some(&copy("a", "local")), None)
        .await
        .unwrap();
    assert!(abandoned.is_some());
    assert!(matches!(
        other.update_credential(&next, 1, None, None).await,
        Err(MetadataError::Conflict)
    ));
    assert!(store
        .location_in_use("vault", "Production/a")
        .await
        .unwrap());
    assert!(!store
        .location_in_use("local", "Production/a")
        .await
        .unwrap());
    assert!(store.manager_in_use("vault").await.unwrap());
    assert!(
        store.manager_in_use("local").await.unwrap(),
        "journal refers to it"
    );
    for e in store.journal_list().await.unwrap() {
        store.journal_remove(e.id).await.unwrap();
    }
    assert!(!store.manager_in_use("local").await.unwrap());
    // Listing in id order, paged.
    for id in ["b", "c", "d"] {
        store
            .create_credential(&record(id, Some(100_250)), 0)
            .await
            .unwrap();
    }
    assert_eq!(store.count_credentials().await.unwrap(), 4);
    let page: Vec<String> = store
        .list_credentials(Some("a"), 2)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(page, ["b", "c"]);
    // Expiry to the millisecond (schema version 6), the whole seconds beside it.
    assert_eq!(
        store
            .get_credential("b")
            .await
            .unwrap()
            .unwrap()
            .expires_at_ms,
        Some(100_250)
    );
    // OAuth due list and re-authorisation count.
    let start = (i64::MIN, "");
    assert_eq!(store.oauth_due(100, start, 10).await.unwrap().len(), 3);
    assert!(store.oauth_due(99, start, 10).await.unwrap().is_empty());
    // Paged along the expiry index, after the last row's (expires_at, id), so the background
    // pass reads every due row.
    let ids =
        |rows: Vec<CredentialRecord>| -> Vec<String> { rows.into_iter().map(|r| r.id).collect() };
    let first = ids(store.oauth_due(100, start, 2).await.unwrap());
    let rest = ids(store.oauth_due(100, (100, &first[1]), 2).await.unwrap());
    assert_eq!((first.len(), rest.len()), (2, 1), "{first:?} then {rest:?}");
    assert!(
        first[0] < first[1] && first[1] < rest[0],
        "{first:?} then {rest:?}"
    );
    let after_all = store.oauth_due(100, (100, &rest[0]), 2).await.unwrap();
    assert!(after_all.is_empty());
    let mut reauth = record("b", Some(100_250));
    reauth.needs_reauth = true;
    reauth.row_version = 2;
    store
        .update_credential(&reauth, 1, None, None)
        .await
        .unwrap();
    assert_eq!(store.count_needs_reauth().await.unwrap(), 1);
    assert_eq!(store.oauth_due(100, start, 10).await.unwrap().len(), 2);
    // Delete journals the copy and drops a pending token answer, atomically.
    store
        .pending_token_put("c", &sealed("oauth-pending:c", 1))
        .await
        .unwrap();
    assert_eq!(
        other.pending_token_get("c").await.unwrap().unwrap().version,
        1
    );
    store
        .pending_token_put("c", &sealed("oauth-pending:c", 2))
        .await
        .unwrap();
    assert_eq!(
        store.pending_token_get("c").await.unwrap().unwrap().version,
        2
    );
    assert!(matches!(
        store.delete_credential("c", 7, &copy("c", "local")).await,
        Err(MetadataError::Conflict)
    ));
    store
        .delete_credential("c", 1, &copy("c", "local"))
        .await
        .unwrap();
    assert!(store.get_credential("c").await.unwrap().is_none());
    assert!(store.pending_token_get("c").await.unwrap().is_none());
    assert_eq!(store.journal_list().await.unwrap().len(), 1);
    // Credentials per recorded manager: a moved to vault; b and d in local.
    assert_eq!(
        other.count_by_manager().await.unwrap(),
        HashMap::from([("vault".to_owned(), 1), ("local".to_owned(), 2)])
    );
    // The workspace is stored, read back and replaced like every other column.
    let mut tenant = record("w", None);
    tenant.workspace = "team-a".into();
    store.create_credential(&tenant, 0).await.unwrap();
    assert_eq!(other.get_credential("w").await.unwrap().unwrap(), tenant);
    tenant.workspace = "team-b".into();
    tenant.row_version = 2;
    store
        .update_credential(&tenant, 1, None, None)
        .await
        .unwrap();
    assert_eq!(other.get_credential("w").await.unwrap().unwrap(), tenant);
    assert_eq!(
        other.get_credential("a").await.unwrap().unwrap().workspace,
        "default"
    );
    // Leases: one holder at a time across handles; expiry hands it over.
    let long = Duration::from_secs(30);
    assert!(store.lease_acquire("l", "p1", long).await.unwrap());
    assert!(!other.lease_acquire("l", "p2", long).await.unwrap());
    assert!(
        store.lease_acquire("l", "p1", long).await.unwrap(),
        "renewal"
    );
    other.lease_release("l", "p2").await.unwrap();
    assert!(!other.lease_acquire("l", "p2", long).await.unwrap());
    store.lease_release("l", "p1").await.unwrap();
    assert!(other
        .lease_acquire("l", "p2", Duration::ZERO)
        .await
        .unwrap());
    assert!(
        store.lease_acquire("l", "p1", long).await.unwrap(),
        "expired lease taken over"
    );
    // Sealed rows of the local store.
    store.sealed_insert(&sealed("s/x", 1)).await.unwrap();
    assert!(matches!(
        other.sealed_insert(&sealed("s/x", 1)).await,
        Err(MetadataError::AlreadyExists)
    ));
    store.sealed_insert(&sealed("s/x", 2)).await.unwrap();
    store.sealed_insert(&sealed("s/y_z", 1)).await.unwrap();
    assert_eq!(
        store.sealed_latest("s/x").await.unwrap().unwrap().version,
        2
    );
    assert_eq!(
        store.sealed_get("s/x", 1).await.unwrap().unwrap(),
        sealed("s/x", 1)
    );
    store.sealed_prune("s/x", 2).await.unwrap();
    assert!(store.sealed_get("s/x", 1).await.unwrap().is_none());
    let (items, more) = store.sealed_list(None, 0, 1).await.unwrap();
    assert_eq!((items.len(), more), (1, true));
    let (items, _) = store.sealed_list(Some("_"), 0, 10).await.unwrap();
    assert_eq!(items.len(), 1, "`_` is matched literally");
    assert_eq!(
        store.sealed_with_other_key("k2", 10).await.unwrap().len(),
        2
    );
    let mut rewrapped = sealed("s/x", 2);
    rewrapped.key_id = "k2".into();
    store.sealed_rewrap(&rewrapped, "k1").await.unwrap();
    assert_eq!(
        store.sealed_latest("s/x").await.unwrap().unwrap().key_id,
        "k2"
    );
    store.sealed_delete("s/x").await.unwrap();
    assert!(store.sealed_latest("s/x").await.unwrap().is_none());
    purge_suite(&store, &other).await;
    event_suite(&store, &other).await;
    control_suite(&store, &other).await;
}

fn purge(name: &str, next_at_ms: i64, created_at_ms: i64) -> PurgeEntry {
    PurgeEntry {
        manager_id: "kv".into(),
        name: name.into(),
        credential_id: format!("c-{name}"),
        attempts: 0,
        next_at_ms,
        last_outcome: None,
        created_at_ms,
    }
}

/// An event of `credential` at `at_ms`, pending.
fn event(id: &str, credential: &str, at_ms: i64) -> EventRecord {
    EventRecord {
        seq: 0,
        id: id.into(),
        kind: EventKind::NeedsReauth,
        credential_id: credential.into(),
        workspace: "default".into(),
        environment: "Production".into(),
        integration_type: "github".into(),
        reason: "refused".into(),
        at_ms,
        delivery: Delivery::Pending,
        attempts: 0,
        next_at_ms: at_ms,
        last_outcome: None,
    }
}

async fn event_suite(store: &Arc<dyn Metadata>, other: &Arc<dyn Metadata>) {
    // Recorded once per id, from either connection.
    assert!(store
        .event_add(&event("e1", "c1", 100), None)
        .await
        .unwrap());
    assert!(!other
        .event_add(&event("e1", "c1", 100), None)
        .await
        .unwrap());
    // One that follows another is recorded only if that one is.
    assert!(!store
        .event_add(&event("after-missing", "c1", 100), Some("nope"))
        .await
        .unwrap());
    // With a credential change, in its transaction: a lost compare-and-swap records nothing.
    let mut row = record("ev", None);
    store.create_credential(&row, 0).await.ok();
    row = store.get_credential("ev").await.unwrap().unwrap();
    let mut next = row.clone();
    next.needs_reauth = true;
    next.row_version += 1;
    let e2 = event("e2", "ev", 200);
    store
        .update_credential(&next, row.row_version, None, Some(&e2))
        .await
        .unwrap();
    assert!(matches!(
        other
            .update_credential(&next, row.row_version, None, Some(&event("e3", "ev", 300)))
            .await,
        Err(MetadataError::Conflict)
    ));
    let all = other.events_after(0, 10).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["e1", "e2"]);
    assert!(all[0].seq < all[1].seq);
    assert_eq!(all[1].credential_id, "ev");
    assert_eq!(store.events_after(all[0].seq, 10).await.unwrap().len(), 1);
    assert_eq!(store.events_after(0, 1).await.unwrap().len(), 1);
    assert_eq!(other.event_get(all[1].seq).await.unwrap().unwrap(), all[1]);
    assert_eq!(store.events_pending().await.unwrap(), 2);

    // Due by next_at_ms; an attempt is recorded only over the attempt count and due time it
    // read.
    let due = store.events_due(150, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let retry = EventRecord {
        attempts: 1,
        next_at_ms: 1_000,
        last_outcome: Some("HTTP 500".into()),
        ..due[0].clone()
    };
    assert!(store.event_delivery(&retry, (0, 100)).await.unwrap());
    assert!(
        !other.event_delivery(&retry, (0, 100)).await.unwrap(),
        "stale attempt count"
    );
    assert!(
        !other.event_delivery(&retry, (1, 100)).await.unwrap(),
        "stale due time (another instance's claim)"
    );
    assert_eq!(
        store.events_due(999, 10).await.unwrap().len(),
        1,
        "only e2 now"
    );
    let done = EventRecord {
        delivery: Delivery::Delivered,
        attempts: 2,
        ..retry.clone()
    };
    assert!(other.event_delivery(&done, (1, 1_000)).await.unwrap());
    assert!(
        !store.event_delivery(&done, (2, 1_000)).await.unwrap(),
        "no longer pending"
    );
    assert_eq!(store.events_pending().await.unwrap(), 1);
    let e1 = store.event_get(all[0].seq).await.unwrap().unwrap();
    assert_eq!((e1.delivery, e1.attempts), (Delivery::Delivered, 2));
    assert_eq!(e1.last_outcome.as_deref(), Some("HTTP 500"));

    // Pruned by age, whatever their delivery.
    assert_eq!(store.events_prune(150).await.unwrap(), 1);
    let left = other.events_after(0, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, "e2");
    assert_eq!(store.events_prune(i64::MAX).await.unwrap(), 1);
}

/// Soft-deleted secrets awaiting their purge: one entry per manager and name, listed when due
/// (the longest due first), rescheduled and removed only as read (an entry added again since
/// is left alone), and counted per manager, whose release they hold up.
async fn purge_suite(store: &Arc<dyn Metadata>, other: &Arc<dyn Metadata>) {
    store.purge_add(&purge("p1", 200, 1)).await.unwrap();
    store.purge_add(&purge("p2", 100, 1)).await.unwrap();
    assert_eq!(
        other.purge_due(150, 10).await.unwrap(),
        vec![purge("p2", 100, 1)]
    );
    let due: Vec<String> = other
        .purge_due(1_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(due, ["p2", "p1"]);
    assert_eq!(other.purge_due(1_000, 1).await.unwrap().len(), 1);
    assert_eq!(
        other.purge_counts().await.unwrap(),
        HashMap::from([("kv".to_owned(), 2)])
    );
    assert!(
        other.manager_in_use("kv").await.unwrap(),
        "a pending purge keeps its manager"
    );
    // An attempt is recorded on the entry it was made on.
    let tried = PurgeEntry {
        attempts: 1,
        next_at_ms: 5_000,
        last_outcome: Some("waiting".into()),
        ..purge("p2", 100, 1)
    };
    store.purge_reschedule(&tried).await.unwrap();
    assert_eq!(other.purge_get("kv", "p2").await.unwrap().unwrap(), tried);
    assert!(
        other.purge_due(1_000, 10).await.unwrap().len() == 1,
        "p2 is not due now"
    );
    // Deleted again later: the new entry replaces it, and a worker holding the older one can
    // neither reschedule nor remove the new one.
    store.purge_add(&purge("p2", 100, 2)).await.unwrap();
    other.purge_reschedule(&tried).await.unwrap();
    other.purge_remove(&tried).await.unwrap();
    assert_eq!(
        store.purge_get("kv", "p2").await.unwrap().unwrap(),
        purge("p2", 100, 2)
    );
    other.purge_remove(&purge("p2", 100, 2)).await.unwrap();
    other.purge_remove(&purge("p1", 200, 1)).await.unwrap();
    assert!(store.purge_get("kv", "p2").await.unwrap().is_none());
    assert!(store.purge_counts().await.unwrap().is_empty());
    assert!(!store.manager_in_use("kv").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_suite_passes_on_sqlite_and_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let sqlite: Arc<dyn Metadata> = Arc::new(SqliteMetadata::open(&path).unwrap());
    store_suite(sqlite, Arc::new(SqliteMetadata::open(&path).unwrap())).await;

    let pg = peers::postgres().await;
    // Two instances starting at once: the schema is created once, under the advisory lock.
    let url = pg.url();
    let fc = fleet_config();
    let (a, b) = tokio::join!(
        PostgresMetadata::open(&url, &fc),
        PostgresMetadata::open(&url, &fc)
    );
    let (a, b): (Arc<dyn Metadata>, Arc<dyn Metadata>) =
        (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
    let mut changes = b.invalidations().expect("PostgreSQL announces changes");
    store_suite(Arc::clone(&a), Arc::clone(&b)).await;
    // b heard about a's changes (not its own): a credential's, and the control plane's.
    hear(
        &mut changes,
        &[Invalidation::Credential("a".into()), Invalidation::Control],
    )
    .await;
}

fn fleet_config() -> credproxy::config::FleetConfig {
    credproxy::config::FleetConfig {
        poll_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

/// Waits until `changes` has told each of `expected`, in any order among other changes.
async fn hear(
    changes: &mut tokio::sync::broadcast::Receiver<Invalidation>,
    expected: &[Invalidation],
) -> Vec<Invalidation> {
    let started = Instant::now();
    let mut heard = Vec::new();
    while !expected.iter().all(|e| heard.contains(e)) && started.elapsed() < DEADLINE {
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_millis(100), changes.recv()).await {
            heard.push(c);
        }
    }
    assert!(expected.iter().all(|e| heard.contains(e)), "{heard:?}");
    heard
}

/// The change feed numbers rows at insert, not at commit: a change whose transaction commits
/// after a later-numbered one is still heard, once. And a transaction that rolls back leaves
/// nothing to hear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_after_a_later_numbered_one_is_still_heard_once() {
    let pg = peers::postgres().await;
    let url = pg.url();
    let a: Arc<dyn Metadata> =
        Arc::new(PostgresMetadata::open(&url, &fleet_config()).await.unwrap());
    let b: Arc<dyn Metadata> =
        Arc::new(PostgresMetadata::open(&url, &fleet_config()).await.unwrap());
    let mut changes = b.invalidations().unwrap();
    let (mut slow, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let insert = "INSERT INTO changes (kind, subject, origin, at_ms) VALUES ('credential', $1, 'elsewhere', 0)";
    let late = slow.transaction().await.unwrap();
    late.execute(insert, &[&"late"]).await.unwrap();
    // Numbered after `late`, committed before it.
    let r = record("early", None);
    a.create_credential(&r, a.journal_add(&copy("early", "local")).await.unwrap())
        .await
        .unwrap();
    let mut changed = r.clone();
    changed.row_version += 1;
    a.update_credential(&changed, r.row_version, None, None)
        .await
        .unwrap();
    hear(&mut changes, &[Invalidation::Credential("early".into())]).await;
    late.commit().await.unwrap();
    hear(&mut changes, &[Invalidation::Credential("late".into())]).await;
    let rolled_back = slow.transaction().await.unwrap();
    rolled_back.execute(insert, &[&"never"]).await.unwrap();
    rolled_back.rollback().await.unwrap();
    changed.row_version += 1;
    a.update_credential(&changed, changed.row_version - 1, None, None)
        .await
        .unwrap();
    let heard = hear(&mut changes, &[Invalidation::Credential("early".into())]).await;
    assert!(!heard.contains(&Invalidation::Credential("never".into())));
    // Told once: nothing more arrives for `late`.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(c) = changes.try_recv() {
        assert_ne!(c, Invalidation::Credential("late".into()));
    }
}

/// An instance killed without leaving stops counting after 2.5 heartbeats, and its row is
/// deleted a day later by another's heartbeat (pods come and go by the thousand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_instances_gone_for_a_day_are_deleted() {
    let pg = peers::postgres().await;
    let url = pg.url();
    let a: Arc<dyn Metadata> =
        Arc::new(PostgresMetadata::open(&url, &fleet_config()).await.unwrap());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let now = credproxy::time::now_unix_ms();
    for (id, age_ms) in [
        ("killed-last-week", 7 * 86_400_000_i64),
        ("killed-an-hour-ago", 3_600_000),
    ] {
        client
            .execute(
                "INSERT INTO instances (id, config_hash, heartbeat_ms) VALUES ($1, 'old', $2)",
                &[&id, &(now - age_ms)],
            )
            .await
            .unwrap();
    }
    a.instance_heartbeat("alive", "h").await.unwrap();
    let mut ids: Vec<String> = client
        .query("SELECT id FROM instances ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort();
    assert_eq!(ids, ["alive", "killed-an-hour-ago"]);
    let live = a
        .live_config_hashes(Duration::from_secs(300))
        .await
        .unwrap();
    assert_eq!(live, ["h"], "only `alive` counts");
}

/// A database a version 3 binary created and wrote is upgraded in place by instances starting
/// together, and what it wrote stays readable, in the `default` workspace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_postgresql_database_is_upgraded_in_place() {
    let pg = peers::postgres().await;
    let url = pg.url();
    // Version 3's schema is this binary's without what version 4 added.
    drop(PostgresMetadata::open(&url, &fleet_config()).await.unwrap());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "DROP TABLE managers, routing, control, purges;
             ALTER TABLE credentials DROP COLUMN workspace;
             UPDATE credproxy_schema SET version = 3;
             INSERT INTO credentials (id, environment, integration_type, metadata, store_id,
                 store_name, store_version, row_version, created_at, updated_at)
             VALUES ('old', 'Production', 'github', '{\"team\":\"core\"}', 'local',
                 'Production/old', '1', 1, 10, 10);",
        )
        .await
        .unwrap();
    let fc = fleet_config();
    let (a, b) = tokio::join!(
        PostgresMetadata::open(&url, &fc),
        PostgresMetadata::open(&url, &fc)
    );
    let (a, b): (Arc<dyn Metadata>, Arc<dyn Metadata>) =
        (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
    let old = a.get_credential("old").await.unwrap().unwrap();
    assert_eq!(old, record("old", None));
    assert_eq!(old.workspace, "default");
    assert_eq!(b.control_version().await.unwrap(), 0, "seeded once");
    a.manager_insert(&manager("m1", "default")).await.unwrap();
    assert_eq!(b.control_version().await.unwrap(), 1);
    assert_eq!(
        b.manager_get("m1").await.unwrap().unwrap(),
        manager("m1", "default")
    );
    let version: i64 = client
        .query_one("SELECT version FROM credproxy_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, credproxy::metadata::SCHEMA_VERSION);
}

/// A database a version 4 binary created and wrote gains the purge table in place, and what
/// it wrote stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_4_postgresql_database_gains_the_purge_table_in_place() {
    let pg = peers::postgres().await;
    let url = pg.url();
    // Version 4's schema is this binary's without what version 5 added.
    drop(PostgresMetadata::open(&url, &fleet_config()).await.unwrap());
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "DROP TABLE purges;
             UPDATE credproxy_schema SET version = 4;
             INSERT INTO credentials (id, environment, integration_type, metadata, store_id,
                 store_name, store_version, row_version, created_at, updated_at)
             VALUES ('old', 'Production', 'github', '{\"team\":\"core\"}', 'local',
                 'Production/old', '1', 1, 10, 10);",
        )
        .await
        .unwrap();
    let fc = fleet_config();
    let (a, b) = tokio::join!(
        PostgresMetadata::open(&url, &fc),
        PostgresMetadata::open(&url, &fc)
    );
    let (a, b): (Arc<dyn Metadata>, Arc<dyn Metadata>) =
        (Arc::new(a.unwrap()), Arc::new(b.unwrap()));
    assert_eq!(
        a.get_credential("old").await.unwrap().unwrap(),
        record("old", None)
    );
    a.purge_add(&purge("p", 1, 1)).await.unwrap();
    assert_eq!(
        b.purge_get("kv", "p").await.unwrap().unwrap(),
        purge("p", 1, 1)
    );
    let version: i64 = client
        .query_one("SELECT version FROM credproxy_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, credproxy::metadata::SCHEMA_VERSION);
}

/// Three daemons sharing one PostgreSQL database and one master key.
async fn fleet(
    pg: &peers::Postgres,
    edit: impl Fn(&mut toml::Table, &std::path::Path),
) -> Vec<Daemon> {
    fleet_at(&pg.url(), edit).await
}

/// Three daemons sharing the database at `url` (PostgreSQL, or PgBouncer in front of it).
async fn fleet_at(url: &str, edit: impl Fn(&mut toml::Table, &std::path::Path)) -> Vec<Daemon> {
    let key_dir = tempfile::tempdir().unwrap().keep();
    let key = key_dir.join("master.key");
    assert!(common::run_cli(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(
            Daemon::start(|c, dir| {
                set(c, "store", "url", url);
                set(c, "store", "master_key_file", key.display().to_string());
                set(c, "store", "generate_master_key", false);
                edit(c, dir);
            })
            .await,
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_is_seen_by_the_others_within_a_second() {
    let pg = peers::postgres().await;
    writes_are_seen_everywhere_within_a_second(&pg.url()).await;
}

async fn writes_are_seen_everywhere_within_a_second(url: &str) {
    let ds = fleet_at(url, |c, _| set(c, "cache", "ttl", "1h")).await;
    let id = ds[0].create("Production", json!({"api_key": "v1"})).await;
    for d in &ds[1..] {
        let (status, body) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!((status, &body["secrets"]["api_key"]), (200, &json!("v1")));
    }
    let mut worst = Duration::ZERO;
    for round in 2..=6 {
        let value = format!("v{round}");
        let writer = &ds[round % 3];
        let (status, _) = writer
            .call(
                Method::PATCH,
                &format!("/v1/credentials/{id}"),
                Some(json!({"secrets": {"api_key": value}})),
            )
            .await;
        assert_eq!(status, 200);
        let written = Instant::now();
        for d in &ds {
            loop {
                let (_, body) = d
                    .call(Method::GET, &format!("/v1/credentials/{id}"), None)
                    .await;
                if body["secrets"]["api_key"] == value.as_str() {
                    break;
                }
                assert!(
                    written.elapsed() < Duration::from_secs(1),
                    "stale after a second: {body}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        worst = worst.max(written.elapsed());
    }
    eprintln!("three instances: a write was visible everywhere within {worst:?} (worst of 5)");
    let received = ds[1]
        .metric(r#"credproxy_cache_invalidations_received_total{kind="credential"}"#)
        .await;
    assert!(received >= 3.0, "{received}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_refresh_a_rotating_token_once_per_expiry() {
    let pg = peers::postgres().await;
    one_token_request_per_expiry(&pg.url()).await;
}

async fn one_token_request_per_expiry(url: &str) {
    const RUN: Duration = Duration::from_secs(10);
    let server = peers::oauth_server(2).await;
    let ds = fleet_at(url, |c, _| fast_refresh(c, "100ms")).await;
    let tokens = peers::oauth_grant(&server, peers::CLIENT_ID, peers::CLIENT_SECRET, 2).await;
    let (status, body) = ds[0]
        .call(
            Method::POST,
            "/v1/credentials",
            Some(peers::oauth_credential(&server, "Production", &tokens, 2)),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let started = Instant::now();
    let (mut reads, mut rejected) = (0, 0);
    while started.elapsed() < RUN {
        for d in &ds {
            let sent = credproxy::time::now_unix_ms();
            let (status, body) = d
                .call(Method::GET, &format!("/v1/credentials/{id}"), None)
                .await;
            assert_eq!(status, 200, "{body}");
            reads += 1;
            let token = body["secrets"]["access_token"].as_str().unwrap();
            if !peers::oauth_token_valid_since(&server, token, sent).await {
                rejected += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let stats = peers::oauth_stats(&server).await;
    let requests = stats["token_requests"].as_u64().unwrap();
    eprintln!(
        "three instances, {:.1}s: {reads} reads, {requests} token requests, {} issued, {rejected} rejected tokens",
        started.elapsed().as_secs_f64(),
        stats["issued"]
    );
    assert_eq!(stats["invalid_grant"], 0, "{stats}");
    assert_eq!(stats["reuse_detected"], 0, "{stats}");
    assert_eq!(requests, stats["issued"].as_u64().unwrap());
    assert!(
        requests as f64 <= started.elapsed().as_secs_f64() + 2.0,
        "{stats}"
    );
    assert!(requests >= 4, "{stats}");
    assert_eq!(rejected, 0);
}

/// PgBouncer in transaction mode, with two server connections for three instances: no
/// statement may depend on a session (a `LISTEN`, a named prepared statement, a session lock).
/// Writes are still seen everywhere, a rotating token is still refreshed once per expiry, and
/// the bouncer's log has no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_works_behind_pgbouncer_in_transaction_mode() {
    // Each fleet has a master key of its own, so each gets a database of its own.
    for run in 0..2 {
        let pg = peers::postgres().await;
        let bouncer = peers::pgbouncer(&pg, 2).await;
        if run == 0 {
            writes_are_seen_everywhere_within_a_second(&bouncer.url()).await;
        } else {
            one_token_request_per_expiry(&bouncer.url()).await;
        }
        let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let servers: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(servers <= 2, "{servers} server connections");
        let log = bouncer.log();
        for line in log.lines() {
            assert!(
                !line.contains("ERROR") && !line.contains("does not exist"),
                "{line}\n{log}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_a_migration_and_a_killed_one_loses_nothing() {
    let pg = peers::postgres().await;
    let openbao = peers::openbao().await;
    let mut ds = fleet(&pg, |c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        set(c, "migration", "rate", 100);
        set(c, "migration", "concurrency", 4);
        set(c, "migration", "retry_min", "100ms");
        set(c, "migration", "retry_max", "1s");
        set(c, "store", "journal_grace", "2s");
        set(c, "store", "journal_sweep_interval", "200ms");
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..1000 {
        ids.push((
            ds[i % 3]
                .create("Production", json!({"api_key": format!("v{i}")}))
                .await,
            format!("v{i}"),
        ));
    }
    for d in &ds {
        let mut c: toml::Table =
            toml::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
        set(&mut c, "routing", "default", "vault");
        std::fs::write(&d.config_path, toml::to_string(&c).unwrap()).unwrap();
    }
    for d in &ds {
        let (status, body) = d.call(Method::POST, "/v1/reload", None).await;
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut killed = ds.remove(2);
    killed.kill().await;

    let started = Instant::now();
    loop {
        let mut pending = 0;
        for d in &ds {
            let (_, m) = d.call(Method::GET, "/v1/migrations", None).await;
            pending += m["pending"].as_u64().unwrap_or(0);
        }
        let in_vault = vault_count(&openbao).await;
        if pending == 0 && in_vault == 1000 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE * 2,
            "pending {pending}, in vault {in_vault}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut moved = Vec::new();
    for d in &ds {
        let text = d.metrics_text().await;
        let n: f64 = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"credproxy_migration_moves_total{outcome="moved",source="local",target="vault"} "#)?
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0);
        moved.push(n);
    }
    eprintln!("moves per surviving instance: {moved:?} (the killed one's count died with it)");
    // Which instance moves what depends on timing (the killed one took some before it died);
    // that no credential was moved twice is checked below in OpenBao itself.
    assert!(
        moved.iter().sum::<f64>() > 0.0,
        "the survivors finished: {moved:?}"
    );
    assert!(
        moved.iter().sum::<f64>() <= 1000.0,
        "no credential moved twice by the survivors"
    );
    for (id, value) in ids.iter().step_by(7) {
        let (status, body) = ds[0]
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!(
            (
                status,
                &body["secrets"]["api_key"],
                &body["secrets_manager_id"]
            ),
            (200, &json!(value), &json!("vault"))
        );
    }
    // Moved once: a second copy to the same name makes version 2. Only the moves the killed
    // instance had in flight (at most its concurrency, 4) may have been copied again.
    let mut copied_twice = 0;
    for (id, _) in &ids {
        let (status, meta) = peers::bao(
            &openbao,
            reqwest::Method::GET,
            &format!("/v1/secret/metadata/credproxy/Production/{id}"),
            None,
        )
        .await;
        assert_eq!(status, 200);
        if meta["data"]["current_version"] != 1 {
            copied_twice += 1;
        }
    }
    assert!(
        copied_twice <= 4,
        "{copied_twice} credentials were copied more than once"
    );
    // Copies a killed mover left behind are swept: OpenBao holds exactly one per credential.
    let started = Instant::now();
    while vault_count(&openbao).await != 1000 {
        assert!(started.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn vault_count(openbao: &peers::Peer) -> usize {
    let (status, body) = peers::bao(
        openbao,
        reqwest::Method::from_bytes(b"LIST").unwrap(),
        "/v1/secret/metadata/credproxy/Production",
        None,
    )
    .await;
    if status == 404 {
        return 0;
    }
    body["data"]["keys"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_ride_out_a_database_restart() {
    let pg = peers::postgres().await;
    let ds = fleet(&pg, |c, _| set(c, "cache", "stale_if_error", "1m")).await;
    let id = ds[0]
        .create("Production", json!({"api_key": "before"}))
        .await;
    for d in &ds {
        assert_eq!(
            d.call(Method::GET, &format!("/v1/credentials/{id}"), None)
                .await
                .0,
            200
        );
    }
    pg.stop();
    // Cached reads keep being answered while the database is down.
    for d in &ds {
        let (status, body) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        assert_eq!(
            (status, &body["secrets"]["api_key"]),
            (200, &json!("before")),
            "{body}"
        );
    }
    // Readiness follows the database (answered from the change feed's last read, not a query
    // per probe): not ready while it is down, ready again once it is back.
    let ready = async |d: &Daemon| d.call_raw(Method::GET, "/readyz", &[], None).await.status;
    for d in &ds {
        common::wait_for("not ready while the database is down", || async {
            ready(d).await == 503
        })
        .await;
    }
    pg.start();
    for d in &ds {
        common::wait_for("ready again once the database is back", || async {
            ready(d).await == 200
        })
        .await;
    }
    // Writes work again, and every instance hears of them.
    let started = Instant::now();
    loop {
        let (status, _) = ds[1]
            .call(
                Method::PATCH,
                &format!("/v1/credentials/{id}"),
                Some(json!({"secrets": {"api_key": "after"}})),
            )
            .await;
        if status == 200 {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for d in &ds {
        let started = Instant::now();
        loop {
            let (_, body) = d
                .call(Method::GET, &format!("/v1/credentials/{id}"), None)
                .await;
            if body["secrets"]["api_key"] == "after" {
                break;
            }
            assert!(started.elapsed() < DEADLINE, "{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The change feed is a table: what was written after the restart reached every instance
    // through it, and none had to drop its whole cache.
    let flushed = r#"credproxy_cache_invalidations_received_total{kind="all"} "#;
    for d in &ds {
        let text = d.metrics_text().await;
        assert!(
            !text
                .lines()
                .any(|l| l.strip_prefix(flushed).is_some_and(|v| v != "0")),
            "{text}"
        );
    }
    assert!(
        ds[0]
            .metric(r#"credproxy_cache_invalidations_received_total{kind="credential"}"#)
            .await
            >= 1.0
    );
}

/// During a rolling config change, nothing moves until every live instance runs the new
/// routing: an instance still on the old one would move credentials straight back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_wait_until_every_instance_runs_the_new_routing() {
    let pg = peers::postgres().await;
    let openbao = peers::openbao().await;
    let mut ds = fleet(&pg, |c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        set(c, "migration", "rate", 0);
    })
    .await;
    // A stopped instance leaves the fleet and does not hold the others back.
    let mut stopped = ds.remove(2);
    stopped.stop().await;
    for i in 0..20 {
        ds[0]
            .create("Production", json!({"api_key": format!("v{i}")}))
            .await;
    }
    let reload = |d: &Daemon| {
        let mut c: toml::Table =
            toml::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
        set(&mut c, "routing", "default", "vault");
        std::fs::write(&d.config_path, toml::to_string(&c).unwrap()).unwrap();
        let socket = d.socket.clone();
        async move {
            let r = credproxy::client::send(&socket, Method::POST, "/v1/reload", &[], None)
                .await
                .unwrap();
            assert_eq!(r.status, 200);
        }
    };
    reload(&ds[0]).await;
    let started = Instant::now();
    let mut saw_waiting = false;
    while started.elapsed() < Duration::from_secs(3) {
        let (_, m) = ds[0].call(Method::GET, "/v1/migrations", None).await;
        saw_waiting |= m["state"] == "waiting_for_fleet";
        assert_eq!(m["pending"], 20, "{m}");
        assert_eq!(
            vault_count(&openbao).await,
            0,
            "nothing moves while the fleet disagrees"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(saw_waiting, "the status says why nothing moves");
    reload(&ds[1]).await;
    let started = Instant::now();
    while vault_count(&openbao).await != 20 {
        assert!(
            started.elapsed() < DEADLINE,
            "moves resumed once all agreed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
