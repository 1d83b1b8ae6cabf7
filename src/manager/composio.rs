//! Composio (`type = "composio"`): read-only. A credential is registered by reference to a
//! connected account; a read fetches `GET /api/v3.1/connected_accounts/{id}` (or `/api/v3/…`
//! with `api_version = "v3"`) and maps the
//! account's `state.val` to secret fields for its auth scheme. Composio refreshes its own
//! tokens: credproxy never writes, refreshes or moves anything here, and honours `expires_in`
//! so a cached token is not served past it. Masked values and accounts that are not ACTIVE are
//! errors, never handed out.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;

use super::descriptor::{Descriptor, Key};
use super::{
    ListRequest, ManagerError, ManagerInfo, Page, SecretSummary, SecretsManager, Versioned,
};
use crate::config::{ConfigError, ManagerConfig, SecretRef};
use crate::secret::{SecretFields, SecretString};

const DEFAULT_BASE_URL: &str = "https://backend.composio.dev";
/// Largest answer read; a connected account is a few KiB.
const MAX_BODY: usize = 1024 * 1024;
/// Accounts fetched per page when listing.
const LIST_PAGE: usize = 100;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComposioSettings {
    pub api_key: SecretRef,
    pub base_url: Option<String>,
    pub api_version: Option<String>,
}

/// The API versions whose connected-account routes this reads, with their path prefixes: the
/// current one first (the default).
const API_VERSIONS: [(&str, &str); 2] = [("v3.1", "/api/v3.1"), ("v3", "/api/v3")];

/// The `composio` type, for the table in `descriptor`.
pub static DESCRIPTOR: Descriptor = Descriptor {
    kind: "composio",
    read_only: true,
    compare_and_swap: false,
    advised_min_write_interval: None,
    keys: &[
    Key {
        name: "api_key",
        locates: false,
        required: true,
        secret: true,
        label: "Composio API key",
        instructions: "A project API key from the Composio dashboard (Settings, API keys), as { env } or { file }. Composio is read-only: credproxy reads connected accounts and never writes or refreshes them.",
    },
    Key {
        name: "base_url",
        locates: true,
        required: false,
        secret: false,
        label: "Base URL (optional)",
        instructions: "Defaults to https://backend.composio.dev.",
    },
    Key {
        name: "api_version",
        locates: false,
        required: false,
        secret: false,
        label: "API version (optional)",
        instructions: "`v3.1` (the default, Composio's current API) or `v3`.",
    },
    ],
    check_values: |manager| parse_settings(manager).map(drop),
    build: |manager| Box::pin(ComposioManager::build(manager)),
};

pub fn parse_settings(manager: &ManagerConfig) -> Result<ComposioSettings, ConfigError> {
    let settings: ComposioSettings = super::parse_table(manager)?;
    if let Some(url) = &settings.base_url {
        if url::Url::parse(url).map_or(true, |u| !matches!(u.scheme(), "https" | "http")) {
            return Err(super::setting_error(
                manager,
                "base_url",
                "must be an http(s) URL",
            ));
        }
    }
    if let Some(version) = &settings.api_version {
        if !API_VERSIONS.iter().any(|(v, _)| v == version) {
            return Err(super::setting_error(
                manager,
                "api_version",
                "must be `v3.1` or `v3`",
            ));
        }
    }
    Ok(settings)
}

pub struct ComposioManager {
    id: String,
    http: reqwest::Client,
    base: String,
    /// `/api/v3.1` or `/api/v3`.
    prefix: &'static str,
    api_key: SecretString,
}

