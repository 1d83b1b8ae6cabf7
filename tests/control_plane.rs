//! The control plane end to end: secrets managers and routing given through the API, the moves
//! they cause, deleting a manager (its dry run, a `kill -9` in the middle), a manager removed
//! from the config file and rebuilt from its sealed record after a crash, and a fleet on
//! PostgreSQL following a change made through one instance. OpenBao is checked directly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::{self, bao, vault_manager, Peer, BAO_ROOT_TOKEN};
use common::{set, Daemon, DEADLINE};
use futures::future::join_all;
use hyper::Method;
use serde_json::{json, Value};

/// Fast clean-up and short cache entries, so reads during a move go to the stores.
fn migration_settings(c: &mut toml::Table) {
    set(c, "migration", "rate", 0);
    set(c, "migration", "concurrency", 8);
    set(c, "migration", "retry_min", "100ms");
    set(c, "migration", "retry_max", "1s");
    set(c, "store", "journal_grace", "1s");
    set(c, "store", "journal_sweep_interval", "200ms");
    set(c, "cache", "ttl", "100ms");
}

/// Moves slow enough (`rate` per second and store) that a kill lands in the middle.
fn paced(c: &mut toml::Table, rate: i64) {
    migration_settings(c);
    set(c, "migration", "rate", rate);
    set(c, "migration", "concurrency", 4);
}

fn edit_config(d: &Daemon, edit: impl FnOnce(&mut toml::Table)) {
    let mut c: toml::Table =
        toml::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&d.config_path, toml::to_string(&c).unwrap()).unwrap();
}

