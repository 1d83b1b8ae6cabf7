//! The floor under credproxy's cached read: an HTTP/1.1 server on the same runtime, hyper
//! settings and Unix socket that answers every request with a fixed body the size of a cached
//! credential, and does nothing else (no routing, access check, cache, metrics or audit line).
//! `scripts/bench.sh floor` measures it exactly as it measures the daemon, so the difference
//! between the two rows is what credproxy itself costs per read.
//!
//!     cargo run --release --example http_floor -- /tmp/floor.sock

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

/// A cached read's answer of the bench's credential, with its secrets replaced.
const BODY: &[u8] = br#"{"id":"0c4f6b0e-8b5e-4a43-9d3c-2f1d7b9e6a01","workspace":"default","environment":"Production","integration_type":"github","metadata":{"account":"acme-1"},"secrets":{"access_token":"xxx_0123456789abcdef0123456789abcdef0123","refresh_token":"xxx_0123456789abcdef0123456789abcdef0123"},"expires_at":null,"needs_reauth":false,"version":1,"created_at":"2026-11-30T05:00:00Z","updated_at":"2026-11-30T05:00:00Z","manager_id":"local"}"#;

fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: http_floor SOCKET-PATH"))?;
    // As the daemon's `server.worker_threads = 0`: one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(path))
}

async fn serve(path: String) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let service = service_fn(|_request| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .header("cache-status", "credproxy; hit")
                    .body(Full::new(Bytes::from_static(BODY)))
                    .expect("a valid response"),
            )
        });
        // The daemon's connection settings (server::serve_connection).
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .half_close(true)
            .header_read_timeout(std::time::Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        tokio::spawn(connection);
    }
}
