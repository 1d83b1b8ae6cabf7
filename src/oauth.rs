//! OAuth 2 token requests: the refresh-token and client-credentials grants (through the
//! `oauth2` crate) over an HTTP
//! client that follows no redirects and has a deadline, how a token endpoint's answers are
//! classified, when a token is due, and how long to back off after a failure. Serialising
//! refreshers and writing new tokens back is the service's job (`service::refresh`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, HttpRequest, HttpResponse, RefreshToken, RequestTokenError,
    Scope, TokenResponse, TokenUrl,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::OAuthConfig;
use crate::metadata::{ClientAuth, CredentialRecord, GrantType, OAuthDescription};
use crate::secret::SecretString;

/// Largest token response read; real ones are a few hundred bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// What a successful token request returned.
pub struct Grant {
    pub access_token: SecretString,
    /// `None` when the server did not rotate the refresh token (the old one stays valid), and
    /// always for the client-credentials grant, whose refresh tokens are not used.
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<Duration>,
}

/// Why a refresh failed. Never carries a token or a response body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OAuthError {
    /// The server answered with an OAuth error (`invalid_grant`, `invalid_client`, ...):
    /// repeating the same request cannot succeed.
    #[error("the token endpoint rejected the token request with `{code}`")]
    Rejected { code: String },
    /// Network failure, timeout, 5xx or 429: worth retrying later.
    #[error("the token endpoint is unavailable: {detail}")]
    Unavailable {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// A response that is not a token response (a proxy's HTML page, a truncated body).
    #[error("the token endpoint's answer was not a valid token response: {detail}")]
    Protocol { detail: String },
}

impl OAuthError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            OAuthError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Why the token request got no answer to parse.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

pub struct TokenClient {
    /// `None` only if the TLS stack could not be set up; every refresh then fails clearly.
    http: Option<reqwest::Client>,
}

impl TokenClient {
    pub fn new() -> Self {
        // One TLS stack (ring) for the whole process; a no-op when already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Redirects are refused: a token endpoint that redirects would have the client secret
        // and refresh token re-sent to wherever it points.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credproxy/", env!("CARGO_PKG_VERSION")))
            .build();
        if let Err(e) = &http {
            tracing::error!(error = %e, "cannot build the HTTP client for token endpoints; OAuth refresh will fail");
        }
        Self { http: http.ok() }
    }

    /// Asks the credential's token endpoint for a new access token, with `refresh_token` for
    /// the refresh-token grant (`None` for client credentials).
    pub async fn refresh(
        &self,
        oauth: &OAuthDescription,
        client_secret: Option<&SecretString>,
        refresh_token: Option<&SecretString>,
        timeout: Duration,
    ) -> Result<Grant, OAuthError> {
        let http = self.http.clone();
        exchange(
            oauth,
            client_secret,
            refresh_token,
            move |r: HttpRequest| {
                let http = http.clone();
                async move {
                    let http = http.ok_or_else(|| {
                        HttpError::Transport(
                            "no HTTP client for token endpoints (TLS set-up failed at start)"
                                .into(),
                        )
                    })?;
                    send(http, r, timeout).await
                }
            },
        )
        .await
    }
}