/// `POST /v1/secretsmanagers` for an OpenBao manager of `workspace`, its root token in `auth`.
async fn create_vault(
    d: &Daemon,
    openbao: &Peer,
    workspace: &str,
    id: &str,
    prefix: &str,
) -> Value {
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/secretsmanagers",
            Some(json!({
                "workspace": workspace,
                "id": id,
                "name": format!("OpenBao {id}"),
                "type": "hashicorp",
                "prefix": prefix,
                "settings": {"address": openbao.url()},
                "auth": {"token": BAO_ROOT_TOKEN},
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}\n{}", d.logs());
    assert!(
        !body.to_string().contains(BAO_ROOT_TOKEN),
        "never echoes access details: {body}"
    );
    body
}

async fn put_routing(d: &Daemon, body: Value) -> Value {
    let (status, answer) = d.call(Method::PUT, "/v1/routing", Some(body)).await;
    assert_eq!(status, 200, "{answer}\n{}", d.logs());
    answer
}

async fn migrations(d: &Daemon) -> Value {
    let (status, body) = d.call(Method::GET, "/v1/migrations", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn is_idle(m: &Value) -> bool {
    m["state"] == "idle" && m["pending"] == 0 && m["failures"].as_array().unwrap().is_empty()
}

/// Waits until the migrator has nothing left to do.
async fn wait_idle(d: &Daemon) -> Value {
    let started = Instant::now();
    loop {
        let m = migrations(d).await;
        if is_idle(&m) {
            return m;
        }
        assert!(
            started.elapsed() < DEADLINE * 2,
            "migration did not finish: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until manager `id` is gone (its record deleted once it held nothing), the migrator
/// is idle and every journaled copy is settled.
async fn wait_retired(d: &Daemon, id: &str) {
    let started = Instant::now();
    loop {
        let (status, body) = d
            .call(Method::GET, &format!("/v1/secretsmanagers/{id}"), None)
            .await;
        if status == 404 {
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "retiring", "{body}");
        assert!(
            started.elapsed() < DEADLINE * 2,
            "{id} never went away: {body}\n{}",
            migrations(d).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_idle(d).await;
    while d.metric("credproxy_journal_pending").await > 0.0 {
        assert!(started.elapsed() < DEADLINE * 2, "journal never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A credential's recorded store and the whole read answer.
async fn location(d: &Daemon, id: &str) -> (String, Value) {
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    (
        body["secrets_manager_id"].as_str().unwrap().to_owned(),
        body,
    )
}

/// Every secret name OpenBao's KV v2 mount `secret/` holds under `path` (recursively).
async fn vault_names(openbao: &Peer, path: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut folders = vec![path.trim_end_matches('/').to_owned()];
    while let Some(folder) = folders.pop() {
        let (status, body) = bao(
            openbao,
            reqwest::Method::from_bytes(b"LIST").unwrap(),
            &format!("/v1/secret/metadata/{folder}"),
            None,
        )
        .await;
        if status == 404 {
            continue;
        }
        assert_eq!(status, 200, "{body}");
        for key in body["data"]["keys"].as_array().unwrap() {
            let key = key.as_str().unwrap();
            match key.strip_suffix('/') {
                Some(sub) => folders.push(format!("{folder}/{sub}")),
                None => {
                    out.insert(format!("{folder}/{key}"));
                }
            }
        }
    }
    out
}

/// The current data of OpenBao secret `name`, and its metadata's `current_version`.
async fn vault_secret(openbao: &Peer, name: &str) -> Option<(Value, u64)> {
    let (status, body) = bao(
        openbao,
        reqwest::Method::GET,
        &format!("/v1/secret/data/{name}"),
        None,
    )
    .await;
    if status != 200 {
        return None;
    }
    let (status, meta) = bao(
        openbao,
        reqwest::Method::GET,
        &format!("/v1/secret/metadata/{name}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{meta}");
    Some((
        body["data"]["data"].clone(),
        meta["data"]["current_version"].as_u64().unwrap(),
    ))
}

/// How many secrets the local encrypted store holds, from the manager listing.
async fn local_names(d: &Daemon) -> usize {
    let mut offset = 0;
    loop {
        let reply = d
            .call_raw(
                Method::GET,
                &format!(
                    "/v1/secretsmanagers/secrets?secretsmanager_id=local&limit=500&offset={offset}"
                ),
                &[],
                None,
            )
            .await;
        assert_eq!(reply.status, 200);
        let page: Value = serde_json::from_slice(&reply.body).unwrap();
        offset += page.as_array().unwrap().len();
        if !reply.headers.contains_key("x-next-offset") {
            return offset;
        }
    }
}

/// Creates `n` credentials of `workspace`/`environment`, 16 at a time: `(id, value)`.
async fn create_many(
    d: &Daemon,
    workspace: &str,
    environment: &str,
    n: usize,
) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let made = join_all(chunk.iter().map(|i| async move {
            let value = format!("value-{workspace}-{environment}-{i}");
            let (status, body) = d
                .call(
                    Method::POST,
                    "/v1/credentials",
                    Some(json!({
                        "workspace": workspace,
                        "environment": environment,
                        "integration_type": "github",
                        "secrets": {"api_key": value},
                    })),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            (body["id"].as_str().unwrap().to_owned(), value)
        }))
        .await;
        out.extend(made);
    }
    out
}

/// The `moved` counter of every source → target pair in a `GET /v1/migrations` answer.
fn moved_pairs(status: &Value) -> BTreeMap<(String, String), u64> {
    status["moves"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["moved"].as_u64().unwrap() > 0)
        .map(|p| {
            (
                (
                    p["source"].as_str().unwrap().to_owned(),
                    p["target"].as_str().unwrap().to_owned(),
                ),
                p["moved"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Readers of random credentials straight on the socket, for as long as it takes. They count
/// HTTP answers only: while the daemon is down (killed, restarting) a request fails to
/// connect, which is no answer, and is counted apart.
struct Readers {
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    unanswered: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    fn start(socket: PathBuf, creds: Arc<Vec<(String, String)>>, n: usize) -> Readers {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let unanswered = Arc::new(AtomicUsize::new(0));
        let tasks = (0..n)
            .map(|r| {
                let (socket, creds, stop) = (socket.clone(), Arc::clone(&creds), Arc::clone(&stop));
                let (answers, failures, unanswered) = (
                    Arc::clone(&answers),
                    Arc::clone(&failures),
                    Arc::clone(&unanswered),
                );
                tokio::spawn(async move {
                    use rand::{Rng, SeedableRng};
                    let mut rng = rand::rngs::StdRng::seed_from_u64(r as u64);
                    while !stop.load(Ordering::SeqCst) {
                        let (id, value) = &creds[rng.gen_range(0..creds.len())];
                        let path = format!("/v1/credentials/{id}");
                        match credproxy::client::send(&socket, Method::GET, &path, &[], None).await
                        {
                            Ok(reply) => {
                                answers.fetch_add(1, Ordering::SeqCst);
                                let body: Value =
                                    serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                                if reply.status != 200 || body["secrets"]["api_key"] != **value {
                                    let earlier = failures.fetch_add(1, Ordering::SeqCst);
                                    if earlier < 20 {
                                        eprintln!("read failed: {} {body}", reply.status);
                                    }
                                }
                            }
                            Err(_) => {
                                unanswered.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Readers {
            stop,
            answers,
            failures,
            unanswered,
            tasks,
        }
    }

    /// Stops them: `(answers, failed answers, requests that got no answer)`.
    async fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.answers.load(Ordering::SeqCst),
            self.failures.load(Ordering::SeqCst),
            self.unanswered.load(Ordering::SeqCst),
        )
    }
}

/// Polls the move progress until some but far from all of `total` moves are done: at least
/// `min_moved` moved and at least `min_pending` still pending. Returns the status.
async fn wait_partway(d: &Daemon, min_moved: u64, min_pending: u64) -> Value {
    let started = Instant::now();
    loop {
        let m = migrations(d).await;
        let moved: u64 = moved_pairs(&m).values().sum();
        let pending = m["pending"].as_u64().unwrap();
        if moved >= min_moved {
            assert!(
                pending >= min_pending,
                "the moves ran too fast to be interrupted half way: {m}"
            );
            return m;
        }
        assert!(started.elapsed() < DEADLINE, "moves did not start: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that no file under `dir` holds `needle` in the clear.
fn assert_not_on_disk(dir: &Path, needle: &str) {
    for path in common::all_files(dir) {
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !common::contains_bytes(&bytes, needle.as_bytes()),
            "{} holds the access details in the clear",
            path.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_routing_moves_500_credentials_in_the_background_with_zero_failed_reads() {
    const N: usize = 500;
    const WS: &str = "team-a";
    let openbao = peers::openbao().await;
    let d = Daemon::start(|c, _| migration_settings(c)).await;
    let creds = Arc::new(create_many(&d, WS, "Production", N).await);
    assert_eq!(local_names(&d).await, N);

    let manager = create_vault(&d, &openbao, WS, "bao-team-a", "credproxy/").await;
    assert_eq!(
        (
            &manager["source"],
            &manager["state"],
            &manager["loaded"],
            &manager["workspace"],
            &manager["auth_keys_set"],
            &manager["credentials"],
        ),
        (
            &json!("api"),
            &json!("active"),
            &json!(true),
            &json!(WS),
            &json!(["token"]),
            &json!(0)
        ),
        "{manager}"
    );
    // Creating a manager moves nothing: the routing does not name it yet.
    assert_eq!(migrations(&d).await["pending"], 0);

    let readers = Readers::start(d.socket.clone(), Arc::clone(&creds), 4);
    let started = Instant::now();
    let routing = put_routing(&d, json!({"workspace": WS, "default": "bao-team-a"})).await;
    assert_eq!(
        (
            &routing["moves_planned"],
            &routing["default"],
            &routing["source"]
        ),
        (&json!(N), &json!("bao-team-a"), &json!("api")),
        "{routing}"
    );
    let status = wait_idle(&d).await;
    let elapsed = started.elapsed();
    let (answers, failures, unanswered) = readers.finish().await;
    eprintln!(
        "PUT /v1/routing moved {N} credentials local -> OpenBao in {:.2}s ({:.0}/s, \
         4 readers): {answers} reads during the move, {failures} failed",
        elapsed.as_secs_f64(),
        N as f64 / elapsed.as_secs_f64(),
    );
    assert_eq!(failures, 0, "no failed reads during the move");
    assert_eq!(unanswered, 0, "the daemon answered every request");
    assert!(answers > 100, "the readers ran during the move: {answers}");
    assert_eq!(
        moved_pairs(&status),
        BTreeMap::from([(("local".to_owned(), "bao-team-a".to_owned()), N as u64)]),
        "{status}"
    );

    // Every credential reads back intact from the new manager ...
    for (id, value) in creds.iter() {
        let (store, body) = location(&d, id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("bao-team-a", &json!(value)),
            "{id}"
        );
    }
    // ... OpenBao holds exactly those secrets, each written once ...
    let want: BTreeSet<String> = creds
        .iter()
        .map(|(id, _)| format!("credproxy/workspaces/{WS}/Production/{id}"))
        .collect();
    assert_eq!(vault_names(&openbao, "credproxy").await, want);
    for (id, value) in creds.iter().step_by(10) {
        let (data, version) = vault_secret(
            &openbao,
            &format!("credproxy/workspaces/{WS}/Production/{id}"),
        )
        .await
        .unwrap();
        assert_eq!((&data["api_key"], version), (&json!(value), 1));
    }
    // ... and the local store holds none.
    assert_eq!(local_names(&d).await, 0);
    let (_, view) = d
        .call(Method::GET, "/v1/secretsmanagers/bao-team-a", None)
        .await;
    assert_eq!(view["credentials"], N, "{view}");
    assert!(d.metrics_text().await.contains(&format!(
        r#"credproxy_migration_moves_total{{outcome="moved",source="local",target="api:hashicorp"}} {N}"#
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dry_run_of_a_delete_predicts_exactly_the_moves_the_delete_makes() {
    let openbao = peers::openbao().await;
    let d = Daemon::start(|c, _| migration_settings(c)).await;
    create_vault(&d, &openbao, "default", "old", "old/").await;
    create_vault(&d, &openbao, "default", "next", "next/").await;
    put_routing(
        &d,
        json!({"environments": {"Production": "old", "Staging": "next"}}),
    )
    .await;
    // In `old`: Production by its environment route, and one Staging credential pinned there.
    let prod = create_many(&d, "default", "Production", 6).await;
    let pinned = d
        .create_pinned("Staging", "old", json!({"api_key": "pinned"}))
        .await;
    assert_eq!(pinned["secrets_manager_id"], "old");
    let pinned = pinned["id"].as_str().unwrap().to_owned();
    // Elsewhere, and untouched by the delete.
    let staging = create_many(&d, "default", "Staging", 3).await;
    let dev = create_many(&d, "default", "Development", 2).await;
    for (id, _) in &prod {
        assert_eq!(location(&d, id).await.0, "old");
    }
    assert_eq!(vault_names(&openbao, "old").await.len(), 7);

    let (status, plan) = d
        .call(Method::DELETE, "/v1/secretsmanagers/old?dry_run=true", None)
        .await;
    assert_eq!(status, 200, "{plan}");
    let predicted = json!({
        "id": "old",
        "credentials": 7,
        "moves": [
            {"target": "local", "reason": "local", "count": 6},
            {"target": "next", "reason": "environment", "count": 1},
        ],
        "pinned": 1,
        "cannot_move": 0,
        "cannot_move_action": "refused",
    });
    assert_eq!(plan, predicted);
    // A dry run changes nothing.
    let (_, view) = d.call(Method::GET, "/v1/secretsmanagers/old", None).await;
    assert_eq!(
        (&view["state"], &view["credentials"]),
        (&json!("active"), &json!(7))
    );
    let (_, routing) = d.call(Method::GET, "/v1/routing", None).await;
    assert_eq!(
        routing["environments"],
        json!({"Production": "old", "Staging": "next"})
    );
    assert!(is_idle(&migrations(&d).await));

    let (status, answer) = d
        .call(Method::DELETE, "/v1/secretsmanagers/old", None)
        .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer, predicted,
        "the delete answers the plan it carries out"
    );
    // The routing stops naming it at once.
    let (_, routing) = d.call(Method::GET, "/v1/routing", None).await;
    assert_eq!(
        routing["environments"],
        json!({"Staging": "next"}),
        "{routing}"
    );
    wait_retired(&d, "old").await;

    // What moved is what the dry run said: per target, from the stores themselves ...
    let mut landed: BTreeMap<String, u64> = BTreeMap::new();
    for id in prod.iter().map(|(id, _)| id).chain([&pinned]) {
        *landed.entry(location(&d, id).await.0).or_default() += 1;
    }
    let predicted_targets: BTreeMap<String, u64> = predicted["moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["target"].as_str().unwrap().to_owned(),
                m["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(landed, predicted_targets);
    // ... and as the migrator counted them: nothing else moved.
    let status = migrations(&d).await;
    let moved: BTreeMap<String, u64> = moved_pairs(&status)
        .into_iter()
        .map(|((source, target), n)| {
            assert_eq!(source, "old", "{status}");
            (target, n)
        })
        .collect();
    assert_eq!(moved, predicted_targets, "{status}");
    for (id, _) in &staging {
        assert_eq!(location(&d, id).await.0, "next");
    }
    for (id, _) in &dev {
        assert_eq!(location(&d, id).await.0, "local");
    }
    for (id, value) in &prod {
        let (store, body) = location(&d, id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("local", &json!(value))
        );
    }
    // The pinned one fell back along the chain and says its pin is gone.
    let (store, body) = location(&d, &pinned).await;
    assert_eq!(
        (
            store.as_str(),
            &body["pinned_secrets_manager_id"],
            &body["pin_unavailable"],
            &body["secrets"]["api_key"]
        ),
        ("next", &json!("old"), &json!(true), &json!("pinned")),
        "{body}"
    );
    assert!(vault_names(&openbao, "old").await.is_empty());
    assert_eq!(vault_names(&openbao, "next").await.len(), 4);
    let (_, list) = d.call(Method::GET, "/v1/secretsmanagers", None).await;
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["local", "next"], "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_delete_then_a_restart_finishes_the_moves_and_loses_nothing() {
    const N: usize = 300;
    let openbao = peers::openbao().await;
    let mut d = Daemon::start(|c, _| paced(c, 40)).await;
    create_vault(&d, &openbao, "default", "doomed", "credproxy/").await;
    put_routing(&d, json!({"default": "doomed"})).await;
    let creds = Arc::new(create_many(&d, "default", "Production", N).await);
    assert_eq!(vault_names(&openbao, "credproxy").await.len(), N);
    assert_eq!(local_names(&d).await, 0);

    let readers = Readers::start(d.socket.clone(), Arc::clone(&creds), 4);
    let (status, plan) = d
        .call(Method::DELETE, "/v1/secretsmanagers/doomed", None)
        .await;
    assert_eq!(status, 202, "{plan}");
    assert_eq!(
        plan["moves"],
        json!([{"target": "local", "reason": "local", "count": N}])
    );
    let at_kill = wait_partway(&d, 40, 100).await;
    d.kill().await;
    // Some but not all moved: their copies already left OpenBao, the others are still there.
    let left = vault_names(&openbao, "credproxy").await.len();
    eprintln!(
        "killed with {} moved, {} pending; OpenBao still holds {left}",
        moved_pairs(&at_kill).values().sum::<u64>(),
        at_kill["pending"]
    );
    assert!(0 < left && left < N, "{left} of {N} left in OpenBao");

    let d = d.restart(|_| {}).await;
    // Still retiring after the restart (or already gone), and loaded from its record.
    let (status, view) = d
        .call(Method::GET, "/v1/secretsmanagers/doomed", None)
        .await;
    if status == 200 {
        assert_eq!(
            (&view["state"], &view["loaded"]),
            (&json!("retiring"), &json!(true)),
            "{view}"
        );
    } else {
        assert_eq!(status, 404, "{view}");
    }
    wait_retired(&d, "doomed").await;
    let (answers, failures, unanswered) = readers.finish().await;
    eprintln!(
        "reads across the kill and restart: {answers} answered, {failures} failed, \
         {unanswered} unanswered while the daemon was down"
    );
    assert_eq!(failures, 0, "no answered read failed");
    assert!(answers > 100, "{answers}");

    for (id, value) in creds.iter() {
        let (store, body) = location(&d, id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("local", &json!(value)),
            "{id}"
        );
    }
    assert!(
        vault_names(&openbao, "credproxy").await.is_empty(),
        "no copy left behind in OpenBao"
    );
    assert_eq!(local_names(&d).await, N, "one local copy each");
    let (_, list) = d.call(Method::GET, "/v1/secretsmanagers", None).await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "only the local store: {list}"
    );
    let (_, routing) = d.call(Method::GET, "/v1/routing", None).await;
    assert_eq!(
        (&routing["default"], &routing["source"]),
        (&json!("local"), &json!("none")),
        "{routing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_manager_removed_from_the_file_empties_then_a_restart_rebuilds_it_from_its_sealed_record(
) {
    const N: usize = 300;
    let openbao = peers::openbao().await;
    let mut d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        set(c, "routing", "default", "vault");
        paced(c, 40);
        // The token file is removed below, for the restart to need the sealed record. The
        // running daemon must not notice meanwhile: it would refuse the rotated-out token
        // (found in CI under load, where 40 moves took longer than the 10 s default check).
        set(c, "backends", "access_check_interval", "1h");
    })
    .await;
    let creds = Arc::new(create_many(&d, "default", "Production", N).await);
    assert_eq!(vault_names(&openbao, "credproxy").await.len(), N);

    let readers = Readers::start(d.socket.clone(), Arc::clone(&creds), 4);
    edit_config(&d, |c| {
        c.remove("secrets_manager");
        c.remove("routing");
    });
    let (status, report) = d.call(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(
        (
            &report["managers_removed"],
            &report["managers_retired"],
            &report["moves_planned"]
        ),
        (&json!(["vault"]), &json!(["vault"]), &json!(N)),
        "{report}"
    );
    let (_, view) = d.call(Method::GET, "/v1/secretsmanagers/vault", None).await;
    assert_eq!(
        (&view["state"], &view["source"]),
        (&json!("retiring"), &json!("file")),
        "{view}"
    );
    // The file's token reference is gone: after a restart only the sealed record can say it.
    std::fs::remove_file(d.dir.path().join("vault-token")).unwrap();

    let at_kill = wait_partway(&d, 40, 100).await;
    d.kill().await;
    let left = vault_names(&openbao, "credproxy").await.len();
    eprintln!(
        "killed with {} moved, {} pending; OpenBao still holds {left}",
        moved_pairs(&at_kill).values().sum::<u64>(),
        at_kill["pending"]
    );
    assert!(0 < left && left < N, "{left} of {N} left in OpenBao");

    // The new file has no `vault`: it is rebuilt from its record to move the rest out.
    let d = d.restart(|_| {}).await;
    let (status, view) = d.call(Method::GET, "/v1/secretsmanagers/vault", None).await;
    if status == 200 {
        assert_eq!(
            (&view["state"], &view["loaded"], &view["source"]),
            (&json!("retiring"), &json!(true), &json!("file")),
            "{view}"
        );
    } else {
        assert_eq!(status, 404, "{view}");
    }
    wait_retired(&d, "vault").await;
    let (answers, failures, unanswered) = readers.finish().await;
    eprintln!(
        "reads across the kill and restart: {answers} answered, {failures} failed, \
         {unanswered} unanswered while the daemon was down"
    );
    assert_eq!(failures, 0, "no answered read failed");
    assert!(answers > 100, "{answers}");
    assert!(
        !d.logs().contains("cannot build this secrets manager"),
        "{}",
        d.logs()
    );

    for (id, value) in creds.iter() {
        let (store, body) = location(&d, id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("local", &json!(value)),
            "{id}"
        );
    }
    assert!(
        vault_names(&openbao, "credproxy").await.is_empty(),
        "no copy left behind in OpenBao"
    );
    assert_eq!(local_names(&d).await, N);
    let (_, list) = d.call(Method::GET, "/v1/secretsmanagers", None).await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "only the local store: {list}"
    );
    // The token was kept sealed: nothing the daemon wrote holds it in the clear.
    assert_not_on_disk(d.dir.path(), BAO_ROOT_TOKEN);
}

/// Three daemons sharing one PostgreSQL database and one master key.
async fn fleet(pg: &peers::Postgres, edit: impl Fn(&mut toml::Table)) -> Vec<Daemon> {
    let key_dir = tempfile::tempdir().unwrap().keep();
    let key = key_dir.join("master.key");
    assert!(common::run_cli(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(
            Daemon::start(|c, _| {
                set(c, "store", "url", pg.url());
                set(c, "store", "master_key_file", key.display().to_string());
                set(c, "store", "generate_master_key", false);
                edit(c);
            })
            .await,
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_uses_a_manager_created_through_one_instance_within_a_second_and_moves_each_credential_once(
) {
    const N: usize = 300;
    let pg = peers::postgres().await;
    let openbao = peers::openbao().await;
    let ds = fleet(&pg, |c| {
        migration_settings(c);
        set(c, "migration", "rate", 100);
        set(c, "migration", "concurrency", 4);
        set(c, "store", "journal_grace", "2s");
        // No periodic heartbeat inside the test: the writes counted below are the epochs'.
        set(c, "store", "heartbeat_interval", "1h");
    })
    .await;
    let (db, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let instance_rows = async || -> Vec<(String, i64)> {
        db.query("SELECT id, heartbeat_ms FROM instances ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let before = instance_rows().await;
    assert_eq!(before.len(), 3);

    // Created through A; B and C have it, built and usable, within a second.
    create_vault(&ds[0], &openbao, "default", "shared", "credproxy/").await;
    let created = Instant::now();
    let mut latencies = Vec::new();
    for d in &ds[1..] {
        loop {
            let (status, view) = d
                .call(Method::GET, "/v1/secretsmanagers/shared", None)
                .await;
            if status == 200 && view["loaded"] == true {
                break;
            }
            assert!(
                created.elapsed() < DEADLINE,
                "never seen: {status} {view}\n{}",
                d.logs()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies.push(created.elapsed());
    }
    let pinned = ds[1]
        .create_pinned("Pinned", "shared", json!({"api_key": "through-b"}))
        .await;
    let usable = created.elapsed();
    eprintln!(
        "a manager created through instance A: loaded in B and C after {latencies:?}; \
         a credential pinned to it through B stored after {usable:?}"
    );
    for l in &latencies {
        assert!(*l < Duration::from_millis(1500), "{latencies:?}");
    }
    assert_eq!(pinned["secrets_manager_id"], "shared");
    let pinned = pinned["id"].as_str().unwrap().to_owned();
    let (status, body) = ds[2]
        .call(Method::GET, &format!("/v1/credentials/{pinned}"), None)
        .await;
    assert_eq!(
        (status, &body["secrets"]["api_key"]),
        (200, &json!("through-b"))
    );

    // A routing change through A moves every credential exactly once, fleet-wide.
    let mut creds = Vec::new();
    for (i, d) in ds.iter().enumerate() {
        creds.extend(
            create_many(
                d,
                "default",
                "Production",
                N / 3 + usize::from(i == 0) * (N % 3),
            )
            .await,
        );
    }
    assert_eq!(creds.len(), N);
    assert_eq!(local_names(&ds[2]).await, N);
    let routing = put_routing(&ds[0], json!({"default": "shared"})).await;
    assert_eq!(routing["moves_planned"], N, "{routing}");
    let changed = Instant::now();
    for d in &ds[1..] {
        loop {
            let (_, routing) = d.call(Method::GET, "/v1/routing", None).await;
            if routing["default"] == "shared" {
                break;
            }
            assert!(changed.elapsed() < DEADLINE, "{routing}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    eprintln!(
        "the routing change was in force everywhere after {:?}",
        changed.elapsed()
    );
    loop {
        let mut idle = true;
        for d in &ds {
            idle &= is_idle(&migrations(d).await);
        }
        let in_vault = vault_names(&openbao, "credproxy/Production").await.len();
        if idle && in_vault == N {
            break;
        }
        assert!(
            changed.elapsed() < DEADLINE * 2,
            "in OpenBao: {in_vault}; {}",
            migrations(&ds[0]).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = changed.elapsed();
    // A manager and a routing change through the API made no instance write its epoch: they
    // are the same rows for all, and none moves before it has applied them.
    assert_eq!(instance_rows().await, before);

    let mut moved = Vec::new();
    let mut busy = Vec::new();
    for d in &ds {
        let text = d.metrics_text().await;
        let sample = |prefix: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        moved.push(sample(
            r#"credproxy_migration_moves_total{outcome="moved",source="local",target="api:hashicorp"}"#,
        ));
        busy.push(sample(
            r#"credproxy_migration_claims_total{outcome="busy"}"#,
        ));
    }
    eprintln!(
        "{N} credentials moved in {:.2}s; moves per instance {moved:?}, claims found busy {busy:?}",
        took.as_secs_f64()
    );
    assert_eq!(
        moved.iter().sum::<f64>(),
        N as f64,
        "the instances' move counts add up to one move per credential: {moved:?}"
    );
    for (id, value) in &creds {
        let (store, body) = location(&ds[1], id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("shared", &json!(value)),
            "{id}"
        );
    }
    // OpenBao holds exactly one copy each, written once; nothing is left in the local store.
    let want: BTreeSet<String> = creds
        .iter()
        .map(|(id, _)| format!("credproxy/Production/{id}"))
        .chain([format!("credproxy/Pinned/{pinned}")])
        .collect();
    assert_eq!(vault_names(&openbao, "credproxy").await, want);
    for (id, value) in &creds {
        let (data, version) = vault_secret(&openbao, &format!("credproxy/Production/{id}"))
            .await
            .unwrap();
        assert_eq!(
            (&data["api_key"], version),
            (&json!(value), 1),
            "{id} copied more than once"
        );
    }
    assert_eq!(local_names(&ds[0]).await, 0);
}

/// An OpenBao policy for the whole KV mount, with or without the right to delete secrets.
async fn vault_policy(openbao: &Peer, name: &str, may_delete: bool) {
    let metadata = if may_delete {
        r#"["read", "list", "delete"]"#
    } else {
        r#"["read", "list"]"#
    };
    let policy = format!(
        r#"path "secret/data/*" {{ capabilities = ["create", "read", "update"] }}
path "secret/metadata/*" {{ capabilities = {metadata} }}"#
    );
    let (status, body) = bao(
        openbao,
        reqwest::Method::PUT,
        &format!("/v1/sys/policies/acl/{name}"),
        Some(json!({ "policy": policy })),
    )
    .await;
    assert!(status == 204 || status == 200, "{status} {body}");
}

/// A retiring manager stays while copies of its credentials are left (here: its token may not
/// delete them), and goes once the journal sweeper has deleted them — not an hour later, at the
/// migrator's next scheduled pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retiring_manager_whose_old_copies_are_deleted_late_disappears_once_they_are() {
    let openbao = peers::openbao().await;
    vault_policy(&openbao, "no-delete-yet", false).await;
    let (status, token) = bao(
        &openbao,
        reqwest::Method::POST,
        "/v1/auth/token/create",
        Some(json!({"policies": ["no-delete-yet"], "ttl": "1h"})),
    )
    .await;
    assert_eq!(status, 200, "{token}");
    let token = token["auth"]["client_token"].as_str().unwrap().to_owned();
    let d = Daemon::start(|c, _| migration_settings(c)).await;
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/secretsmanagers",
            Some(json!({
                "id": "stuck",
                "name": "OpenBao, scoped token",
                "type": "hashicorp",
                "settings": {"address": openbao.url()},
                "auth": {"token": token},
            })),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    put_routing(&d, json!({"default": "stuck"})).await;
    let creds = create_many(&d, "default", "Production", 5).await;
    let (status, plan) = d
        .call(Method::DELETE, "/v1/secretsmanagers/stuck", None)
        .await;
    assert_eq!(status, 202, "{plan}");

    // Every credential moves, but the old copies cannot be deleted yet: the manager keeps them
    // (journaled), so it stays, retiring.
    let started = Instant::now();
    loop {
        let m = migrations(&d).await;
        let mut moved = 0;
        for (id, _) in &creds {
            moved += usize::from(location(&d, id).await.0 == "local");
        }
        if is_idle(&m) && moved == creds.len() {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while d.metric("credproxy_journal_pending").await < creds.len() as f64 {
        assert!(started.elapsed() < DEADLINE, "the copies are journaled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(vault_names(&openbao, "credproxy").await.len(), creds.len());
    let (status, view) = d.call(Method::GET, "/v1/secretsmanagers/stuck", None).await;
    assert_eq!(
        (status, &view["state"]),
        (200, &json!("retiring")),
        "{view}"
    );

    // Deleting allowed again: the sweeper deletes the copies, and the manager, empty now, goes.
    vault_policy(&openbao, "no-delete-yet", true).await;
    let allowed = Instant::now();
    while !vault_names(&openbao, "credproxy").await.is_empty() {
        assert!(
            allowed.elapsed() < DEADLINE,
            "the sweeper deletes the copies"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let swept = allowed.elapsed();
    loop {
        let (status, view) = d.call(Method::GET, "/v1/secretsmanagers/stuck", None).await;
        if status == 404 {
            break;
        }
        assert!(
            allowed.elapsed() < swept + Duration::from_secs(15),
            "still listed {:?} after its last copy was deleted: {view}",
            allowed.elapsed() - swept
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "copies deleted {swept:?} after delete was allowed; manager gone after {:?}",
        allowed.elapsed()
    );
    for (id, value) in &creds {
        let (store, body) = location(&d, id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("local", &json!(value))
        );
    }
}
