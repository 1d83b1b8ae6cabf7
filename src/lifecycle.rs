//! Process lifecycle: the shutdown signal future and systemd readiness notifications.

use std::os::unix::net::UnixDatagram;

use tokio::signal::unix::{signal, SignalKind};

/// Completes on SIGTERM (how Kubernetes and systemd start a graceful stop) or SIGINT.
///
/// The handlers are installed when this is called, not when the future is first polled: the
/// daemon answers on its socket before the shutdown future is polled, and a SIGTERM arriving
/// in between would otherwise take the default action and kill it without a drain. Call it
/// inside a runtime context.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let (mut term, mut int) = match (term, int) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
        }
    }
}

/// Sends `state` (e.g. `READY=1`) to systemd when run with `Type=notify`; a no-op otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = notify(&path, state) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Sends `state` to the notification socket at `path` (`@name` for an abstract socket).
fn notify(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    if let Some(name) = path.as_encoded_bytes().strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// Tells systemd a reload started (`Type=notify-reload` wants the monotonic time with it);
/// `READY=1` ends it.
pub fn sd_notify_reloading() {
    let usec = crate::sys::monotonic_time().as_micros();
    sd_notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

#[cfg(test)]
mod tests {
    #[test]
    fn notifies_the_socket_at_the_path_systemd_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        super::notify(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("credproxy-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = std::os::unix::net::UnixDatagram::bind_addr(&addr).unwrap();
        super::notify(std::ffi::OsStr::new(&format!("@{name}")), "RELOADING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"RELOADING=1");
    }

    /// A SIGTERM that arrives after the daemon answers but before its shutdown future is first
    /// polled must start a drain, not kill the process (a sidecar stopped right after start).
    /// If the handler were installed lazily, this raise would kill the test binary.
    #[tokio::test]
    async fn the_sigterm_handler_is_installed_before_the_future_is_polled() {
        let shutdown = super::shutdown_signal();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(std::time::Duration::from_secs(30), shutdown)
            .await
            .expect("the SIGTERM was delivered to the handler");
    }
}
