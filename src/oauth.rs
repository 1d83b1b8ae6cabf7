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
    // RFC 6749 §5.2: an error answer is a JSON object. oauth2 would also read one from a JSON
    // array, positionally (`["Unauthorized"]` as the code), and a refusal marks a credential
    // for re-authorisation for good; so an error answer that is no object is passed on
    // without its body, which makes it a protocol error, retried.
    let transport = |request| {
        let sent = transport(request);
        async move {
            let mut answer = sent.await?;
            let object = answer
                .body()
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|b| *b == b'{');
            if answer.status() != http::StatusCode::OK && !object {
                answer.body_mut().clear();
            }
            Ok(answer)
        }
    };
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
        // A 401 whose body is no OAuth error (a gateway's page, or nothing) lands here too:
        // retried like an outage, since only the endpoint's own error code says the grant or
        // the client is refused, and that marks a credential for re-authorisation for good.
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

/// How far ahead of its expiry a token is refreshed, at most, as a share of its lifetime
/// (1/20): late enough that each token serves 92.5 % of its life or more with the jitter below
/// (at most 1.08 token requests per lifetime), early enough that the refresh (a token request
/// and a write to the store) has time to finish before the old token runs out.
const WINDOW_SHARE: i64 = 20;
/// The jitter's most, as a share of the lifetime (1/40).
const JITTER_SHARE: i64 = 40;

/// When a credential's token should be refreshed, in Unix milliseconds: `refresh_before` ahead
/// of its expiry but never more than a twentieth of its lifetime, minus a jitter fixed per
/// credential of at most `jitter` and a fortieth of the lifetime (taken from when the token was
/// stored, [`token_issued_ms`]). So a token of any lifetime, six seconds or a day, is refreshed once, late in
/// its life, and the jitter never moves a refresh into its first half.
pub fn due_at_ms(config: &OAuthConfig, record: &CredentialRecord) -> Option<i64> {
    token_due_at_ms(
        config,
        &record.id,
        record.expires_at_ms,
        token_issued_ms(record),
    )
}

/// When `record`'s token was stored, in Unix ms: its `token_at_ms`, or for rows from before
/// that was kept, when the row was last written.
pub fn token_issued_ms(record: &CredentialRecord) -> i64 {
    record
        .token_at_ms
        .unwrap_or_else(|| record.updated_at.saturating_mul(1000))
}

/// The shortest time between two refreshes of a token that lives `lifetime`: its lifetime less
/// the most it is refreshed ahead ([`due_at_ms`]).
pub fn refresh_interval(config: &OAuthConfig, lifetime: Duration) -> Duration {
    let ms = lifetime.as_millis().min(i64::MAX as u128) as i64;
    let (window, span) = ahead_ms(config, ms);
    Duration::from_millis(ms.saturating_sub(window + span).max(0) as u64)
}

/// How far ahead of expiry a token of `lifetime_ms` is refreshed, in ms: the window, and the
/// most the jitter adds to it.
fn ahead_ms(config: &OAuthConfig, lifetime_ms: i64) -> (i64, i64) {
    (
        (config.refresh_before.as_millis() as i64).min(lifetime_ms / WINDOW_SHARE),
        (config.jitter.as_millis() as i64).min(lifetime_ms / JITTER_SHARE),
    )
}

