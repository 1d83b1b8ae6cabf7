//! The egress proxy: a worker names a credential and a path, credproxy applies the credential's
//! secret to the call, sends it to the upstream configured for the credential's integration
//! type (`[[proxy.upstreams]]`) and streams the answer back. The worker never holds the secret:
//! the `use` right lets it call without the `read` right that would hand the secret over.
//!
//! Owns the HTTP clients per upstream (pooled connections, HTTP/2 where offered, rustls with
//! ring, no redirects), the concurrency slots, and the one retry after a `401`.

mod body;
mod headers;
pub(crate) mod target;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_LENGTH};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::{Request, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use body::{Answer, BodyError};

use crate::access::{Action, Caller};
use crate::cache::{view, Entry};
use crate::config::{ProxyConfig, Upstream};
use crate::metrics::Metrics;
use crate::service::{Service, ServiceError};
use headers::{Applied, ApplyError};

/// Why a call through the proxy was not forwarded, or failed on its way.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the path is refused: {0}")]
    InvalidPath(&'static str),
    #[error("no [[proxy.upstreams]] entry for the credential's integration type")]
    NoUpstream,
    #[error("the credential's metadata gives no host label `{0}` (a DNS label)")]
    UpstreamUnresolved(String),
    #[error("the credential has no secret field `{0}`")]
    SecretFieldMissing(String),
    #[error("the secret cannot be sent in a header (it holds a line break)")]
    NotAHeader,
    #[error("the request body is larger than proxy.max_body_bytes")]
    TooLarge,
    #[error("the request body did not arrive: {0}")]
    WorkerBody(String),
    #[error("too many calls through the proxy in flight")]
    Overloaded { per_credential: bool },
    #[error("the upstream cannot be reached: {0}")]
    Unreachable(String),
    #[error("the upstream did not answer within its timeout")]
    Timeout,
    #[error("the upstream's answer is larger than proxy.max_body_bytes")]
    AnswerTooLarge,
    #[error("the HTTP client for the upstream cannot be built: {0}")]
    Client(String),
}

/// What the audit line and the metrics name once the upstream is known.
pub struct Seen {
    pub host: String,
    pub integration_type: String,
}

/// The worker's request, as the proxy needs it.
pub struct Call<'a> {
    pub caller: Caller,
    pub id: &'a str,
    /// The path after `/v1/proxy/{id}`, as it arrived (percent-encoded).
    pub rest: &'a str,
    pub request: Request<Incoming>,
}

pub struct Proxy {
    service: Arc<Service>,
    metrics: Arc<Metrics>,
    /// Per integration type: the upstream a client was built for, and the client. A reload
    /// that changes the upstream gets a new client (and new connections).
    clients: Mutex<HashMap<String, (Upstream, reqwest::Client)>>,
    total: Arc<Semaphore>,
    per_credential: Arc<Mutex<HashMap<String, usize>>>,
    token_header: HeaderName,
}

/// A call's slots: one of `proxy.max_concurrent`, one of its credential's
/// `proxy.max_concurrent_per_credential`. Held until the answer's body ends.
pub struct Slots {
    _total: OwnedSemaphorePermit,
    per_credential: Arc<Mutex<HashMap<String, usize>>>,
    id: String,
    integration_type: String,
    metrics: Arc<Metrics>,
}

