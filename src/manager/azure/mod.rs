//! Azure Key Vault (`type = "azure"`): one secret per credential, named by `names::encode`
//! (Key Vault allows only letters, digits and dashes), whose value is the JSON object of its
//! sensitive fields. Every write makes a new version, whose id the reference records. Delete
//! is Key Vault's soft delete, followed by a purge when `purge_on_delete` is set. The SDK's
//! retry policy honours `Retry-After` on 429. Authentication: a client secret of an app
//! registration, else workload identity (AKS, `AZURE_FEDERATED_TOKEN_FILE`), else the
//! instance's managed identity.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientOptions, StatusCode, Transport};
use azure_core::time;
use azure_security_keyvault_secrets::models::{SecretClientGetSecretOptions, SetSecretParameters};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use futures::TryStreamExt;
use serde::Deserialize;

use super::descriptor::{Descriptor, Key};
use super::{
    names, ListRequest, ManagerError, ManagerInfo, Page, PutRequest, SecretSummary, SecretsManager,
    Versioned,
};
use crate::config::{ConfigError, ManagerConfig, SecretRef};
use crate::secret::{SecretFields, SecretString};

/// Key Vault secret names are 1-127 characters.
const MAX_NAME: usize = 127;
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
const IMDS: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// Tokens are renewed this long before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    pub vault_url: String,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretRef>,
    /// Microsoft Entra authority (sovereign clouds, tests).
    pub authority_host: Option<String>,
    /// Purge after the soft delete, so the name can be reused at once.
    #[serde(default)]
    pub purge_on_delete: bool,
    /// Extra CA certificates (PEM) to trust, for private endpoints behind a TLS proxy.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The `azure` type, for the table in `descriptor`.
pub static DESCRIPTOR: Descriptor = Descriptor {
    kind: "azure",
    read_only: false,
    compare_and_swap: false,
    advised_min_write_interval: None,
    keys: &[
    Key {
        name: "vault_url",
        required: true,
        secret: false,
        label: "Key Vault URL",
        instructions: "The vault's URI from the Azure portal overview, e.g. https://myvault.vault.azure.net.",
    },
    Key {
        name: "tenant_id",
        required: false,
        secret: false,
        label: "Tenant id (optional)",
        instructions: "The Microsoft Entra tenant of the app registration; omit with client_id and client_secret to use workload or managed identity.",
    },
    Key {
        name: "client_id",
        required: false,
        secret: false,
        label: "Client id (optional)",
        instructions: "The app registration's application (client) id, granted the Key Vault Secrets Officer role.",
    },
    Key {
        name: "client_secret",
        required: false,
        secret: true,
        label: "Client secret (optional)",
        instructions: "A client secret of that app registration, as { env } or { file }.",
    },
    Key {
        name: "authority_host",
        required: false,
        secret: false,
        label: "Authority host (optional)",
        instructions: "The Microsoft Entra authority for sovereign clouds, e.g. https://login.microsoftonline.us; defaults to https://login.microsoftonline.com.",
    },
    Key {
        name: "purge_on_delete",
        required: false,
        secret: false,
        label: "Purge on delete (optional)",
        instructions: "true to purge a deleted secret at once (needs the purge permission); otherwise Key Vault keeps it soft-deleted for its retention period.",
    },
    Key {
        name: "ca_file",
        required: false,
        secret: false,
        label: "CA file (optional)",
        instructions: "A PEM file of extra CA certificates to trust, for private endpoints behind a TLS proxy.",
    },
    ],
    check_values: |manager| parse_settings(manager).map(drop),
    build: |manager| Box::pin(AzureManager::build(manager)),
};

pub fn parse_settings(manager: &ManagerConfig) -> Result<AzureSettings, ConfigError> {
    let s: AzureSettings = super::parse_table(manager)?;
    let https = |v: &str| url::Url::parse(v).is_ok_and(|u| u.scheme() == "https");
    if !https(&s.vault_url) {
        return Err(super::setting_error(
            manager,
            "vault_url",
            "must be the vault's https URL, e.g. https://myvault.vault.azure.net",
        ));
    }
    if let Some(a) = &s.authority_host {
        if !https(a) {
            return Err(super::setting_error(
                manager,
                "authority_host",
                "must be an https URL",
            ));
        }
    }
    let secret_parts = [
        s.tenant_id.is_some(),
        s.client_id.is_some(),
        s.client_secret.is_some(),
    ];
    if s.client_secret.is_some() && secret_parts.contains(&false) {
        return Err(super::setting_error(
            manager,
            "client_secret",
            "give tenant_id, client_id and client_secret together, or none for managed identity",
        ));
    }
    Ok(s)
}