/// The credential's grant over `transport`, and what the answer means: `refresh` with the
/// network, the fuzz targets with a canned answer. The refresh-token grant needs
/// `refresh_token`; without one it fails before anything is sent.
pub(crate) async fn exchange<T, F>(
    oauth: &OAuthDescription,
    client_secret: Option<&SecretString>,
    refresh_token: Option<&SecretString>,
    transport: T,
) -> Result<Grant, OAuthError>
where
    T: Fn(HttpRequest) -> F,
    F: std::future::Future<Output = Result<HttpResponse, HttpError>>,
{
    let token_url = TokenUrl::new(oauth.token_url.clone()).map_err(|_| OAuthError::Protocol {
        detail: "the token URL is not a valid URL".into(),
    })?;
    let mut client = BasicClient::new(ClientId::new(oauth.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(match oauth.client_auth {
            ClientAuth::Basic => AuthType::BasicAuth,
            ClientAuth::Body => AuthType::RequestBody,
        });
    if let Some(secret) = client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose().to_owned()));
    }
    let scopes = oauth.scopes.iter().cloned().map(Scope::new);
    let extra = [("audience", &oauth.audience), ("resource", &oauth.resource)];
    let extra = extra
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.clone()?)));
    let answer = match oauth.grant {
        GrantType::RefreshToken => {
            let refresh_token = refresh_token.ok_or_else(|| OAuthError::Protocol {
                detail: "no refresh token to exchange".into(),
            })?;
            let refresh_token = RefreshToken::new(refresh_token.expose().to_owned());
            let mut request = client
                .exchange_refresh_token(&refresh_token)
                .add_scopes(scopes);
            for (name, value) in extra {
                request = request.add_extra_param(name, value);
            }
            request.request_async(&transport).await
        }
        GrantType::ClientCredentials => {
            let mut request = client.exchange_client_credentials().add_scopes(scopes);
            for (name, value) in extra {
                request = request.add_extra_param(name, value);
            }
            request.request_async(&transport).await
        }
    };
    match answer {
        Ok(token) => {
            let access_token = token.access_token().secret();
            if access_token.is_empty() {
                return Err(OAuthError::Protocol {
                    detail: "empty access_token".into(),
                });
            }
            Ok(Grant {
                access_token: SecretString::new(access_token.clone()),
                // RFC 6749 §4.4.3: a client-credentials answer should carry no refresh token;
                // one that does is not kept, since nothing would ever use it.
                refresh_token: token
                    .refresh_token()
                    .filter(|r| !r.secret().is_empty() && oauth.grant == GrantType::RefreshToken)
                    .map(|r| SecretString::new(r.secret().clone())),
                expires_in: token.expires_in(),
            })
        }
        Err(RequestTokenError::ServerResponse(e)) => Err(OAuthError::Rejected {
            code: error_code(e.error()),
        }),
        Err(RequestTokenError::Request(HttpError::Status {
            status,
            retry_after,
        })) => Err(OAuthError::Unavailable {
            detail: format!("HTTP {status}"),
            retry_after,
        }),
        Err(RequestTokenError::Request(e)) => Err(OAuthError::Unavailable {
            detail: e.to_string(),
            retry_after: None,
        }),
        // The body may hold tokens: only the JSON path of the failure is reported.
        Err(RequestTokenError::Parse(e, _body)) => Err(OAuthError::Protocol {
            detail: format!("unexpected content at `{}`", e.path()),
        }),
        Err(RequestTokenError::Other(detail)) => Err(OAuthError::Protocol { detail }),
    }
}

impl Default for TokenClient {
    fn default() -> Self {
        Self::new()
    }
}

/// The error code as the server sent it, limited to RFC 6749's character set so a hostile
/// server cannot put arbitrary text in our logs.
fn error_code(e: &BasicErrorResponseType) -> String {
    let code = e.as_ref();
    if !code.is_empty()
        && code.len() <= 64
        && code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        code.to_owned()
    } else {
        "unrecognised_error".to_owned()
    }
}

async fn send(
    http: reqwest::Client,
    request: HttpRequest,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let (parts, body) = request.into_parts();
    let response = http
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| HttpError::Transport(transport_detail(&e)))?;
    let status = response.status();
    if let Some(e) = unavailable(status, response.headers()) {
        return Err(e);
    }
    let headers = response.headers().clone();
    let mut response = response;
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| HttpError::Transport(transport_detail(&e)))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(HttpError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    let mut out = http::Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok(out)
}

/// A 5xx or 429 answer: worth retrying, after `Retry-After` seconds if the server says so.
pub(crate) fn unavailable(
    status: http::StatusCode,
    headers: &http::HeaderMap,
) -> Option<HttpError> {
    if !(status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS) {
        return None;
    }
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Some(HttpError::Status {
        status: status.as_u16(),
        retry_after,
    })
}

/// A transport failure without the URL (it names the token endpoint, which is fine, but a
/// query string could carry anything).
fn transport_detail(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else if e.is_redirect() {
        "redirect refused".into()
    } else {
        let mut detail = String::from("request failed");
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            detail = format!("request failed: {s}");
            source = s.source();
        }
        detail
    }
}

/// When a credential's token should be refreshed, in Unix milliseconds: `refresh_before` ahead
/// of its expiry, minus a jitter fixed per credential. For a token that lives less than twice
/// `refresh_before` (its lifetime is taken from when the row was last written), the window is
/// half its lifetime instead, so a short-lived token is not refreshed the moment it is issued.
pub fn due_at_ms(config: &OAuthConfig, record: &CredentialRecord) -> Option<i64> {
    token_due_at_ms(config, &record.id, record.expires_at, record.updated_at)
}

