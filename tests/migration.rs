//! Config reload and background migration between stores, through the daemon's socket, with
//! moto and OpenBao running and checked directly.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peers::{self, aws_manager, bao, vault_manager, Peer};
use common::{route, set, Daemon, DEADLINE};
use futures::future::join_all;
use hyper::Method;
use serde_json::{json, Value};

/// Fast clean-up and unthrottled moves: these tests run one process at a time.
fn migration_settings(c: &mut toml::Table) {
    set(c, "migration", "rate", 0);
    set(c, "migration", "concurrency", 8);
    set(c, "migration", "retry_min", "100ms");
    set(c, "migration", "retry_max", "1s");
    set(c, "store", "journal_grace", "1s");
    set(c, "store", "journal_sweep_interval", "200ms");
    // Short-lived cache entries, so reads during a move go to the stores.
    set(c, "cache", "ttl", "100ms");
}

/// Rewrites the daemon's config file.
fn edit_config(d: &Daemon, edit: impl FnOnce(&mut toml::Table)) {
    let mut c: toml::Table =
        toml::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&d.config_path, toml::to_string(&c).unwrap()).unwrap();
}

async fn reload(d: &Daemon) -> Value {
    let (status, body) = d.call(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{body}\n{}", d.logs());
    body
}

async fn migrations(d: &Daemon) -> Value {
    let (status, body) = d.call(Method::GET, "/v1/migrations", None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the migrator has nothing left to do.
async fn wait_idle(d: &Daemon) -> Value {
    let started = Instant::now();
    loop {
        let m = migrations(d).await;
        if m["state"] == "idle" && m["pending"] == 0 && m["failures"].as_array().unwrap().is_empty()
        {
            return m;
        }
        assert!(
            started.elapsed() < DEADLINE * 2,
            "migration did not finish: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

/// Names OpenBao holds under `credproxy/{environment}/`.
async fn vault_names(openbao: &Peer, environment: &str) -> Vec<String> {
    let (status, body) = bao(
        openbao,
        reqwest::Method::from_bytes(b"LIST").unwrap(),
        &format!("/v1/secret/metadata/credproxy/{environment}"),
        None,
    )
    .await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{body}");
    body["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect()
}

async fn vault_value(openbao: &Peer, name: &str) -> Option<Value> {
    let (status, body) = bao(
        openbao,
        reqwest::Method::GET,
        &format!("/v1/secret/data/{name}"),
        None,
    )
    .await;
    (status == 200).then(|| body["data"]["data"].clone())
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

async fn create_many(d: &Daemon, environment: &str, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let made = join_all(chunk.iter().map(|i| async move {
            let value = format!("value-{environment}-{i}");
            (
                d.create(environment, json!({"api_key": value})).await,
                value,
            )
        }))
        .await;
        out.extend(made);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_local_credentials_move_to_vault_while_readers_see_no_errors() {
    let openbao = peers::openbao().await;
    let d = Arc::new(
        Daemon::start(|c, dir| {
            c.insert(
                "secrets_manager".into(),
                toml::Value::Array(vec![vault_manager(dir, &openbao)]),
            );
            migration_settings(c);
        })
        .await,
    );
    let creds = Arc::new(create_many(&d, "Production", 1000).await);
    assert_eq!(local_names(&d).await, 1000);

    // Readers across all credentials for the whole move.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (d, creds, stop) = (Arc::clone(&d), Arc::clone(&creds), Arc::clone(&stop));
            let (reads, failures) = (Arc::clone(&reads), Arc::clone(&failures));
            tokio::spawn(async move {
                let mut i = r * 250;
                while !stop.load(Ordering::SeqCst) {
                    let (id, value) = &creds[i % creds.len()];
                    let (status, body) = d
                        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
                        .await;
                    reads.fetch_add(1, Ordering::SeqCst);
                    if status != 200 || body["secrets"]["api_key"] != value.as_str() {
                        failures.fetch_add(1, Ordering::SeqCst);
                        eprintln!("read failed: {status} {body}");
                    }
                    i += 7;
                }
            })
        })
        .collect();

    edit_config(&d, |c| set(c, "routing", "default", "vault"));
    let started = Instant::now();
    let report = reload(&d).await;
    assert_eq!(report["moves_planned"], 1000, "{report}");
    let status = wait_idle(&d).await;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    eprintln!(
        "moved 1000 credentials local -> OpenBao in {:.2}s ({:.0}/s); {} reads during the move, {} failed",
        elapsed.as_secs_f64(),
        1000.0 / elapsed.as_secs_f64(),
        reads.load(Ordering::SeqCst),
        failures.load(Ordering::SeqCst)
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "no failed reads during the move"
    );
    assert!(reads.load(Ordering::SeqCst) > 100);
    let pair = &status["moves"][0];
    assert_eq!(
        (&pair["source"], &pair["target"], &pair["moved"]),
        (&json!("local"), &json!("vault"), &json!(1000)),
        "{status}"
    );

    // Every secret is in OpenBao, checked there; none is left in the local store.
    let names = vault_names(&openbao, "Production").await;
    assert_eq!(names.len(), 1000);
    for (id, value) in creds.iter().step_by(50) {
        let stored = vault_value(&openbao, &format!("credproxy/Production/{id}"))
            .await
            .unwrap();
        assert_eq!(stored["api_key"], value.as_str());
        assert_eq!(location(&d, id).await.0, "vault");
    }
    assert_eq!(
        local_names(&d).await,
        0,
        "the metadata database holds references only"
    );
    let metrics = d.metrics_text().await;
    assert!(
        metrics.contains(
            r#"credproxy_migration_moves_total{outcome="moved",source="local",target="vault"} 1000"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"credproxy_migration_pending{source="local",target="vault"} 0"#));
    assert_eq!(
        d.metric(r#"credproxy_config_reloads_total{outcome="success"}"#)
            .await,
        1.0
    );
}

/// Where the credentials of `each_routing_change_lands_credentials_where_the_chain_says`
/// should be: Production, Development, and the one pinned to vault.
struct Expect<'a> {
    stage: &'static str,
    prod: &'a [(String, String)],
    dev: &'a [(String, String)],
    pinned: &'a str,
    want: [&'static str; 3],
}

impl Expect<'_> {
    async fn check(&self, d: &Daemon) {
        let idle = wait_idle(d).await;
        // What the migrator said and did, should a credential not be where it belongs.
        let why = || format!("{}; migrations: {idle}\n{}", self.stage, d.logs());
        for (id, _) in self.prod {
            assert_eq!(location(d, id).await.0, self.want[0], "{}", why());
        }
        for (id, _) in self.dev {
            assert_eq!(location(d, id).await.0, self.want[1], "{}", why());
        }
        assert_eq!(location(d, self.pinned).await.0, self.want[2], "{}", why());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_routing_change_lands_credentials_where_the_chain_says() {
    let (moto, openbao) = (peers::moto().await, peers::openbao().await);
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![aws_manager(dir, &moto), vault_manager(dir, &openbao)]),
        );
        migration_settings(c);
    })
    .await;
    let dir = d.dir.path().to_owned();
    let prod = create_many(&d, "Production", 5).await;
    let dev = create_many(&d, "Development", 5).await;
    let pinned = d
        .create_pinned("Development", "vault", json!({"api_key": "pinned-value"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let aws = peers::aws_client(&moto).await;
    let in_aws = |id: String, env: &'static str| {
        let aws = aws.clone();
        async move {
            aws.get_secret_value()
                .secret_id(format!("credproxy/{env}/{id}"))
                .send()
                .await
                .is_ok()
        }
    };

    let expect = |stage: &'static str, want: [&'static str; 3]| Expect {
        stage,
        prod: &prod,
        dev: &dev,
        pinned: &pinned,
        want,
    };

    // 1. Production → AWS.
    edit_config(&d, |c| route(c, &[("Production", "aws")]));
    reload(&d).await;
    expect("prod→aws", ["aws", "local", "vault"])
        .check(&d)
        .await;
    for (id, _) in &prod {
        assert!(in_aws(id.clone(), "Production").await, "in moto itself");
    }

    // 2. Production → Vault: out of AWS, into OpenBao.
    edit_config(&d, |c| route(c, &[("Production", "vault")]));
    reload(&d).await;
    expect("prod→vault", ["vault", "local", "vault"])
        .check(&d)
        .await;
    assert_eq!(vault_names(&openbao, "Production").await.len(), 5);
    for (id, _) in &prod {
        assert!(!in_aws(id.clone(), "Production").await, "deleted from moto");
    }

    // 3. Environment route dropped, default AWS: everything unpinned goes to the default.
    edit_config(&d, |c| {
        route(c, &[]);
        set(c, "routing", "default", "aws");
    });
    reload(&d).await;
    expect("default aws", ["aws", "aws", "vault"])
        .check(&d)
        .await;
    assert!(vault_names(&openbao, "Production").await.is_empty());

    // 4. Default removed: back to the local store.
    edit_config(&d, |c| {
        c["routing"].as_table_mut().unwrap().remove("default");
        route(c, &[("Production", "vault")]);
    });
    reload(&d).await;
    expect("no default", ["vault", "local", "vault"])
        .check(&d)
        .await;

    // 5. The vault manager removed while it holds credentials: each goes to its best
    // fallback, the pinned one included, and the API says its pin is unavailable.
    edit_config(&d, |c| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![aws_manager(&dir, &moto)]),
        );
        route(c, &[("Production", "aws")]);
    });
    let report = reload(&d).await;
    assert_eq!(report["managers_removed"], json!(["vault"]), "{report}");
    assert_eq!(report["managers_retired"], json!(["vault"]), "{report}");
    expect("vault removed", ["aws", "local", "local"])
        .check(&d)
        .await;
    let (_, body) = location(&d, &pinned).await;
    assert_eq!(body["pinned_secrets_manager_id"], "vault");
    assert_eq!(body["pin_unavailable"], true);
    assert_eq!(body["secrets"]["api_key"], "pinned-value");
    assert!(vault_names(&openbao, "Production").await.is_empty());
    assert!(vault_names(&openbao, "Development").await.is_empty());
    for (id, value) in prod.iter().chain(dev.iter()) {
        assert_eq!(
            location(&d, id).await.1["secrets"]["api_key"],
            value.as_str()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_unreachable_manager_keeps_its_credentials_and_reports_the_blocked_moves() {
    let mut openbao = peers::openbao().await;
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        route(c, &[("Production", "vault")]);
        migration_settings(c);
        set(c, "backends", "timeout", "500ms");
    })
    .await;
    let creds = create_many(&d, "Production", 3).await;
    openbao.kill();
    edit_config(&d, |c| {
        c.remove("secrets_manager");
        route(c, &[]);
    });
    let report = reload(&d).await;
    assert_eq!(report["managers_retired"], json!(["vault"]));
    let started = Instant::now();
    let status = loop {
        let m = migrations(&d).await;
        if m["failures"].as_array().unwrap().len() == 3 {
            break m;
        }
        assert!(started.elapsed() < DEADLINE, "{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failure = &status["failures"][0];
    assert_eq!(
        (&failure["source"], &failure["target"]),
        (&json!("vault"), &json!("local"))
    );
    assert!(
        failure["error"].as_str().unwrap().contains("vault"),
        "{status}"
    );
    // Nothing switched: the references still point at the vault copies.
    for (id, value) in &creds {
        let (status, body) = d
            .call(Method::GET, &format!("/v1/credentials/{id}"), None)
            .await;
        // Served stale from the cache while allowed, then 503: never "not found".
        match status {
            200 => assert_eq!(body["secrets"]["api_key"], value.as_str()),
            503 => assert_eq!(body["error"]["code"], "store_unavailable"),
            _ => panic!("unreachable, not lost: {status} {body}"),
        }
        assert_eq!(
            body.get("secrets_manager_id")
                .map_or("vault", |v| v.as_str().unwrap()),
            "vault"
        );
    }
    assert!(d.metrics_text().await.contains(
        r#"credproxy_migration_moves_total{outcome="failed",source="vault",target="local"}"#
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_on_reload_leaves_the_running_one_in_force() {
    let d = Daemon::start(|c, _| migration_settings(c)).await;
    let id = d
        .create("Production", json!({"api_key": "still-served"}))
        .await;
    let good = std::fs::read_to_string(&d.config_path).unwrap();
    let bad = [
        ("syntax", format!("{good}\n[routing\n")),
        ("unknown key", format!("{good}\n[cache]\nttl_typo = \"1s\"\n").replace("[cache]\nttl", "[cache]\nttl")),
        (
            "composio as default",
            format!(
                "{good}\n[[secrets_manager]]\nid = \"composio\"\ntype = \"composio\"\napi_key = {{ env = \"X\" }}\n"
            )
            .replace("[routing]", "[routing]\ndefault = \"composio\""),
        ),
        ("unknown manager", good.replace("[store]", "[routing]\ndefault = \"nowhere\"\n[store]")),
    ];
    let mut failures = 0.0;
    for (what, text) in &bad {
        std::fs::write(&d.config_path, text).unwrap();
        let (status, body) = d.call(Method::POST, "/v1/reload", None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (422, Some("invalid_config")),
            "{what}: {body}"
        );
        assert!(
            body["error"]["detail"].is_string(),
            "{what}: the reason is given"
        );
        failures += 1.0;
    }
    // SIGHUP with a bad file: logged, counted, and the daemon keeps serving.
    std::fs::write(&d.config_path, &bad[0].1).unwrap();
    common::signal(d.pid(), libc::SIGHUP);
    failures += 1.0;
    let started = Instant::now();
    while d
        .metric(r#"credproxy_config_reloads_total{outcome="failure"}"#)
        .await
        < failures
    {
        assert!(started.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.logs().contains("configuration reload refused"));
    let (status, body) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (status, &body["secrets"]["api_key"]),
        (200, &json!("still-served"))
    );
    let (_, routing) = d.call(Method::GET, "/v1/routing", None).await;
    assert_eq!(routing["default"], "local");
    // And a good file reloads.
    std::fs::write(&d.config_path, &good).unwrap();
    reload(&d).await;
    assert_eq!(
        d.metric(r#"credproxy_config_reloads_total{outcome="success"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_reloaded_when_watching_is_on() {
    let openbao = peers::openbao().await;
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        migration_settings(c);
        set(c, "reload", "watch", true);
        set(c, "reload", "watch_interval", "100ms");
    })
    .await;
    let id = d.create("Production", json!({"api_key": "watched"})).await;
    edit_config(&d, |c| set(c, "routing", "default", "vault"));
    let started = Instant::now();
    while location(&d, &id).await.0 != "vault" {
        assert!(started.elapsed() < DEADLINE, "{}", d.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(d.logs().contains("trigger=\"file change\""), "{}", d.logs());
}

/// kill -9 at random points while 1,000 credentials move (and some are rewritten between
/// kills), 20 times, restarting each time: the migration resumes from the database, every
/// credential ends readable with its latest value, and no copy is left behind anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_move_of_a_thousand_loses_nothing() {
    use rand::Rng;
    let openbao = peers::openbao().await;
    let mut d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        migration_settings(c);
        // Slow enough that the move spans many kills.
        set(c, "migration", "rate", 100);
    })
    .await;
    let mut expected: BTreeMap<String, String> = create_many(&d, "Production", 1000)
        .await
        .into_iter()
        .collect();
    let ids: Vec<String> = expected.keys().cloned().collect();
    edit_config(&d, |c| set(c, "routing", "default", "vault"));
    reload(&d).await;

    let mut rng = rand::thread_rng();
    let mut moved_before_last_kill = 0;
    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        for _ in 0..3 {
            let id = &ids[rng.gen_range(0..ids.len())];
            let value = format!("rewritten-{round}-{id}");
            let (status, body) = d
                .call(
                    Method::PATCH,
                    &format!("/v1/credentials/{id}"),
                    Some(json!({"secrets": {"api_key": value}})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            expected.insert(id.clone(), value);
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..200))).await;
        d.kill().await;
        d = d.restart(|_| {}).await;
        moved_before_last_kill = vault_names(&openbao, "Production").await.len();
    }
    assert!(
        moved_before_last_kill < 1000,
        "the kills happened during the move"
    );
    wait_idle(&d).await;
    let started = Instant::now();
    while d.metric("credproxy_journal_pending").await > 0.0 {
        assert!(started.elapsed() < DEADLINE, "journal never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (id, value) in &expected {
        let (store, body) = location(&d, id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("vault", &json!(value)),
            "{id}"
        );
    }
    // Exactly one copy per credential, each the one recorded: nothing orphaned.
    let mut names = vault_names(&openbao, "Production").await;
    names.sort();
    let mut want: Vec<String> = expected.keys().cloned().collect();
    want.sort();
    assert_eq!(names, want, "OpenBao holds exactly the recorded copies");
    assert_eq!(local_names(&d).await, 0, "nothing left in the local store");
}

/// Writes and token refreshes of credentials while they are being moved: each ends in the
/// new store with its newest value, and the token server never sees a replayed refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_refreshes_racing_a_move_end_with_the_newest_value() {
    let openbao = peers::openbao().await;
    let server = peers::oauth_server(2).await;
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        migration_settings(c);
        set(c, "migration", "rate", 10);
        set(c, "migration", "concurrency", 2);
        common::fast_refresh(c, "100ms");
    })
    .await;
    let plain = create_many(&d, "Production", 20).await;
    let mut oauth = Vec::new();
    for _ in 0..10 {
        let tokens = peers::oauth_grant(&server, peers::CLIENT_ID, peers::CLIENT_SECRET, 2).await;
        let (status, body) = d
            .call(
                Method::POST,
                "/v1/credentials",
                Some(peers::oauth_credential(&server, "Production", &tokens, 2)),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        oauth.push(body["id"].as_str().unwrap().to_owned());
    }
    edit_config(&d, |c| set(c, "routing", "default", "vault"));
    assert_eq!(reload(&d).await["moves_planned"], 30);

    let mut latest: BTreeMap<String, String> = plain.into_iter().collect();
    let mut round = 0;
    loop {
        round += 1;
        for (id, value) in latest.iter_mut() {
            *value = format!("v{round}");
            let (status, body) = d
                .call(
                    Method::PATCH,
                    &format!("/v1/credentials/{id}"),
                    Some(json!({"secrets": {"api_key": value.clone()}})),
                )
                .await;
            assert_eq!(status, 200, "{body}");
        }
        for id in &oauth {
            let sent = credproxy::time::now_unix_ms();
            let (_, body) = location(&d, id).await;
            let token = body["secrets"]["access_token"].as_str().unwrap();
            assert!(
                peers::oauth_token_valid_since(&server, token, sent).await,
                "round {round}"
            );
        }
        let m = migrations(&d).await;
        if m["pending"] == 0 && m["state"] == "idle" && round > 3 {
            break;
        }
        assert!(round < 500, "{m}");
    }
    wait_idle(&d).await;
    for (id, value) in &latest {
        let (store, body) = location(&d, id).await;
        assert_eq!(
            (store.as_str(), &body["secrets"]["api_key"]),
            ("vault", &json!(value))
        );
        let stored = vault_value(&openbao, &format!("credproxy/Production/{id}"))
            .await
            .unwrap();
        assert_eq!(stored["api_key"], value.as_str());
    }
    for id in &oauth {
        assert_eq!(location(&d, id).await.0, "vault");
    }
    let stats = peers::oauth_stats(&server).await;
    assert!(
        stats["token_requests"].as_u64().unwrap() >= 10,
        "refreshes happened: {stats}"
    );
    assert_eq!(stats["invalid_grant"], 0, "{stats}");
    assert_eq!(stats["reuse_detected"], 0, "{stats}");
}

/// `credproxy plan --config NEW` shows the moves a configuration would cause, next to the
/// running daemon, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_the_moves_without_touching_anything() {
    let openbao = peers::openbao().await;
    let d = Daemon::start(|c, dir| {
        c.insert(
            "secrets_manager".into(),
            toml::Value::Array(vec![vault_manager(dir, &openbao)]),
        );
        migration_settings(c);
    })
    .await;
    let prod = create_many(&d, "Production", 3).await;
    let sandbox = d.create("Sandbox", json!({"api_key": "s"})).await;
    let mut next: toml::Table =
        toml::from_str(&std::fs::read_to_string(&d.config_path).unwrap()).unwrap();
    route(&mut next, &[("Production", "vault")]);
    let next_path = d.dir.path().join("next.toml");
    std::fs::write(&next_path, toml::to_string(&next).unwrap()).unwrap();

    let out = common::run_cli(&["plan", "--config", next_path.to_str().unwrap(), "--ids"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("3 credential(s) would move"), "{text}");
    assert!(text.contains("local -> vault: 3"), "{text}");
    for (id, _) in &prod {
        assert!(text.contains(&format!("{id} local -> vault")), "{text}");
    }
    assert!(!text.contains(&sandbox));
    // Nothing moved, nothing planned in the daemon.
    for (id, _) in &prod {
        assert_eq!(location(&d, id).await.0, "local");
    }
    assert_eq!(migrations(&d).await["pending"], 0);
    assert!(vault_names(&openbao, "Production").await.is_empty());

    let same = common::run_cli(&["plan", "--config", d.config_path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&same.stdout).contains("every credential is where"));
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(&bad, "[routing]\ndefault = \"nowhere\"\n").unwrap();
    let out = common::run_cli(&["plan", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));

    // GET /v1/migrations lists ids on request once a reload plans them.
    std::fs::copy(&next_path, &d.config_path).unwrap();
    reload(&d).await;
    wait_idle(&d).await;
    let (_, status) = d.call(Method::GET, "/v1/migrations?ids=true", None).await;
    assert_eq!(status["moves"][0]["moved"], 3, "{status}");
    assert!(status["moves"][0]["ids"].is_array(), "{status}");
}