#[derive(Debug)]
enum Flow {
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
struct Credential {
    http: reqwest::Client,
    authority: String,
    flow: Flow,
    cached: Mutex<Option<(String, AccessToken)>>,
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

pub struct AzureManager {
    id: String,
    client: SecretClient,
    purge_on_delete: bool,
}

/// An HTTP client for the vault and the identity endpoint: no redirects, the extra CA if
/// configured, and names under `.localhost` resolved to loopback as RFC 6761 reserves them.
fn http_client(settings: &AzureSettings, hosts: &[&str]) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(3));
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("ca_file: {e}"))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|_| "ca_file: not PEM certificates".to_owned())?;
        builder = builder.tls_certs_merge(certs);
    }
    for host in hosts {
        if host.ends_with(".localhost") {
            builder = builder.resolve(host, SocketAddr::from(([127, 0, 0, 1], 0)));
        }
    }
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}

fn classify(e: azure_core::Error) -> ManagerError {
    use azure_core::error::ErrorKind;
    match e.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => {
            let code = error_code.clone().unwrap_or_default();
            match *status {
                StatusCode::NotFound => ManagerError::NotFound,
                StatusCode::Unauthorized | StatusCode::Forbidden => {
                    ManagerError::Denied(format!("Key Vault refused access ({code})"))
                }
                StatusCode::TooManyRequests => ManagerError::Throttled { retry_after: None },
                StatusCode::Conflict => ManagerError::Permanent(format!(
                    "Key Vault conflict ({code}): a deleted secret of that name is awaiting purge"
                )),
                s if u16::from(s) >= 500 => {
                    ManagerError::Transient(format!("Key Vault HTTP {}", u16::from(s)))
                }
                s => ManagerError::Permanent(format!("Key Vault HTTP {} ({code})", u16::from(s))),
            }
        }
        ErrorKind::Credential => ManagerError::Denied(format!("Entra ID token: {e}")),
        ErrorKind::Connection | ErrorKind::Io => {
            ManagerError::Transient(format!("Key Vault unreachable: {e}"))
        }
        _ => ManagerError::Permanent(format!("Key Vault: {e}")),
    }
}

