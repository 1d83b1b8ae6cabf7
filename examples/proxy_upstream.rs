//! A minimal fast upstream for the egress proxy's benchmark: an HTTP/1.1 server on 127.0.0.1
//! (the daemon's runtime, as examples/http_floor.rs) that answers every request, whatever its
//! method, path or headers, 200 with a fixed JSON body of about 200 bytes, and does nothing
//! else. `scripts/bench.sh proxy` measures it directly and through `/v1/proxy/{id}/...` with
//! the same client in the same run, so the difference between the two rows is what the proxy
//! adds per call. It never closes an idle keep-alive connection (no header read timeout), so
//! the connections the benchmark sees closed are the ones the daemon closed.
//!
//! PORT 0 picks a free port. Either way the first line on stdout is `listening on ADDR`.
//! With `--tls CA-PATH` it serves HTTPS (HTTP/1.1 only, by ALPN) with a certificate for
//! `localhost` and `127.0.0.1` signed by a CA generated at start, whose PEM is written to
//! CA-PATH (the upstream's `ca_file`; `--cacert` for curl and oha). With `--bearer TOKEN` a
//! request without `Authorization: Bearer TOKEN` is answered 401 instead, so a benchmark whose
//! every answer is 200 has had the credential applied to every call.
//!
//!     cargo run --release --example proxy_upstream -- 0
//!     cargo run --release --example proxy_upstream -- 8443 --tls /tmp/upstream-ca.pem --bearer t0k3n

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// An API's small JSON answer (197 bytes).
const BODY: &[u8] = br#"{"id":"0c4f6b0e-8b5e-4a43-9d3c-2f1d7b9e6a01","object":"contact","properties":{"email":"ada@example.com","firstname":"Ada","lastname":"Lovelace"},"archived":false,"updatedAt":"2026-11-30T05:00:00Z"}"#;

/// The answer to a request without the expected bearer token (`--bearer`).
const UNAUTHORISED: &[u8] = br#"{"error":"invalid_token"}"#;

const USAGE: &str = "usage: proxy_upstream PORT [--tls CA-PATH] [--bearer TOKEN]";

fn main() -> std::io::Result<()> {
    let usage = || std::io::Error::other(USAGE);
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).ok_or_else(usage)?;
    let (mut tls, mut bearer) = (None, None);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(usage)?;
        match flag.as_str() {
            "--tls" => tls = Some(value),
            "--bearer" => bearer = Some(format!("Bearer {value}")),
            _ => return Err(usage()),
        }
    }
    // As the daemon's `server.worker_threads = 0`: one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(port, tls, bearer.map(Arc::<str>::from)))
}

async fn serve(port: u16, tls: Option<String>, bearer: Option<Arc<str>>) -> std::io::Result<()> {
    let acceptor = match tls {
        Some(path) => Some(TlsAcceptor::from(tls_config(&path)?)),
        None => None,
    };
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on {}", listener.local_addr()?)?;
    stdout.flush()?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let acceptor = acceptor.clone();
        let bearer = bearer.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let authorised = bearer.as_deref().is_none_or(|expected| {
                    request
                        .headers()
                        .get(header::AUTHORIZATION)
                        .map(|v| v.as_bytes())
                        == Some(expected.as_bytes())
                });
                async move {
                    let (status, body) = if authorised {
                        (StatusCode::OK, BODY)
                    } else {
                        (StatusCode::UNAUTHORIZED, UNAUTHORISED)
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(body)))
                            .expect("a valid response"),
                    )
                }
            });
            // No timer, so no header read timeout (hyper's default is 30 s with a timer): an
            // idle pooled connection stays open until its client closes it.
            let mut builder = http1::Builder::new();
            builder.half_close(true);
            let _ = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(stream) => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                    Err(_) => return,
                },
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                }
            };
        });
    }
}

/// A CA made now, its PEM written to `ca_path`, and a server certificate it signed for
/// `localhost` and `127.0.0.1`.
fn tls_config(ca_path: &str) -> std::io::Result<Arc<rustls::ServerConfig>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_key = rcgen::KeyPair::generate().map_err(std::io::Error::other)?;
    let mut ca_params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(std::io::Error::other)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "proxy_upstream bench CA");
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(std::io::Error::other)?;
    std::fs::write(ca_path, ca.pem())?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().map_err(std::io::Error::other)?;
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(std::io::Error::other)?
            .signed_by(&key, &issuer)
            .map_err(std::io::Error::other)?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(std::io::Error::other)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