/// [`due_at_ms`] from the parts it needs, for a credential known only by its cache entry.
pub fn token_due_at_ms(
    config: &OAuthConfig,
    id: &str,
    expires_at_ms: Option<i64>,
    issued_ms: i64,
) -> Option<i64> {
    let expires_ms = expires_at_ms?;
    let lifetime_ms = expires_ms.saturating_sub(issued_ms).max(0);
    let (window, span) = ahead_ms(config, lifetime_ms);
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

    /// A credential whose token was stored at `updated_at` (Unix seconds) and expires at
    /// `expires_at_ms`.
    fn record(id: &str, updated_at: i64, expires_at_ms: i64) -> CredentialRecord {
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
            expires_at_ms: Some(expires_at_ms),
            token_at_ms: None,
            needs_reauth: false,
            row_version: 1,
            created_at: updated_at,
            updated_at,
        }
    }

    #[test]
    fn an_hour_long_token_is_due_in_its_last_minutes_with_a_stable_jitter() {
        let c = config();
        let r = record("a", 0, 3_600_000);
        let due = due_at_ms(&c, &r).unwrap();
        // refresh_before (5 min) capped at 1/20 of the hour (3 min), jitter at most 1/40 (90 s).
        assert!(
            (3_600_000 - 270_000..=3_600_000 - 180_000).contains(&due),
            "{due}"
        );
        assert_eq!(
            due_at_ms(&c, &r),
            Some(due),
            "jitter is fixed per credential"
        );
        // Different credentials spread over the jitter span.
        let spread: std::collections::BTreeSet<i64> = (0..50)
            .map(|i| due_at_ms(&c, &record(&format!("id-{i}"), 0, 3_600_000)).unwrap())
            .collect();
        assert!(spread.len() > 40);
        // A day-long token: the full five minutes and one of jitter.
        let day = due_at_ms(&c, &record("a", 0, 86_400_000)).unwrap();
        assert!(
            (86_400_000 - 360_000..=86_400_000 - 300_000).contains(&day),
            "{day}"
        );
    }

    #[test]
    fn a_six_second_token_is_due_in_its_last_half_second() {
        let c = config();
        // Stored at 100 s, expiring at 106.4 s (a six-second token issued 0.4 s into second
        // 100): the lifetime is taken as 6.4 s, the window 320 ms, the jitter at most 160 ms.
        let due = due_at_ms(&c, &record("a", 100, 106_400)).unwrap();
        assert!((106_400 - 480..=106_400 - 320).contains(&due), "{due}");
        assert_eq!(
            due_at_ms(
                &c,
                &CredentialRecord {
                    expires_at_ms: None,
                    ..record("a", 0, 0)
                }
            ),
            None
        );
    }

    #[test]
    fn a_write_that_leaves_the_token_alone_does_not_move_its_due_time() {
        let c = config();
        let stored = record("a", 0, 3_600_000);
        let due = due_at_ms(&c, &stored).unwrap();
        // Metadata changed ten seconds before expiry: the row is newer, the token is not.
        let patched = CredentialRecord {
            token_at_ms: Some(0),
            updated_at: 3_590,
            ..stored.clone()
        };
        assert_eq!(due_at_ms(&c, &patched), Some(due));
        // Without `token_at_ms` (a row from before it was kept) the row's time is all there is.
        let old_row = CredentialRecord {
            updated_at: 3_590,
            ..stored
        };
        assert!(due_at_ms(&c, &old_row).unwrap() > due);
    }

    /// Token requests per lifetime, on a fake clock: a token server that issues tokens of
    /// `lifetime_ms` (announcing `expires_in` in whole seconds, as real ones do) and answers
    /// after `latency_ms`, readers every `read_every_ms`, and the daemon's own decisions: a
    /// read at or past the due time refreshes and, if the token has run out meanwhile, waits
    /// for the new one. Returns (requests per lifetime, expired tokens handed out), the worst
    /// over many credentials (each has its own jitter).
    fn simulate(c: &OAuthConfig, lifetime_ms: i64, read_every_ms: i64) -> (f64, u32) {
        const LIFETIMES: i64 = 50;
        let latency_ms = 40;
        let mut worst = (0.0f64, 0);
        for credential in 0..20 {
            let id = format!("credential-{credential}");
            // Issued at a time that is not a whole second, as tokens are.
            let mut now = 1_700_000_000_123i64;
            let issue = |at: i64| {
                let expires_in = lifetime_ms / 1000;
                // Stored when the answer arrives, `expires_at` counted from `expires_in`.
                (at + expires_in * 1000, at)
            };
            let (mut expires, mut updated) = issue(now);
            let mut due = token_due_at_ms(c, &id, Some(expires), updated).unwrap();
            let end = now + LIFETIMES * lifetime_ms;
            let (mut requests, mut expired) = (0u32, 0u32);
            while now < end {
                now += read_every_ms;
                if now >= due {
                    requests += 1;
                    let answered = now + latency_ms;
                    if now >= expires {
                        // The read waits for the new token.
                        now = answered;
                    }
                    (expires, updated) = issue(answered);
                    due = token_due_at_ms(c, &id, Some(expires), updated).unwrap();
                }
                if now >= expires {
                    expired += 1;
                }
            }
            let per_lifetime = requests as f64 / LIFETIMES as f64;
            worst = (worst.0.max(per_lifetime), worst.1.max(expired));
        }
        worst
    }

    #[test]
    fn every_lifetime_costs_at_most_one_point_one_token_requests_and_no_expired_token() {
        // The shipped configuration: refresh_before 5 min, jitter 1 min.
        let c = config();
        for (lifetime, read_every) in [
            (6_000, 20),
            (60_000, 100),
            (300_000, 500),
            (3_600_000, 5_000),
            (86_400_000, 60_000),
        ] {
            let (per_lifetime, expired) = simulate(&c, lifetime, read_every);
            eprintln!(
                "lifetime {} s: {per_lifetime:.3} token requests per lifetime, {expired} expired tokens handed out",
                lifetime / 1000
            );
            assert!(
                per_lifetime <= 1.1,
                "lifetime {lifetime} ms: {per_lifetime}"
            );
            assert!(
                per_lifetime >= 1.0,
                "lifetime {lifetime} ms: {per_lifetime}"
            );
            assert_eq!(expired, 0, "lifetime {lifetime} ms");
        }
    }

    #[test]
    fn the_write_interval_is_the_lifetime_less_the_most_it_is_refreshed_ahead() {
        let c = config();
        assert_eq!(
            refresh_interval(&c, Duration::from_secs(3600)),
            Duration::from_secs(3600 - 180 - 60)
        );
        assert_eq!(
            refresh_interval(&c, Duration::from_secs(6)),
            Duration::from_millis(6000 - 300 - 150)
        );
        assert_eq!(refresh_interval(&c, Duration::ZERO), Duration::ZERO);
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
