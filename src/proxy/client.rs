//! The HTTP clients that carry proxied calls, one per upstream (its own pool, timeouts and
//! trust), rebuilt when the upstreams or their CA files change; and how their failures are told apart for the metrics
//! and the log, never quoting the URL (it holds the secret for the `query` kind).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ProxyError;
use crate::config::{Config, ProxyConfig, Upstream};

/// Clients per integration type, for the `[proxy]` section and `ca_file` contents they were
/// built from. Every apply of a configuration (a reload, but also each control-plane change
/// through the API) brings a new `Config`; the clients, and the connections they pool, are
/// dropped only when the section or a CA file's content changed, or an upstream went.
#[derive(Default)]
pub(super) struct Clients(Mutex<Built>);

#[derive(Default)]
struct Built {
    /// The configuration last looked at: the same one again needs no comparison.
    seen: Option<Arc<Config>>,
    /// What the clients were built from: the section, and a digest of its CA files.
    from: Option<(ProxyConfig, [u8; 32])>,
    clients: HashMap<String, reqwest::Client>,
}

impl Clients {
    pub(super) fn get(
        &self,
        config: &Arc<Config>,
        upstream: &Upstream,
    ) -> Result<reqwest::Client, ProxyError> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let built = &mut *guard;
        if !built.seen.as_ref().is_some_and(|b| Arc::ptr_eq(b, config)) {
            // Once per applied configuration, not per call: the CA files are read here.
            let now = (config.proxy.clone(), ca_digest(&config.proxy));
            if built.from.as_ref() != Some(&now) {
                built.clients.clear();
                built.from = Some(now);
            }
            built.seen = Some(Arc::clone(config));
        }
        if let Some(client) = built.clients.get(&upstream.integration_type) {
            return Ok(client.clone());
        }
        let client = build(upstream).map_err(ProxyError::Client)?;
        built
            .clients
            .insert(upstream.integration_type.clone(), client.clone());
        Ok(client)
    }
}

/// A digest of every upstream's `ca_file` content (an unreadable file digests as empty: the
/// build that needs it reports it).
fn ca_digest(proxy: &ProxyConfig) -> [u8; 32] {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for upstream in &proxy.upstreams {
        if let Some(path) = &upstream.ca_file {
            let content = std::fs::read(path).unwrap_or_default();
            digest.update((content.len() as u64).to_le_bytes());
            digest.update(&content);
        }
    }
    digest.finalize().into()
}

fn build(upstream: &Upstream) -> Result<reqwest::Client, String> {
    // One TLS stack (ring) for the whole process; a no-op when already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        // A redirect goes back to the worker: following it would send the secret wherever
        // it points.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(upstream.connect_timeout)
        .timeout(upstream.timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .dns_resolver(Arc::new(Resolver));
    if is_loopback(&upstream.base_url) {
        // `HTTP_PROXY` would carry a plain-http loopback call, secret and all, over the
        // network to the proxy.
        builder = builder.no_proxy();
    }
    if let Some(path) = &upstream.ca_file {
        builder = builder.tls_certs_merge(crate::config::read_ca(path)?);
    }
    builder.build().map_err(|e| e.to_string())
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => {
            let d = d.to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

/// The system's resolver, except that names under `localhost.` are the loopback interface
/// (RFC 6761) whatever the resolver says: `{site}.localhost` upstreams work without DNS.
struct Resolver;

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().trim_end_matches('.').to_ascii_lowercase();
        Box::pin(async move {
            if host == "localhost" || host.ends_with(".localhost") {
                let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                return Ok(Box::new(std::iter::once(loopback)) as reqwest::dns::Addrs);
            }
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(Box::new(found.collect::<Vec<_>>().into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The metric kind of a failed send, and the error the worker gets.
pub(super) fn classify(e: &reqwest::Error) -> (&'static str, ProxyError) {
    if e.is_timeout() {
        ("timeout", ProxyError::Timeout)
    } else if is_tls(e) {
        (
            "tls",
            ProxyError::Unreachable("the TLS handshake failed".into()),
        )
    } else if e.is_connect() {
        ("connect", ProxyError::Unreachable("no connection".into()))
    } else if e.is_body() || e.is_request() {
        ("body", ProxyError::Unreachable("the call broke off".into()))
    } else {
        (
            "other",
            ProxyError::Unreachable("not an HTTP answer".into()),
        )
    }
}

/// Whether rustls refused the handshake somewhere down `e`'s sources (an untrusted or expired
/// certificate, a name mismatch, no common protocol): a problem of the upstream's certificate
/// or of `ca_file`, not of the network.
fn is_tls(e: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if is_rustls(s) {
            return true;
        }
        source = s.source();
    }
    false
}

/// Whether `e` is a rustls error, or an I/O error holding one (perhaps in another I/O error):
/// an I/O error's `source` skips the error it holds, so the chain alone never reaches it.
fn is_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.is::<rustls::Error>() {
        return true;
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return is_rustls(inner);
    }
    false
}

/// `e` and its sources, without the URL.
pub(super) fn chain(e: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        match s.downcast_ref::<reqwest::Error>() {
            // Its own text quotes the URL; its kind alone instead.
            Some(r) if r.url().is_some() => text.push_str(if r.is_timeout() {
                "timed out"
            } else if r.is_connect() {
                "error connecting"
            } else {
                "error sending request"
            }),
            _ => text.push_str(&s.to_string()),
        }
        source = s.source();
    }
    text
}
