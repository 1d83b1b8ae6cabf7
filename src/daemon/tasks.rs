//! The daemon's background tasks: the journal sweep, the purges of soft-deleted secrets, the
//! OAuth refresher, master key rotation of the local store, and the reload triggers (SIGHUP,
//! file changes).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::manager::local::{Keyring, LocalManager};
use crate::purge::Purger;
use crate::reload::Reloader;
use crate::service::Service;

/// Every second, drops cached credentials nothing may serve any more, so a secret leaves
/// memory soon after its stale limit even when no read touches it.
pub(super) async fn sweep_cache_forever(service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        service.sweep_cache();
    }
}

/// Re-records this instance every `store.heartbeat_interval` (±10 %, so a fleet deployed at
/// once does not write in bursts): rare, since a fleet of 1,000 must not write hundreds of rows
/// a second for it. While the metadata database refuses writes, every
/// [`HEARTBEAT_RETRY`](crate::service::HEARTBEAT_RETRY) instead: the first write that succeeds
/// makes the instance ready again. Leaves the fleet at shutdown.
pub(super) async fn heartbeat_forever(service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    let jittered = |service: &Service| {
        let interval = service.runtime().config.storage.fleet.heartbeat_interval;
        interval.mul_f64(0.9 + rand::random::<f64>() * 0.2)
    };
    let mut last = tokio::time::Instant::now();
    let mut interval = jittered(&service);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(crate::service::HEARTBEAT_RETRY) => {}
            _ = stop.changed() => {
                service.leave_fleet().await;
                return;
            }
        }
        if service.metadata().write_fault().is_none() && last.elapsed() < interval {
            continue;
        }
        // A failed heartbeat is retried at the next tick: two missed in a row would make the
        // fleet count this instance as gone.
        match service.heartbeat().await {
            Ok(()) => {
                last = tokio::time::Instant::now();
                interval = jittered(&service);
            }
            Err(e) => tracing::debug!(error = %e, "instance heartbeat failed; retrying"),
        }
    }
}