impl Slots {
    fn failed(&self, kind: &str) {
        self.metrics
            .proxy
            .upstream_errors
            .with_label_values(&[&self.integration_type, kind])
            .inc();
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.metrics.proxy.in_flight.dec();
        let mut counts = self
            .per_credential
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

/// The request body, as far as a retry is concerned.
enum Outgoing {
    /// None at all, or read whole (at most `proxy.replay_buffer_bytes`): can be sent again.
    Replayable(Option<Bytes>),
    /// Streamed as it arrives: sent once.
    Streamed(Option<body::Upload>, Arc<AtomicBool>),
}

impl Proxy {
    pub fn new(service: Arc<Service>, token_header: HeaderName) -> Self {
        let runtime = service.runtime();
        let metrics = Arc::clone(service.metrics());
        Self {
            total: Arc::new(Semaphore::new(runtime.config.proxy.max_concurrent)),
            service,
            metrics,
            clients: Mutex::new(HashMap::new()),
            per_credential: Arc::default(),
            token_header,
        }
    }

    /// Forwards `call`. `seen` is set once the upstream is known, whatever the outcome.
    pub async fn forward(
        &self,
        call: Call<'_>,
        seen: &mut Option<Seen>,
    ) -> Result<Response<Answer>, ProxyError> {
        let Call {
            caller,
            id,
            rest,
            request,
        } = call;
        // Refused before anything is looked up: no credential is read for a call that cannot go.
        target::check_path(rest).map_err(ProxyError::InvalidPath)?;
        let (mut entry, _) = self.service.resolve(&caller, id, Action::Use).await?;
        let runtime = self.service.runtime();
        let config = &runtime.config.proxy;
        let upstream = config
            .upstream(entry.integration_type())
            .ok_or(ProxyError::NoUpstream)?
            .clone();
        let base = base_for(&upstream, &entry)?;
        *seen = Some(Seen {
            host: base.host_str().unwrap_or("-").to_owned(),
            integration_type: upstream.integration_type.clone(),
        });
        let slots = self.slots(config, id, &upstream)?;
        let client = self.client(&upstream)?;
        let (parts, incoming) = request.into_parts();
        let headers = headers::request(&parts.headers, &self.token_header, &upstream.auth);
        let mut outgoing = outgoing(config, &upstream, incoming).await?;
        let started = Instant::now();
        let mut retried = false;
        let response = loop {
            let applied = match headers::apply(&upstream.auth, |name| view::secret(&entry, name)) {
                Ok(applied) => applied,
                Err(ApplyError::Missing(field)) => {
                    return Err(ProxyError::SecretFieldMissing(field.to_owned()))
                }
                Err(ApplyError::NotAHeader) => return Err(ProxyError::NotAHeader),
            };
            let mut headers = headers.clone();
            let parameter = match &applied {
                Applied::Header(name, value) => {
                    headers.insert(name.clone(), value.clone());
                    None
                }
                Applied::Query(name, value) => Some((name.as_str(), value.as_str())),
            };
            let url = target::build(&base, rest, parts.uri.query(), parameter)
                .map_err(ProxyError::InvalidPath)?;
            drop(applied);
            let mut builder = client.request(parts.method.clone(), url).headers(headers);
            let replayable = match &mut outgoing {
                Outgoing::Replayable(Some(bytes)) => {
                    builder = builder.body(bytes.clone());
                    true
                }
                Outgoing::Replayable(None) => true,
                Outgoing::Streamed(upload, _) => {
                    if let Some(upload) = upload.take() {
                        builder = builder.body(reqwest::Body::wrap(upload));
                    }
                    false
                }
            };
            let sent = builder.send().await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => return Err(self.failed(&slots, &outgoing, id, &e)),
            };
            if response.status() != http::StatusCode::UNAUTHORIZED || retried || !entry.has_oauth()
            {
                break response;
            }
            // The upstream refused the token: replace it (once however many calls saw it
            // refused), then send again if the body can be.
            retried = true;
            if !self.service.refresh_rejected(id, &entry).await || !replayable {
                break response;
            }
            entry = self.service.resolve(&caller, id, Action::Use).await?.0;
            // Its metadata may have changed with its tokens; the host may not.
            if base_for(&upstream, &entry)?.host_str() != base.host_str() {
                break response;
            }
            self.metrics
                .proxy
                .retries
                .with_label_values(&[&upstream.integration_type])
                .inc();
        };
        self.metrics
            .proxy
            .duration
            .with_label_values(&[&upstream.integration_type])
            .observe(started.elapsed().as_secs_f64());
        self.answer(response, config, slots)
    }

    fn answer(
        &self,
        response: reqwest::Response,
        config: &ProxyConfig,
        slots: Slots,
    ) -> Result<Response<Answer>, ProxyError> {
        let too_large = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > config.max_body_bytes);
        if too_large {
            slots.failed("body");
            return Err(ProxyError::AnswerTooLarge);
        }
        let response: http::Response<reqwest::Body> = response.into();
        let (parts, inner) = response.into_parts();
        let mut answer = Response::new(Answer::new(inner, config.max_body_bytes, slots));
        *answer.status_mut() = parts.status;
        *answer.headers_mut() = headers::answer(&parts.headers);
        Ok(answer)
    }