fn host_of(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

impl AzureManager {
    pub async fn build(manager: &ManagerConfig) -> Result<Arc<dyn SecretsManager>, ConfigError> {
        let settings = parse_settings(manager)?;
        let authority = settings
            .authority_host
            .clone()
            .unwrap_or_else(|| DEFAULT_AUTHORITY.into())
            .trim_end_matches('/')
            .to_owned();
        let hosts = [host_of(&settings.vault_url), host_of(&authority)];
        let http = http_client(&settings, &[hosts[0].as_str(), hosts[1].as_str()])
            .map_err(|e| super::setting_error(manager, "", e))?;
        let flow = match (
            &settings.tenant_id,
            &settings.client_id,
            &settings.client_secret,
        ) {
            (Some(tenant), Some(client_id), Some(secret)) => Flow::ClientSecret {
                tenant: tenant.clone(),
                client_id: client_id.clone(),
                secret: secret.resolve(&format!("secrets_manager.{}.client_secret", manager.id))?,
            },
            _ => match std::env::var_os("AZURE_FEDERATED_TOKEN_FILE") {
                Some(file) => Flow::Workload {
                    tenant: settings
                        .tenant_id
                        .clone()
                        .or_else(|| std::env::var("AZURE_TENANT_ID").ok())
                        .unwrap_or_default(),
                    client_id: settings
                        .client_id
                        .clone()
                        .or_else(|| std::env::var("AZURE_CLIENT_ID").ok())
                        .unwrap_or_default(),
                    token_file: file.into(),
                },
                None => Flow::ManagedIdentity {
                    client_id: settings.client_id.clone(),
                },
            },
        };
        let credential = Arc::new(Credential {
            http: http.clone(),
            authority,
            flow,
            cached: Mutex::new(None),
        });
        let options = SecretClientOptions {
            client_options: ClientOptions {
                transport: Some(Transport::new(Arc::new(http))),
                ..Default::default()
            },
            ..Default::default()
        };
        let client = SecretClient::new(&settings.vault_url, credential, Some(options))
            .map_err(|e| super::setting_error(manager, "vault_url", e.to_string()))?;
        Ok(Arc::new(Self {
            id: manager.id.clone(),
            client,
            purge_on_delete: settings.purge_on_delete,
        }))
    }

    fn vault_name(name: &str) -> Result<String, ManagerError> {
        names::encode(name, MAX_NAME).ok_or_else(|| {
            ManagerError::Permanent(format!(
                "name too long for Key Vault ({MAX_NAME} characters)"
            ))
        })
    }
}

fn version_of(id: Option<&str>) -> String {
    id.and_then(|i| i.trim_end_matches('/').rsplit('/').next())
        .unwrap_or_default()
        .to_owned()
}

#[async_trait]
impl SecretsManager for AzureManager {
    fn describe(&self) -> ManagerInfo {
        DESCRIPTOR.info(&self.id)
    }

    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError> {
        let vault_name = Self::vault_name(name)?;
        let options = SecretClientGetSecretOptions {
            secret_version: version.map(str::to_owned),
            ..Default::default()
        };
        let secret = self
            .client
            .get_secret(&vault_name, Some(options))
            .await
            .map_err(classify)?
            .into_model()
            .map_err(classify)?;
        let value = SecretFields::from_json(secret.value.as_deref().unwrap_or("").as_bytes())
            .map_err(|e| ManagerError::Permanent(format!("stored value: {e}")))?;
        Ok(Versioned {
            value,
            version: version_of(secret.id.as_deref()),
            expires_in: None,
        })
    }

    async fn put(&self, request: PutRequest<'_>) -> Result<String, ManagerError> {
        let vault_name = Self::vault_name(request.name)?;
        let json = request.value.to_json();
        let value = String::from_utf8(json.to_vec())
            .map_err(|_| ManagerError::Permanent("value is not UTF-8".into()))?;
        let parameters = SetSecretParameters {
            value: Some(value),
            content_type: Some("application/json".into()),
            tags: Some([("managed-by".to_owned(), "credproxy".to_owned())].into()),
            ..Default::default()
        };
        let body = parameters
            .try_into()
            .map_err(|e: azure_core::Error| ManagerError::Permanent(e.to_string()))?;
        let secret = self
            .client
            .set_secret(&vault_name, body, None)
            .await
            .map_err(classify)?
            .into_model()
            .map_err(classify)?;
        Ok(version_of(secret.id.as_deref()))
    }

    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let vault_name = Self::vault_name(name)?;
        match self
            .client
            .delete_secret(&vault_name, None)
            .await
            .map_err(classify)
        {
            Ok(_) | Err(ManagerError::NotFound) => {}
            Err(e) => return Err(e),
        }
        if self.purge_on_delete {
            // The soft delete completes asynchronously; purge answers 409 until it has.
            for attempt in 0..10 {
                match self
                    .client
                    .purge_deleted_secret(&vault_name, None)
                    .await
                    .map_err(classify)
                {
                    Ok(_) | Err(ManagerError::NotFound) if attempt > 0 => return Ok(()),
                    Ok(_) => return Ok(()),
                    Err(ManagerError::NotFound) | Err(ManagerError::Permanent(_)) => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        let mut pager = self.client.list_secret_properties(None).map_err(classify)?;
        let mut window = super::Window::new(&request);
        while let Some(props) = pager.try_next().await.map_err(classify)? {
            let id = props.id.clone().unwrap_or_default();
            let vault_name = id
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let name = names::decode(&vault_name).unwrap_or_else(|| vault_name.clone());
            let attrs = props.attributes.as_ref();
            let at = |t: Option<time::OffsetDateTime>| {
                t.map(|t| crate::time::from_unix(t.unix_timestamp()))
            };
            let full = window.offer(&name.clone(), || SecretSummary {
                id: vault_name,
                name,
                description: props.content_type.clone().unwrap_or_default(),
                created_at: at(attrs.and_then(|a| a.created)),
                updated_at: at(attrs.and_then(|a| a.updated)),
            });
            if let Some(page) = full {
                return Ok(page);
            }
        }
        Ok(window.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_describes_every_key_the_settings_accept() {
        crate::manager::descriptor::assert_keys_match::<AzureSettings>(&DESCRIPTOR);
    }
}
