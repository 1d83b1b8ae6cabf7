//! The daemon's parts put together, against a real SQLite database and local store.

use std::time::Duration;

use super::*;
use crate::service::Runtime;

#[tokio::test]
async fn a_data_directory_that_cannot_be_made_is_reported_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let config = Config::parse(&format!(
        "[store]\ndata_dir = \"{}\"",
        file.join("data").display()
    ))
    .unwrap();
    let e = build(config).await.err().unwrap().to_string();
    assert!(e.contains("cannot create the data directory"), "{e}");
    assert!(!e.contains("listen"), "{e}");
}

fn config(dir: &std::path::Path, scan_interval: &str) -> Config {
    Config::parse(&format!(
        r#"
        [server]
        socket = "{d}/api.sock"
        [store]
        data_dir = "{d}/data"
        master_key_file = "{d}/data/master.key"
        generate_master_key = true
        [oauth]
        scan_interval = "{scan_interval}"
        "#,
        d = dir.display()
    ))
    .unwrap()
}

/// A refresh (another instance changed the control plane) that waits while a reload applies a
/// new file applies that new file with the database's rows, not the file it replaced.
#[tokio::test]
async fn a_refresh_queued_behind_a_reload_keeps_the_reloaded_file() {
    let dir = tempfile::tempdir().unwrap();
    let parts = build(config(dir.path(), "10s")).await.unwrap();
    let app = assemble(parts, 0).unwrap();
    let control = Arc::clone(&app.control);
    control.refresh().await.unwrap();

    // A reload of the new file holds the lock and has not switched the runtime yet.
    let reloading = control.hold_applies().await;
    let refresh = tokio::spawn({
        let control = Arc::clone(&control);
        async move { control.refresh().await.map(|_| ()) }
    });
    // The refresh runs until it waits for the lock.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!refresh.is_finished());
    let current = control.service().runtime();
    control.service().swap_runtime(Runtime {
        config: Arc::new(config(dir.path(), "20s")),
        registry: current.registry.clone(),
        policy: current.policy.clone(),
        topology: current.topology.clone(),
        control_version: current.control_version,
    });
    drop(reloading);
    refresh.await.unwrap().unwrap();
    assert_eq!(
        control.service().runtime().config.oauth.scan_interval,
        Duration::from_secs(20),
        "the reloaded file is still in force"
    );
}