    /// The call's slots, or `Overloaded`.
    fn slots(
        &self,
        config: &ProxyConfig,
        id: &str,
        upstream: &Upstream,
    ) -> Result<Slots, ProxyError> {
        let total =
            Arc::clone(&self.total)
                .try_acquire_owned()
                .map_err(|_| ProxyError::Overloaded {
                    per_credential: false,
                })?;
        {
            let mut counts = self
                .per_credential
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(id.to_owned()).or_insert(0);
            if *n >= config.max_concurrent_per_credential {
                return Err(ProxyError::Overloaded {
                    per_credential: true,
                });
            }
            *n += 1;
        }
        self.metrics.proxy.in_flight.inc();
        Ok(Slots {
            _total: total,
            per_credential: Arc::clone(&self.per_credential),
            id: id.to_owned(),
            integration_type: upstream.integration_type.clone(),
            metrics: Arc::clone(&self.metrics),
        })
    }

    /// The client for `upstream`, built on first use and again after a reload changed it.
    fn client(&self, upstream: &Upstream) -> Result<reqwest::Client, ProxyError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((built_for, client)) = clients.get(&upstream.integration_type) {
            if built_for == upstream {
                return Ok(client.clone());
            }
        }
        let client = build_client(upstream).map_err(ProxyError::Client)?;
        // Clients of upstreams a reload removed go with their connections.
        let runtime = self.service.runtime();
        clients.retain(|t, _| runtime.config.proxy.upstream(t).is_some());
        clients.insert(
            upstream.integration_type.clone(),
            (upstream.clone(), client.clone()),
        );
        Ok(client)
    }

    /// What a failed send becomes, counted and logged (without the URL, which may carry the
    /// credential).
    fn failed(
        &self,
        slots: &Slots,
        outgoing: &Outgoing,
        id: &str,
        e: &reqwest::Error,
    ) -> ProxyError {
        if let Outgoing::Streamed(_, exceeded) = outgoing {
            if exceeded.load(std::sync::atomic::Ordering::Acquire) {
                return ProxyError::TooLarge;
            }
        }
        let (kind, error) = if e.is_timeout() {
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
        };
        slots.failed(kind);
        tracing::info!(
            credential = id,
            integration_type = %slots.integration_type,
            kind,
            error = %chain(e),
            "a call through the proxy failed"
        );
        error
    }
}

/// The upstream's base URL for `entry`, its host labels filled from the credential's metadata.
fn base_for(upstream: &Upstream, entry: &Entry) -> Result<url::Url, ProxyError> {
    upstream
        .base_for(|key| view::metadata_string(entry, key))
        .map(std::borrow::Cow::into_owned)
        .map_err(|key| ProxyError::UpstreamUnresolved(key.to_owned()))
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
fn chain(e: &reqwest::Error) -> String {
    let mut text = String::new();
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        match s.downcast_ref::<reqwest::Error>() {
            Some(r) if r.url().is_some() => {
                // `without_url` needs ownership; its text is the kind alone.
                text.push_str(if r.is_timeout() {
                    "timed out"
                } else if r.is_connect() {
                    "error connecting"
                } else {
                    "error sending request"
                });
            }
            _ => text.push_str(&s.to_string()),
        }
        source = s.source();
    }
    text
}

/// The request body: none; read whole when small enough to send twice; otherwise streamed.
async fn outgoing(
    config: &ProxyConfig,
    upstream: &Upstream,
    incoming: Incoming,
) -> Result<Outgoing, ProxyError> {
    if incoming.is_end_stream() {
        let empty = incoming.size_hint().exact() == Some(0);
        // `Content-Length: 0` is sent as such; no body at all as none.
        return Ok(Outgoing::Replayable(empty.then(Bytes::new)));
    }
    let length = incoming.size_hint().exact();
    if length.is_some_and(|n| n > config.max_body_bytes) {
        return Err(ProxyError::TooLarge);
    }
    if length.is_some_and(|n| n <= config.replay_buffer_bytes as u64) {
        let read = tokio::time::timeout(upstream.timeout, incoming.collect()).await;
        return match read {
            Ok(Ok(collected)) => Ok(Outgoing::Replayable(Some(collected.to_bytes()))),
            Ok(Err(e)) => Err(ProxyError::WorkerBody(e.to_string())),
            Err(_) => Err(ProxyError::WorkerBody("timed out".into())),
        };
    }
    let exceeded = Arc::new(AtomicBool::new(false));
    let upload = body::Upload::new(incoming, config.max_body_bytes, Arc::clone(&exceeded));
    Ok(Outgoing::Streamed(Some(upload), exceeded))
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

fn build_client(upstream: &Upstream) -> Result<reqwest::Client, String> {
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
    if let Some(path) = &upstream.ca_file {
        builder = builder.tls_certs_merge(crate::config::read_ca(path)?);
    }
    builder.build().map_err(|e| e.to_string())
}