/// [`due_at_ms`] from the parts it needs, for a credential known only by its cache entry.
pub fn token_due_at_ms(
    config: &OAuthConfig,
    id: &str,
    expires_at: Option<i64>,
    updated_at: i64,
) -> Option<i64> {
    let expires_ms = expires_at?.saturating_mul(1000);
    let lifetime_ms = expires_at?
        .saturating_sub(updated_at)
        .max(0)
        .saturating_mul(1000);
    let window = (config.refresh_before.as_millis() as i64).min(lifetime_ms / 2);
    let span = (config.jitter.as_millis() as i64).min(lifetime_ms / 4);
    let jitter = if span > 0 {
        let digest = Sha256::digest(id.as_bytes());
        let n = u64::from_be_bytes(digest[..8].try_into().unwrap_or([0; 8]));
        (n % (span as u64 + 1)) as i64
    } else {
        0
    };
    Some(expires_ms.saturating_sub(window).saturating_sub(jitter))
}

/// Per-credential exponential back-off after failed refreshes, so a broken token endpoint is
/// not hammered by readers or by the background refresher.
pub struct Backoff {
    entries: Mutex<HashMap<String, (u32, Instant)>>,
}

impl Backoff {
    pub fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Records a failure; returns how long to wait before the next attempt.
    pub fn failed(
        &self,
        config: &OAuthConfig,
        id: &str,
        retry_after: Option<Duration>,
    ) -> Duration {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let failures = entries.get(id).map(|e| e.0).unwrap_or(0).saturating_add(1);
        let jittered = crate::time::backoff(config.retry_min, config.retry_max, failures);
        let wait = retry_after
            .map(|r| r.min(config.retry_max))
            .unwrap_or(Duration::ZERO)
            .max(jittered);
        entries.insert(id.to_owned(), (failures, Instant::now() + wait));
        wait
    }

    pub fn succeeded(&self, id: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// How long `id` must still wait, if it is backing off.
    pub fn remaining(&self, id: &str) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (_, until) = entries.get(id)?;
        let now = Instant::now();
        (*until > now).then(|| *until - now)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::Location;

    fn config() -> OAuthConfig {
        OAuthConfig {
            refresh_before: Duration::from_secs(300),
            jitter: Duration::from_secs(60),
            max_concurrent: 4,
            timeout: Duration::from_secs(10),
            scan_interval: Duration::from_secs(15),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }

    fn record(id: &str, updated_at: i64, expires_at: i64) -> CredentialRecord {
        CredentialRecord {
            id: id.into(),
            workspace: "default".into(),
            environment: "Production".into(),
            integration_type: "github".into(),
            metadata: Default::default(),
            oauth: None,
            pinned_manager: None,
            location: Location {
                manager_id: "local".into(),
                name: String::new(),
                version: None,
            },
            expires_at: Some(expires_at),
            needs_reauth: false,
            row_version: 1,
            created_at: updated_at,
            updated_at,
        }
    }

    #[test]
    fn due_time_has_a_window_and_a_stable_jitter() {
        let c = config();
        let r = record("a", 0, 3600);
        let due = due_at_ms(&c, &r).unwrap();
        assert!(
            (3_600_000 - 360_000..=3_600_000 - 300_000).contains(&due),
            "{due}"
        );
        assert_eq!(
            due_at_ms(&c, &r),
            Some(due),
            "jitter is fixed per credential"
        );
        // Different credentials spread over the jitter span.
        let spread: std::collections::BTreeSet<i64> = (0..50)
            .map(|i| due_at_ms(&c, &record(&format!("id-{i}"), 0, 3600)).unwrap())
            .collect();
        assert!(spread.len() > 40);
    }

    #[test]
    fn short_lived_tokens_refresh_at_half_their_lifetime() {
        let c = config();
        let due = due_at_ms(&c, &record("a", 100, 102)).unwrap();
        // 2-second token: window 1 s, jitter at most 0.5 s.
        assert!((100_500..=101_000).contains(&due), "{due}");
        assert_eq!(
            due_at_ms(
                &c,
                &CredentialRecord {
                    expires_at: None,
                    ..record("a", 0, 0)
                }
            ),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_and_resets() {
        let c = config();
        let b = Backoff::new();
        assert!(b.remaining("x").is_none());
        let first = b.failed(&c, "x", None);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        let mut last = first;
        for _ in 0..12 {
            last = b.failed(&c, "x", None);
        }
        assert!(last >= Duration::from_secs(150) && last <= c.retry_max);
        assert!(b.remaining("x").is_some());
        assert!(b.failed(&c, "y", Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        b.succeeded("x");
        assert!(b.remaining("x").is_none());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(b.remaining("y").is_none());
    }
}
