//! Azure Key Vault (`type = "azure"`): one secret per credential, named by `names::encode`
//! (Key Vault allows only letters, digits and dashes), whose value is the JSON object of its
//! sensitive fields. Every write makes a new version, whose id the reference records. Delete
//! is Key Vault's soft delete; with `purge_on_delete` the caller records the name and the
//! purge follows in the background, once Key Vault has finished deleting (`soft_delete`). The
//! SDK's retry policy honours `Retry-After` on 429. Authentication: a client secret of an app
//! registration, else workload identity (AKS, `AZURE_FEDERATED_TOKEN_FILE`), else the
//! instance's managed identity.
//!
//! This file holds the manager and its requests; `settings` holds what the configuration may
//! say, `credential` how the manager gets its Entra ID tokens, `failure` how a failed call is
//! read, and `soft_delete` deleted secrets: purges, recoveries, names to reclaim.

mod credential;
mod failure;
mod settings;
mod soft_delete;

pub use settings::{parse_settings, AzureSettings, DESCRIPTOR};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::http::{ClientOptions, Transport};
use azure_core::time;
use azure_security_keyvault_secrets::models::{SecretClientGetSecretOptions, SetSecretParameters};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use futures::TryStreamExt;

use super::{
    names, ListRequest, ManagerError, ManagerInfo, Page, Purge, PutRequest, SecretSummary,
    SecretsManager, Versioned,
};
use crate::config::{ConfigError, ManagerConfig};
use crate::secret::SecretFields;
use credential::{Credential, Flow};
use failure::{Failure, BEING_DELETED};

/// Key Vault secret names are 1-127 characters.
const MAX_NAME: usize = 127;
const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

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
                secret: manager.resolve("client_secret", secret)?,
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
        let credential = Arc::new(Credential::new(http.clone(), authority, flow));
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

    /// A failed SDK call as the caller's error (logged at WARN where the call was made).
    fn sdk_failed(e: azure_core::Error) -> ManagerError {
        Failure::from_sdk(e).into_error()
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
            .and_then(|r| r.into_model())
            .map_err(Self::sdk_failed)?;
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
        let secret = self.set_reclaiming(&vault_name, body).await?;
        Ok(version_of(secret.id.as_deref()))
    }

    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let vault_name = Self::vault_name(name)?;
        match self.client.delete_secret(&vault_name, None).await {
            Ok(_) => Ok(()),
            Err(e) => match Failure::from_sdk(e) {
                // Not there, or a delete of it already running: deleted either way.
                f if f.status() == Some(404) || f.is(409, BEING_DELETED) => Ok(()),
                f => Err(f.into_error()),
            },
        }
    }

    fn purges_after_delete(&self) -> bool {
        self.purge_on_delete
    }

    async fn purge_deleted(&self, name: &str) -> Result<Purge, ManagerError> {
        self.purge(&Self::vault_name(name)?).await
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        let mut pager = self
            .client
            .list_secret_properties(None)
            .map_err(Self::sdk_failed)?;
        let mut window = super::Window::new(&request);
        while let Some(props) = pager.try_next().await.map_err(Self::sdk_failed)? {
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