pub(super) async fn sweep_journal_forever(
    service: Arc<Service>,
    grace: Duration,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match service.sweep_journal(grace).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(pending = n, "journal entries still pending"),
            Err(e) => tracing::warn!(error = %e, "journal sweep failed"),
        }
        // Deleting a retiring manager's last abandoned copy empties it; the migrator only
        // prunes at the end of a pass, and with nothing left to move the next one may be an
        // hour away.
        match service.prune_retired().await {
            Ok(dropped) if !dropped.is_empty() => {
                tracing::info!(stores = ?dropped, "the journal sweep left removed managers empty; released them")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not check removed managers"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How often recorded purges are looked for when none is due within it: this instance's own
/// deletes wake it at once, another instance's are worked by that instance (this look is for
/// those whose instance died), and one due sooner is looked for when it is due. A fleet of
/// 1,000 idle instances asks 33 times a second, not 2,000.
const PURGE_SCAN_INTERVAL: Duration = Duration::from_secs(30);

/// Purges soft-deleted secrets once their manager has finished deleting them. A pass is not
/// cancelled at shutdown; each attempt is bounded by the manager timeout.
pub(super) async fn purge_forever(
    purger: Purger,
    recorded: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let wait = match purger.pass(PURGE_SCAN_INTERVAL).await {
            Ok((attempted, next_due)) => {
                if attempted > 0 {
                    tracing::debug!(attempted, "purge pass");
                }
                crate::time::wait_until_ms(next_due, Duration::from_secs(1), PURGE_SCAN_INTERVAL)
            }
            Err(e) => {
                tracing::debug!(error = %e, "purge pass failed; will retry");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = recorded.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Delivers queued events to their webhooks: at once when this instance records one, soon
/// after a pass that claimed part of a full batch, when the next retry is due, and every
/// `events.poll_interval` for events an instance that died recorded. A pass is not cancelled at shutdown; each attempt is bounded by
/// its webhook's timeout.
pub(super) async fn deliver_events_forever(
    deliverer: crate::events::webhook::Deliverer,
    recorded: Arc<tokio::sync::Notify>,
    service: Arc<Service>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let poll = service.runtime().config.events.poll_interval;
        let wait = match deliverer.pass().await {
            // After a full batch, soon again (not at once: other instances may hold those).
            Ok((true, _)) => Duration::from_millis(50),
            Ok((false, next_due)) => {
                crate::time::wait_until_ms(next_due, Duration::from_millis(50), poll)
            }
            Err(e) => {
                tracing::debug!(error = %e, "event delivery pass failed; will retry");
                poll.min(Duration::from_secs(5))
            }
        };
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = recorded.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Rebuilds the clients of managers whose access-detail files changed (a rotated Kubernetes
/// Secret, a token file Vault Agent rewrote), before a store has to refuse the old details.
pub(super) async fn renew_rotated_access_forever(
    service: Arc<Service>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let runtime = service.runtime();
        let interval = runtime.config.access_check_interval;
        let managers: Vec<_> = runtime
            .registry
            .ids()
            .filter_map(|id| runtime.registry.get(id).cloned())
            .collect();
        drop(runtime);
        for manager in managers {
            manager.renew_if_rotated().await;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The background refresher: renews tokens inside their window before any reader needs them.
pub(super) async fn refresh_tokens_forever(service: Arc<Service>, mut stop: watch::Receiver<bool>) {
    loop {
        // A pass is not cancelled at shutdown: a token answer must reach its write-back. Each
        // refresh is bounded by its timeouts.
        let next_due = match service.refresh_due().await {
            Ok((refreshed, next_due)) => {
                if refreshed > 0 {
                    tracing::debug!(refreshed, "background refresh pass");
                }
                next_due
            }
            Err(e) => {
                tracing::warn!(error = %e, "background refresh pass failed");
                None
            }
        };
        if *stop.borrow() {
            return;
        }
        // Woken for the next token due before the regular pass (a token living seconds has a
        // window of a fraction of one); never sooner than 50 ms, so a token that stays due
        // (its lease held elsewhere, say) does not spin the loop.
        let interval = service.runtime().config.oauth.scan_interval;
        let wait = crate::time::wait_until_ms(next_due, Duration::from_millis(50), interval);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

pub(super) async fn rotate_keys(service: Arc<Service>, keys: Arc<Keyring>) {
    let local = LocalManager::new(keys, Arc::clone(service.metadata()));
    match local.rotate().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            records = n,
            "re-wrapped local data keys under the current master key"
        ),
        Err(e) => tracing::error!(error = %e, "master key rotation incomplete"),
    }
}

/// SIGHUP reloads the configuration (`systemctl reload`, `kill -HUP`).
pub(super) async fn reload_on_sighup(
    reloader: Arc<Reloader>,
    mut hup: tokio::signal::unix::Signal,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            Some(()) = hup.recv() => {
                let _ = reloader.reload("SIGHUP").await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// SIGUSR1 reopens the audit file (logrotate's `postrotate`); without one it is ignored
/// rather than ending the process, which is SIGUSR1's default.
pub(super) async fn reopen_audit_on_sigusr1(
    app: Arc<crate::server::App>,
    mut usr1: tokio::signal::unix::Signal,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            Some(()) = usr1.recv() => {
                if let Some(log) = &app.audit_log {
                    log.reopen();
                    tracing::info!("SIGUSR1: audit file reopened");
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// With `reload.watch`, polls the config file and reloads when its content changes (polling
/// also sees Kubernetes' ConfigMap symlink swaps, which inotify watches on the file miss).
pub(super) async fn reload_on_change(
    reloader: Arc<Reloader>,
    config: crate::config::ReloadConfig,
    mut stop: watch::Receiver<bool>,
) {
    use sha2::Digest;
    let Some(path) = reloader.path().filter(|_| config.watch) else {
        return;
    };
    let digest = |p: &Path| {
        std::fs::read(p)
            .ok()
            .map(|bytes| sha2::Sha256::digest(&bytes))
    };
    let mut seen = digest(&path);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.watch_interval) => {}
            _ = stop.changed() => return,
        }
        let now = digest(&path);
        if now.is_some() && now != seen {
            // Remembered even if the reload fails, so a broken file is reported once.
            seen = now;
            let _ = reloader.reload("file change").await;
        }
    }
}