impl ComposioManager {
    pub async fn build(manager: &ManagerConfig) -> Result<Arc<dyn SecretsManager>, ConfigError> {
        let settings = parse_settings(manager)?;
        let api_key = manager.resolve("api_key", &settings.api_key)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .user_agent(concat!("credproxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| super::setting_error(manager, "", format!("HTTP client: {e}")))?;
        Ok(Arc::new(Self {
            id: manager.id.clone(),
            http,
            base: settings
                .base_url
                .unwrap_or_else(|| DEFAULT_BASE_URL.into())
                .trim_end_matches('/')
                .to_owned(),
            prefix: API_VERSIONS
                .iter()
                .find(|(v, _)| Some(*v) == settings.api_version.as_deref())
                .map_or(API_VERSIONS[0].1, |(_, prefix)| prefix),
            api_key,
        }))
    }

    async fn call(&self, path_and_query: &str) -> Result<Value, ManagerError> {
        let response = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            .header("x-api-key", self.api_key.expose())
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    ManagerError::Timeout
                } else {
                    ManagerError::Transient(format!("Composio unreachable: {}", e.without_url()))
                }
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
            .map(Duration::from_secs);
        let mut response = response;
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| ManagerError::Transient(format!("Composio: {}", e.without_url())))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(ManagerError::Permanent("Composio answer too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        // Error bodies carry a message and a slug, never account secrets.
        let slug = || {
            serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["slug"].as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        match status.as_u16() {
            200 => serde_json::from_slice(&body)
                .map_err(|_| ManagerError::Permanent("Composio answered with invalid JSON".into())),
            404 => Err(ManagerError::NotFound),
            401 | 403 => Err(ManagerError::Denied(format!(
                "Composio refused the API key (HTTP {status}) {}",
                slug()
            ))),
            429 => Err(ManagerError::Throttled { retry_after }),
            s if s >= 500 => Err(ManagerError::Transient(format!("Composio HTTP {s}"))),
            s => Err(ManagerError::Permanent(format!(
                "Composio HTTP {s} {}",
                slug()
            ))),
        }
    }
}

/// The secret fields of a connected account, by auth scheme.
fn fields_of(account: &Value) -> Result<(SecretFields, Option<Duration>), ManagerError> {
    let status = account["status"].as_str().unwrap_or("UNKNOWN");
    if status != "ACTIVE" {
        return Err(ManagerError::AccountInactive(inactive(status)));
    }
    let state = &account["state"];
    let scheme = state["authScheme"]
        .as_str()
        .or_else(|| account["auth_config"]["auth_scheme"].as_str())
        .unwrap_or("");
    let val = state["val"]
        .as_object()
        .ok_or_else(|| ManagerError::Permanent("Composio account has no state.val".into()))?;
    let wanted: &[&str] = match scheme {
        "OAUTH2" => &["access_token", "token_type", "scope", "id_token"],
        "OAUTH1" => &["oauth_token", "oauth_token_secret"],
        "API_KEY" => &["api_key", "generic_api_key"],
        "BEARER_TOKEN" => &["token", "bearer_token"],
        "BASIC" | "BASIC_WITH_JWT" => &["username", "password"],
        other => {
            return Err(ManagerError::Unusable(format!(
                "Composio auth scheme `{}` is not supported",
                if other.len() <= 32 { other } else { "?" }
            )))
        }
    };
    let mut fields = SecretFields::new();
    for name in wanted {
        let Some(v) = val.get(*name).and_then(Value::as_str) else {
            continue;
        };
        let value = SecretString::new(v.to_owned());
        if value.looks_masked() {
            return Err(ManagerError::Unusable(format!(
                "Composio returned `{name}` masked; turn off secret masking for the project or use an auth config with your own OAuth app"
            )));
        }
        fields.insert(*name, value);
    }
    if fields.is_empty() {
        return Err(ManagerError::Unusable(format!(
            "the Composio account has no credential fields for scheme {scheme}"
        )));
    }
    let expires_in = match &val.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .map(Duration::from_secs);
    Ok((fields, expires_in))
}

/// Why an account that is not `ACTIVE` cannot be used, and what its user has to do. The status
/// is Composio's word, kept only if it looks like one (it reaches logs and answers).
fn inactive(status: &str) -> String {
    let status = if !status.is_empty()
        && status.len() <= 32
        && status.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
    {
        status
    } else {
        "?"
    };
    let what = match status {
        "INITIATED" | "INITIALIZING" => {
            "has not finished connecting; the user must complete the connection in Composio"
        }
        "EXPIRED" => "has expired; the user must reconnect it in Composio",
        "REVOKED" => {
            "was revoked by the user or the provider; the user must reconnect it in Composio"
        }
        "FAILED" => "failed to connect; the user must connect it again in Composio",
        "INACTIVE" => "is disabled; enable it in Composio",
        _ => "is not ACTIVE; the user must reconnect it in Composio",
    };
    format!("the Composio connected account (status {status}) {what}")
}

/// RFC 3986 unreserved characters stay as they are; everything else is escaped.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string()
}

#[async_trait]
impl SecretsManager for ComposioManager {
    fn describe(&self) -> ManagerInfo {
        DESCRIPTOR.info(&self.id)
    }

    async fn get(&self, name: &str, _version: Option<&str>) -> Result<Versioned, ManagerError> {
        let account = self
            .call(&format!(
                "{}/connected_accounts/{}",
                self.prefix,
                encode(name)
            ))
            .await?;
        let (value, expires_in) = fields_of(&account)?;
        Ok(Versioned {
            value,
            version: account["updated_at"].as_str().unwrap_or("0").to_owned(),
            expires_in,
        })
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        let mut skipped = 0;
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("{}/connected_accounts?limit={LIST_PAGE}", self.prefix);
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={}", encode(c)));
            }
            let page = self.call(&path).await?;
            for item in page["items"].as_array().into_iter().flatten() {
                let id = item["id"].as_str().unwrap_or_default();
                let toolkit = item["toolkit"]["slug"].as_str().unwrap_or_default();
                if let Some(q) = &request.query {
                    if !id.contains(q.as_str()) && !toolkit.contains(q.as_str()) {
                        continue;
                    }
                }
                if skipped < request.offset {
                    skipped += 1;
                    continue;
                }
                if items.len() == request.limit {
                    return Ok(Page { items, more: true });
                }
                let time = |k: &str| {
                    item[k]
                        .as_str()
                        .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                };
                items.push(SecretSummary {
                    id: id.to_owned(),
                    name: id.to_owned(),
                    description: format!(
                        "{toolkit} ({})",
                        item["status"].as_str().unwrap_or("UNKNOWN")
                    ),
                    created_at: time("created_at"),
                    updated_at: time("updated_at"),
                });
            }
            match page["next_cursor"].as_str() {
                Some(c) if !c.is_empty() => cursor = Some(c.to_owned()),
                _ => return Ok(Page { items, more: false }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_describes_every_key_the_settings_accept() {
        crate::manager::descriptor::assert_keys_match::<ComposioSettings>(&DESCRIPTOR);
    }
    use serde_json::json;

    fn account(status: &str, scheme: &str, val: Value) -> Value {
        json!({"id": "ca_1", "status": status, "state": {"authScheme": scheme, "val": val}})
    }

    #[test]
    fn maps_each_scheme_and_refuses_masked_or_inactive_accounts() {
        let (f, exp) = fields_of(&account(
            "ACTIVE",
            "OAUTH2",
            json!({"access_token": "at", "refresh_token": "rt", "expires_in": 3600, "status": "ACTIVE"}),
        ))
        .unwrap();
        assert_eq!(f.get("access_token").unwrap().expose(), "at");
        assert!(
            f.get("refresh_token").is_none(),
            "Composio refreshes; never handed out"
        );
        assert_eq!(exp, Some(Duration::from_secs(3600)));
        let (f, _) = fields_of(&account("ACTIVE", "API_KEY", json!({"api_key": "k"}))).unwrap();
        assert_eq!(f.get("api_key").unwrap().expose(), "k");
        let (f, _) = fields_of(&account(
            "ACTIVE",
            "BASIC",
            json!({"username": "u", "password": "p"}),
        ))
        .unwrap();
        assert_eq!(f.len(), 2);
        for masked in ["abcd...", "REDACTED", "ab****yz"] {
            let e = fields_of(&account(
                "ACTIVE",
                "OAUTH2",
                json!({"access_token": masked}),
            ))
            .unwrap_err();
            assert!(matches!(e, ManagerError::Unusable(_)), "{masked}");
            assert!(!e.to_string().contains(masked));
        }
        let e =
            fields_of(&account("EXPIRED", "OAUTH2", json!({"access_token": "at"}))).unwrap_err();
        assert!(e.to_string().contains("EXPIRED"));
        // Only a status is the account's: masked values are the project's setting.
        assert!(matches!(e, ManagerError::AccountInactive(_)));
    }

    #[test]
    fn every_inactive_status_says_what_the_user_must_do() {
        for (status, says) in [
            ("REVOKED", "revoked by the user or the provider"),
            ("EXPIRED", "expired"),
            ("INITIATED", "not finished connecting"),
            ("FAILED", "failed to connect"),
            ("INACTIVE", "disabled"),
            ("SOMETHING_NEW", "not ACTIVE"),
        ] {
            let e = fields_of(&account(status, "OAUTH2", json!({"access_token": "at"})))
                .unwrap_err()
                .to_string();
            assert!(e.contains(status) && e.contains(says), "{e}");
            assert!(!e.contains("at\""), "{e}");
        }
        // Anything that does not look like a status word stays out of the message.
        let e = fields_of(&account("x\ny <script>", "OAUTH2", json!({})))
            .unwrap_err()
            .to_string();
        assert!(e.contains("status ?") && !e.contains("script"), "{e}");
    }
}
