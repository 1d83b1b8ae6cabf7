//! Azure Key Vault's soft delete through the daemon's socket, against the Key Vault fake in
//! `tests/common/fakes.rs` (deletes and recoveries that take time, `ObjectIsBeingDeleted`,
//! `ObjectIsDeletedButRecoverable`, missing purge and recover permissions): purges made in the
//! background once the delete has finished, also across a `kill -9`; a credential moved out of
//! Key Vault and back; and the documented error when the name can be neither recovered nor
//! purged.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fakes::{self, AzureFake};
use common::{set, Daemon, DEADLINE};
use hyper::Method;
use serde_json::{json, Value};

/// A value no log line may ever show.
const CANARY: &str = "CANARY-kv-value-5e7a";

async fn start(dir: &Path, fake: &AzureFake, purge_on_delete: bool) -> Daemon {
    let manager = fake.manager(dir, purge_on_delete);
    Daemon::start(|c, _| {
        c.insert("secrets_manager".into(), toml::Value::Array(vec![manager]));
        set(c, "cache", "ttl", "50ms");
        set(c, "cache", "stale_if_error", "0s");
        // Room for a write that waits out a delete and a recovery on a loaded machine.
        set(c, "backends", "timeout", "10s");
        set(c, "server", "request_timeout", "30s");
    })
    .await
}

/// The Key Vault name of a credential's secret in the `default` workspace.
fn vault_name(environment: &str, id: &str) -> String {
    format!("credproxy-2f{environment}-2f{}", id.replace('-', "--"))
}

async fn pin(d: &Daemon, id: &str, manager: &str, secrets: Option<Value>) -> (u16, Value) {
    let mut body = json!({"secrets_manager_id": manager});
    if let Some(s) = secrets {
        body["secrets"] = s;
    }
    d.call(Method::PATCH, &format!("/v1/credentials/{id}"), Some(body))
        .await
}

