//! The Entra ID token source Key Vault calls for: which flow gets the token (client secret,
//! workload identity or managed identity), the token request itself, and its cache.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::time;
use serde::Deserialize;

use crate::secret::SecretString;

const IMDS: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// Tokens are renewed this long before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub(super) enum Flow {
    ClientSecret {
        tenant: String,
        client_id: String,
        secret: SecretString,
    },
    /// AKS workload identity: a federated token file exchanged as a client assertion.
    Workload {
        tenant: String,
        client_id: String,
        token_file: std::path::PathBuf,
    },
    ManagedIdentity {
        client_id: Option<String>,
    },
}

/// Gets and caches Entra ID tokens for Key Vault.
#[derive(Debug)]
pub(super) struct Credential {
    http: reqwest::Client,
    authority: String,
    flow: Flow,
    cached: Mutex<Option<(String, AccessToken)>>,
}

impl Credential {
    pub(super) fn new(http: reqwest::Client, authority: String, flow: Flow) -> Self {
        Self {
            http,
            authority,
            flow,
            cached: Mutex::new(None),
        }
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

fn number(v: &Option<serde_json::Value>) -> Option<i64> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        _ => None,
    }
}

fn credential_error(msg: impl Into<String>) -> azure_core::Error {
    azure_core::Error::with_message(azure_core::error::ErrorKind::Credential, msg.into())
}

#[async_trait]
impl TokenCredential for Credential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let scope = scopes.join(" ");
        let now = time::OffsetDateTime::now_utc();
        if let Some((s, token)) = self
            .cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if *s == scope && token.expires_on - TOKEN_MARGIN > now {
                return Ok(token.clone());
            }
        }
        let request = match &self.flow {
            Flow::ClientSecret {
                tenant,
                client_id,
                secret,
            } => self
                .http
                .post(format!("{}/{tenant}/oauth2/v2.0/token", self.authority))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.expose()),
                    ("scope", &scope),
                ]),
            Flow::Workload {
                tenant,
                client_id,
                token_file,
            } => {
                let assertion = std::fs::read_to_string(token_file).map_err(|e| {
                    credential_error(format!("cannot read the federated token file: {e}"))
                })?;
                self.http
                    .post(format!("{}/{tenant}/oauth2/v2.0/token", self.authority))
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("client_id", client_id),
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        ),
                        ("client_assertion", assertion.trim()),
                        ("scope", &scope),
                    ])
            }
            Flow::ManagedIdentity { client_id } => {
                let resource = scope.trim_end_matches("/.default");
                let mut query = vec![("api-version", "2018-02-01"), ("resource", resource)];
                if let Some(c) = client_id {
                    query.push(("client_id", c));
                }
                self.http.get(IMDS).header("Metadata", "true").query(&query)
            }
        };
        let response = request
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| credential_error(format!("token request failed: {}", e.without_url())))?;
        let status = response.status();
        if !status.is_success() {
            return Err(credential_error(format!(
                "the identity endpoint refused the token request (HTTP {status})"
            )));
        }
        let answer: TokenAnswer = response
            .json()
            .await
            .map_err(|_| credential_error("the identity endpoint sent no token"))?;
        let expires_on = match (number(&answer.expires_on), number(&answer.expires_in)) {
            (Some(on), _) => time::OffsetDateTime::from_unix_timestamp(on).unwrap_or(now),
            (None, Some(secs)) => now + Duration::from_secs(secs.max(0) as u64),
            (None, None) => now + Duration::from_secs(600),
        };
        let token = AccessToken::new(Secret::new(answer.access_token), expires_on);
        *self.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((scope, token.clone()));
        Ok(token)
    }
}
