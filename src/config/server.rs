//! `[server]`: the socket, the optional loopback TCP listener, and the limits every request
//! is held to (timeouts, body size, concurrency overall and per caller).

use std::path::Path;

use super::defaults::*;
use super::raw::*;
use super::*;

pub(super) fn validate(raw: RawServer, data_dir: &Path) -> Result<ServerConfig, ConfigError> {
    let socket = raw
        .socket
        .unwrap_or_else(|| data_dir.join(DEFAULT_SOCKET_NAME));
    // sun_path holds 108 bytes including the terminating NUL.
    if socket.as_os_str().len() > 107 {
        return Err(invalid("server.socket", "path is longer than 107 bytes"));
    }
    let socket_mode = match raw.socket_mode {
        None => DEFAULT_SOCKET_MODE,
        Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "server.socket_mode",
                    "expected an octal mode such as \"0660\"",
                )
            })?,
    };
    if socket_mode & 0o002 != 0 {
        return Err(invalid(
            "server.socket_mode",
            "world-writable sockets let any local user connect; use the group instead",
        ));
    }
    let positive = |key: &str, d: Option<Duration>, default: Duration| {
        let d = d.unwrap_or(default);
        if d.is_zero() {
            Err(invalid(key, "must be greater than zero"))
        } else {
            Ok(d)
        }
    };
    let tcp = match raw.tcp {
        None => None,
        Some(t) => {
            if !t.listen.ip().is_loopback() {
                return Err(ConfigError::NotLoopback {
                    key: "server.tcp.listen".into(),
                    addr: t.listen,
                });
            }
            let token_header = t
                .token_header
                .unwrap_or_else(|| DEFAULT_TOKEN_HEADER.into())
                .to_ascii_lowercase();
            if hyper::header::HeaderName::from_bytes(token_header.as_bytes()).is_err() {
                return Err(invalid(
                    "server.tcp.token_header",
                    "not a valid header name",
                ));
            }
            Some(TcpConfig {
                listen: t.listen,
                token_file: t.token_file,
                token_header,
            })
        }
    };
    let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
    if max_body_bytes < 1024 {
        return Err(invalid("server.max_body_bytes", "must be at least 1024"));
    }
    let max_concurrent_requests = raw
        .max_concurrent_requests
        .unwrap_or(DEFAULT_MAX_CONCURRENT_REQUESTS);
    if max_concurrent_requests == 0 {
        return Err(invalid(
            "server.max_concurrent_requests",
            "must be greater than zero",
        ));
    }
    // Half by default: a sidecar's one worker still has 512 requests in flight, and however
    // busy one caller gets, the other half stays for everybody else.
    let max_requests_per_caller = raw
        .max_requests_per_caller
        .unwrap_or((max_concurrent_requests / 2).max(1));
    if !(1..=max_concurrent_requests).contains(&max_requests_per_caller) {
        return Err(invalid(
            "server.max_requests_per_caller",
            "must be between 1 and server.max_concurrent_requests",
        ));
    }
    let request_timeout = positive(
        "server.request_timeout",
        raw.request_timeout,
        DEFAULT_REQUEST_TIMEOUT,
    )?;
    let body_read_timeout = positive(
        "server.body_read_timeout",
        raw.body_read_timeout,
        DEFAULT_BODY_READ_TIMEOUT.min(request_timeout),
    )?;
    if body_read_timeout > request_timeout {
        return Err(invalid(
            "server.body_read_timeout",
            "must not be longer than server.request_timeout",
        ));
    }
    // One per core by default (0), as tokio does. One thread costs less CPU per read at low
    // concurrency (no wake-ups between threads); more serve more reads at high concurrency.
    let worker_threads = raw.worker_threads.unwrap_or(0);
    if worker_threads > 1024 {
        return Err(invalid(
            "server.worker_threads",
            "must be at most 1024 (0: one per core)",
        ));
    }
    Ok(ServerConfig {
        worker_threads,
        socket,
        socket_mode,
        socket_group: raw.socket_group,
        request_timeout,
        body_read_timeout,
        max_requests_per_caller,
        header_read_timeout: positive(
            "server.header_read_timeout",
            raw.header_read_timeout,
            DEFAULT_HEADER_READ_TIMEOUT,
        )?,
        max_body_bytes,
        max_concurrent_requests,
        shutdown_grace: raw.shutdown_grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE),
        tcp,
    })
}