/// Waits until `done` holds of the fake's state.
async fn until(fake: &AzureFake, what: &str, done: impl Fn(&fakes::AzureState) -> bool) {
    let started = Instant::now();
    while !done(&fake.state()) {
        assert!(started.elapsed() < DEADLINE, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a metric sample, 0 when the series does not exist yet.
async fn sample(d: &Daemon, name: &str) -> f64 {
    let text = d.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn until_metric(d: &Daemon, name: &str, done: impl Fn(f64) -> bool) {
    let started = Instant::now();
    loop {
        let v = sample(d, name).await;
        if done(v) {
            return;
        }
        assert!(started.elapsed() < DEADLINE, "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The exposition, with the purge families in it, passes `promtool check metrics`.
async fn promtool_accepts(d: &Daemon) {
    let file = d.dir.path().join("metrics.txt");
    std::fs::write(&file, d.metrics_text().await).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect(
            "promtool (Debian package `prometheus`) must be installed; scripts/test.sh installs it",
        );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const PURGED: &str = r#"credproxy_store_purges_total{manager="kv",outcome="purged"}"#;
const WAITING: &str = r#"credproxy_store_purges_total{manager="kv",outcome="waiting"}"#;
const DENIED: &str = r#"credproxy_store_purges_total{manager="kv",outcome="denied"}"#;
const PENDING: &str = r#"credproxy_store_purges_pending{manager="kv"}"#;

/// With `purge_on_delete`, a delete answers as soon as Key Vault has accepted the soft delete;
/// the purge follows in the background once Key Vault has finished deleting, however long
/// that takes, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_soft_delete_is_answered_at_once_and_purged_once_it_has_finished() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::azure(dir.path()).await;
    // Deletes run until the test ends them.
    fake.state().delete_delay = Duration::from_secs(3600);
    let d = start(dir.path(), &fake, true).await;
    let id = d
        .create_pinned("Production", "kv", json!({"api_key": CANARY}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let name = vault_name("Production", &id);

    let (status, body) = d
        .call(Method::DELETE, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    assert!(
        fake.state().deleting.contains_key(&name),
        "answered while Key Vault is still deleting"
    );
    // The purger asks, and is told the delete still runs.
    until(&fake, "a purge refused while deleting", |s| {
        s.answered("DELETE", "/deletedsecrets/", 409) >= 1
    })
    .await;
    until_metric(&d, WAITING, |v| v >= 1.0).await;
    assert_eq!(sample(&d, PENDING).await, 1.0);
    assert!(!fake.state().deleted.contains_key(&name));

    fake.state().finish_deletes();
    until(&fake, "the secret purged", |s| {
        !s.deleting.contains_key(&name) && !s.deleted.contains_key(&name)
    })
    .await;
    assert_eq!(fake.state().answered("DELETE", "/deletedsecrets/", 204), 1);
    until_metric(&d, PURGED, |v| v == 1.0).await;
    until_metric(&d, PENDING, |v| v == 0.0).await;
    assert!(
        fake.state().answered("GET", "/deletedsecrets/", 200) >= 1,
        "the deleted secret was polled"
    );
    promtool_accepts(&d).await;
    let logs = d.logs();
    assert!(logs.contains("soft-deleted secret purged"), "{logs}");
    assert!(!logs.contains(CANARY));
    assert!(!logs.contains(fakes::AZURE_CLIENT_SECRET));
}

/// The purge to make is in the metadata database, so a daemon killed between the delete and
/// the purge makes it after its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_interrupted_by_kill_9_is_made_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::azure(dir.path()).await;
    fake.state().delete_delay = Duration::from_secs(3600);
    let mut d = start(dir.path(), &fake, true).await;
    let id = d
        .create_pinned("Production", "kv", json!({"api_key": CANARY}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let name = vault_name("Production", &id);
    let (status, _) = d
        .call(Method::DELETE, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 204);
    d.kill().await;
    assert!(fake.state().deleting.contains_key(&name), "not purged yet");

    let refused_before = fake.state().answered("DELETE", "/deletedsecrets/", 409);
    let d = d.restart(|_| {}).await;
    // The restarted daemon takes the purge up (and is told the delete still runs)...
    until(&fake, "the restarted daemon polling", |s| {
        s.answered("DELETE", "/deletedsecrets/", 409) > refused_before
    })
    .await;
    // ...and makes it once the delete has finished.
    fake.state().finish_deletes();
    until(&fake, "the secret purged", |s| {
        !s.deleting.contains_key(&name) && !s.deleted.contains_key(&name)
    })
    .await;
    until_metric(&d, PURGED, |v| v == 1.0).await;
    until_metric(&d, PENDING, |v| v == 0.0).await;
    assert!(!d.logs().contains(CANARY));
}

/// A credential moved out of Key Vault leaves its secret soft-deleted (no `purge_on_delete`);
/// moving it back finds the name taken by that deleted secret, recovers it (waiting out the
/// delete and the recovery, both long-running), and writes a new version on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_moved_out_of_key_vault_and_back_recovers_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::azure(dir.path()).await;
    {
        let mut s = fake.state();
        s.delete_delay = Duration::from_millis(300);
        s.recover_delay = Duration::from_millis(300);
    }
    let d = start(dir.path(), &fake, false).await;
    let created = d
        .create_pinned("Production", "kv", json!({"api_key": "first"}))
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let name = vault_name("Production", &id);
    let first_version = fake.state().secrets[&name][0].0.clone();

    let (status, body) = pin(&d, &id, "local", None).await;
    assert_eq!(
        (status, body["secrets_manager_id"].as_str()),
        (200, Some("local")),
        "{body}"
    );
    assert!(
        !fake.state().secrets.contains_key(&name),
        "moved out: soft-deleted"
    );

    // Back at once, while Key Vault may still be deleting, with a new value.
    let (status, body) = pin(&d, &id, "kv", Some(json!({"api_key": "second"}))).await;
    assert_eq!(
        (status, body["secrets_manager_id"].as_str()),
        (200, Some("kv")),
        "{body}"
    );
    let version = body["reference"]["version"].as_str().unwrap().to_owned();
    let (status, read) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(
        (status, &read["secrets"]["api_key"]),
        (200, &json!("second")),
        "{read}"
    );
    {
        let s = fake.state();
        let versions = &s.secrets[&name];
        assert_eq!(versions.len(), 2, "the recovered version and the new one");
        assert_eq!(versions[0].0, first_version, "recovered, not recreated");
        assert_eq!(versions[1].0, version);
        assert!(s.deleted.is_empty() && s.deleting.is_empty() && s.recovering.is_empty());
        assert_eq!(
            s.answered("POST", "/deletedsecrets/", 200),
            1,
            "one recovery"
        );
        assert_eq!(
            s.answered("DELETE", "/deletedsecrets/", 204),
            0,
            "nothing purged without purge_on_delete"
        );
    }
    assert!(d.logs().contains("recovered a deleted Key Vault secret"));
}

/// When Key Vault refuses both the recovery and the purge, moving back answers the
/// documented `409 store_name_unavailable`, the credential stays where it was, and a WARN
/// line names the manager and the refusals; the background purge's refusal is a warning and
/// a metric too. No value reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_can_be_neither_recovered_nor_purged_is_a_documented_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let fake = fakes::azure(dir.path()).await;
    fake.state().forbidden = ["purge", "recover"].into_iter().collect();
    let d = start(dir.path(), &fake, true).await;
    let id = d
        .create_pinned("Production", "kv", json!({"api_key": CANARY}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let name = vault_name("Production", &id);
    let (status, body) = pin(&d, &id, "local", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(fake.state().deleted.contains_key(&name));
    // The background purge is refused: counted and warned about.
    until_metric(&d, DENIED, |v| v >= 1.0).await;

    let (status, body) = pin(&d, &id, "kv", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("store_name_unavailable")),
        "{body}"
    );
    let (status, read) = d
        .call(Method::GET, &format!("/v1/credentials/{id}"), None)
        .await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["secrets_manager_id"], "local", "it stays where it was");
    assert_eq!(read["secrets"]["api_key"], CANARY);
    assert!(
        fake.state().deleted.contains_key(&name),
        "neither recovered nor purged"
    );

    let logs = d.logs();
    let warned = |needle: &str| {
        logs.lines().any(|l| {
            l.contains(" WARN ")
                && (l.contains("manager=kv") || l.contains("manager=\"kv\""))
                && l.contains(needle)
        })
    };
    assert!(
        warned("recover refused (ForbiddenByRbac); purge refused (ForbiddenByRbac)"),
        "{logs}"
    );
    assert!(warned("cannot purge a soft-deleted secret"), "{logs}");
    assert!(!logs.contains(CANARY), "no value in the log");
    assert!(!logs.contains(fakes::AZURE_CLIENT_SECRET));
    let token = fake.state().issued_token.clone().unwrap();
    assert!(!logs.contains(&token), "no token in the log");
}
