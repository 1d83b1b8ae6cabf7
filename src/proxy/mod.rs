//! The egress proxy: a worker names a credential and a path, credproxy applies the credential's
//! secret to the call, sends it to the upstream configured for the credential's integration
//! type (`[[proxy.upstreams]]`) and streams the answer back. The worker never holds the secret:
//! the `use` right lets it call without the `read` right that would hand the secret over.
//!
//! Owns the forwarding and the one retry after a `401` (here); the path checks (`target`), the
//! headers and the secret (`headers`), streamed bodies (`body`), the slots a call holds
//! (`slots`) and the HTTP clients per upstream (`client`).

mod body;
mod client;
mod headers;
mod slots;
pub(crate) mod target;

use std::sync::Arc;

use http::header::{HeaderName, CONTENT_LENGTH};
use http::{Method, StatusCode};
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::time::Instant;
use zeroize::Zeroizing;

pub use body::{Answer, BodyError};
pub use slots::{Scope, Slots};

use crate::access::{Action, Caller};
use crate::cache::{view, Entry};
use crate::config::{ProxyConfig, Upstream};
use crate::metrics::Metrics;
use crate::service::{Service, ServiceError};
use body::Outgoing;
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
    #[error("the request body did not arrive whole: {0}")]
    WorkerBody(String),
    #[error("too many calls through the proxy in flight")]
    Overloaded { scope: Scope },
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

/// Marks an answer as the upstream's (in the response's extensions): the server leaves its
/// status and headers as they are, where it would adjust an answer of its own.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamAnswer;

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
    clients: client::Clients,
    limits: slots::Limits,
    token_header: HeaderName,
}

impl Proxy {
    pub fn new(service: Arc<Service>, token_header: HeaderName) -> Self {
        let runtime = service.runtime();
        let metrics = Arc::clone(service.metrics());
        Self {
            limits: slots::Limits::new(runtime.config.proxy.max_concurrent),
            service,
            metrics,
            clients: client::Clients::default(),
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
            .ok_or(ProxyError::NoUpstream)?;
        let base = base_for(upstream, &entry)?;
        *seen = Some(Seen {
            host: base.host_str().unwrap_or("-").to_owned(),
            integration_type: upstream.integration_type.clone(),
        });
        let slots = self.limits.take(
            config,
            &caller,
            id,
            &upstream.integration_type,
            &self.metrics,
        )?;
        let client = self.clients.get(&runtime.config, upstream)?;
        let (parts, incoming) = request.into_parts();
        let headers = headers::request(&parts.headers, &self.token_header, &upstream.auth);
        let declared = parts.headers.contains_key(CONTENT_LENGTH);
        let mut outgoing = Outgoing::read(config, upstream, incoming, declared).await?;
        // A refused token is replaced only when the upstream gets the access token.
        let refreshable = entry.has_oauth() && upstream.auth.fields().contains(&"access_token");
        let started = Instant::now();
        let mut sent_at;
        let mut retried = false;
        let (response, applied) = loop {
            let applied = applied_secrets(upstream, &entry)?;
            let mut headers = headers.clone();
            let parameter = match headers::apply(&upstream.auth, |name| view::secret(&entry, name))
            {
                Ok(Applied::Header(name, value)) => {
                    headers.insert(name, value);
                    None
                }
                Ok(Applied::Query(name, value)) => Some((name, value)),
                Err(ApplyError::Missing(field)) => {
                    return Err(ProxyError::SecretFieldMissing(field.to_owned()))
                }
                Err(ApplyError::NotAHeader) => return Err(ProxyError::NotAHeader),
            };
            let url = target::build(
                &base,
                rest,
                parts.uri.query(),
                parameter.as_ref().map(|(n, v)| (n.as_str(), v.as_str())),
            )
            .map_err(ProxyError::InvalidPath)?;
            drop(parameter);
            let builder = client.request(parts.method.clone(), url).headers(headers);
            let (builder, replayable) = outgoing.attach(builder);
            // The whole exchange's deadline counts from this send, as the client's timeout does.
            sent_at = Instant::now();
            let response = match builder.send().await {
                Ok(r) => r,
                Err(e) => return Err(self.failed(&slots, &outgoing, id, &e)),
            };
            let refused = response.status() == StatusCode::UNAUTHORIZED;
            if refreshable && !refused {
                self.service.token_accepted(id, &entry);
            }
            if refused && retried {
                // Sent again with a fresh token and refused again: not the token's fault.
                self.service.refresh_futile(id, &entry);
            }
            if !refused || retried || !refreshable {
                break (response, applied);
            }
            // The upstream refused the token: replace it (once however many calls saw it
            // refused), then send again if the body can be.
            retried = true;
            if !self.service.refresh_rejected(id, &entry).await || !replayable {
                break (response, applied);
            }
            entry = self.service.resolve(&caller, id, Action::Use).await?.0;
            // Its metadata may have changed with its tokens; the host may not.
            if base_for(upstream, &entry)?.host_str() != base.host_str() {
                break (response, applied);
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
        let deadline = sent_at + upstream.timeout;
        answer(response, &parts.method, config, slots, &applied, deadline)
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
        // The worker's own body failed the send: its fault, not the upstream's.
        if let Some(error) = outgoing.error() {
            tracing::info!(credential = id, error = %error, "a proxied request body was refused");
            return error;
        }
        let (kind, error) = client::classify(e);
        slots.failed(kind);
        tracing::info!(
            credential = id,
            integration_type = %slots.integration_type,
            kind,
            error = %client::chain(e),
            "a call through the proxy failed"
        );
        error
    }
}

/// The upstream's answer for the worker: its status, its headers without hop-by-hop ones and
/// with any applied secret value blanked out, its body streamed under the size limit.
fn answer(
    response: reqwest::Response,
    method: &Method,
    config: &ProxyConfig,
    slots: Slots,
    applied: &[Zeroizing<String>],
    deadline: Instant,
) -> Result<Response<Answer>, ProxyError> {
    let bodiless = method == Method::HEAD
        || matches!(
            response.status(),
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    let too_large = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > config.max_body_bytes);
    if too_large && !bodiless {
        slots.failed("body");
        return Err(ProxyError::AnswerTooLarge);
    }
    let response: http::Response<reqwest::Body> = response.into();
    let (parts, inner) = response.into_parts();
    let secrets: Vec<&str> = applied.iter().map(|s| s.as_str()).collect();
    let body = Answer::new(inner, config.max_body_bytes, slots, deadline);
    let mut answer = Response::new(body);
    *answer.status_mut() = parts.status;
    *answer.headers_mut() = headers::answer(&parts.headers, &secrets);
    answer.extensions_mut().insert(UpstreamAnswer);
    Ok(answer)
}

/// The secret values `upstream`'s auth applies from `entry`, to keep them out of the answer's
/// headers (a redirect's `Location` quoting the `query` kind's parameter, say).
fn applied_secrets(
    upstream: &Upstream,
    entry: &Entry,
) -> Result<Vec<Zeroizing<String>>, ProxyError> {
    upstream
        .auth
        .secret_fields()
        .into_iter()
        .map(|f| view::secret(entry, f).ok_or_else(|| ProxyError::SecretFieldMissing(f.to_owned())))
        .collect()
}

/// The upstream's base URL for `entry`, its host labels filled from the credential's metadata.
fn base_for(upstream: &Upstream, entry: &Entry) -> Result<url::Url, ProxyError> {
    upstream
        .base_for(|key| view::metadata_string(entry, key))
        .map(std::borrow::Cow::into_owned)
        .map_err(|key| ProxyError::UpstreamUnresolved(key.to_owned()))
}
