//! Google Secret Manager (`type = "gcp"`): one secret per credential, named by
//! `names::encode`, whose versions hold the JSON object of its sensitive fields. Each write
//! adds a version with a CRC32C checksum (verified again on read); the version before the
//! previous one is destroyed, since enabled versions are billed (the previous one stays for
//! readers still holding its reference). Google has no compare-and-swap on versions.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use google_cloud_gax::error::rpc::Code;
use google_cloud_secretmanager_v1::client::SecretManagerService;
use google_cloud_secretmanager_v1::model::{replication, Replication, Secret, SecretPayload};
use serde::Deserialize;

use super::descriptor::{Descriptor, Key};
use super::{
    names, ListRequest, ManagerError, ManagerInfo, Page, PutRequest, SecretSummary, SecretsManager,
    Versioned,
};
use crate::config::{ConfigError, ManagerConfig, SecretRef};
use crate::secret::SecretFields;

/// Secret ids are at most 255 characters.
const MAX_ID: usize = 255;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcpSettings {
    pub project_id: String,
    /// A service-account JSON key; Application Default Credentials when absent.
    pub credentials: Option<SecretRef>,
    /// A private or regional endpoint, or a test server.
    pub endpoint: Option<String>,
}

/// The `gcp` type, for the table in `descriptor`.
pub static DESCRIPTOR: Descriptor = Descriptor {
    kind: "gcp",
    read_only: false,
    compare_and_swap: false,
    // Google allows 2 writes per second per secret (a quota on AddSecretVersion).
    advised_min_write_interval: Some(Duration::from_millis(500)),
    keys: &[
    Key {
        name: "project_id",
        locates: true,
        required: true,
        secret: false,
        label: "Project id",
        instructions: "The Google Cloud project that holds the secrets.",
    },
    Key {
        name: "credentials",
        locates: false,
        required: false,
        secret: true,
        label: "Service account key (optional)",
        instructions: "A service-account JSON key with roles/secretmanager.admin, as { env } or { file }; omit to use the default chain (workload identity).",
    },
    Key {
        name: "endpoint",
        locates: true,
        required: false,
        secret: false,
        label: "Endpoint (optional)",
        instructions: "A regional or Private Service Connect endpoint; omit for https://secretmanager.googleapis.com.",
    },
    ],
    check_values: |manager| parse_settings(manager).map(drop),
    build: |manager| Box::pin(GcpManager::build(manager)),
};

pub fn parse_settings(manager: &ManagerConfig) -> Result<GcpSettings, ConfigError> {
    let settings: GcpSettings = super::parse_table(manager)?;
    let valid_project = (6..=30).contains(&settings.project_id.len())
        && settings
            .project_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid_project {
        return Err(super::setting_error(
            manager,
            "project_id",
            "6-30 lowercase letters, digits or dashes",
        ));
    }
    if let Some(ep) = &settings.endpoint {
        if url::Url::parse(ep).map_or(true, |u| !matches!(u.scheme(), "https" | "http")) {
            return Err(super::setting_error(
                manager,
                "endpoint",
                "must be an http(s) URL",
            ));
        }
    }
    Ok(settings)
}

pub struct GcpManager {
    id: String,
    project: String,
    client: SecretManagerService,
}

fn classify(e: google_cloud_secretmanager_v1::Error) -> ManagerError {
    if e.is_timeout() {
        return ManagerError::Timeout;
    }
    if e.http_status_code() == Some(429) {
        return ManagerError::Throttled { retry_after: None };
    }
    match e.status().map(|s| s.code) {
        Some(Code::NotFound) => ManagerError::NotFound,
        Some(Code::PermissionDenied | Code::Unauthenticated) => {
            ManagerError::Denied("Google refused the credentials or the IAM role".into())
        }
        Some(Code::ResourceExhausted) => ManagerError::Throttled { retry_after: None },
        Some(Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Aborted) => {
            ManagerError::Transient(format!("Google Secret Manager: {e}"))
        }
        Some(Code::AlreadyExists) => ManagerError::Conflict,
        _ if e.is_transport() || e.is_io() => {
            ManagerError::Transient(format!("Google Secret Manager unreachable: {e}"))
        }
        _ => ManagerError::Permanent(format!("Google Secret Manager: {e}")),
    }
}

/// Retries a call once after a throttling answer; the daemon's store timeout bounds the wait.
async fn once_more_if_throttled<T, F, Fut>(mut call: F) -> Result<T, ManagerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ManagerError>>,
{
    match call().await {
        Err(ManagerError::Throttled { retry_after }) => {
            let wait = retry_after.unwrap_or(Duration::from_millis(500));
            tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
            call().await
        }
        other => other,
    }
}

impl GcpManager {
    pub async fn build(manager: &ManagerConfig) -> Result<Arc<dyn SecretsManager>, ConfigError> {
        let settings = parse_settings(manager)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            super::setting_error(manager, "", format!("{what}: {e}"))
        };
        let credentials = match &settings.credentials {
            Some(key) => {
                let json = manager.resolve("credentials", key)?;
                let value: serde_json::Value = serde_json::from_str(json.expose())
                    .map_err(|_| fail("credentials", &"not a service-account JSON key"))?;
                google_cloud_auth::credentials::service_account::Builder::new(value)
                    .build()
                    .map_err(|e| fail("credentials", &e))?
            }
            None => google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| fail("default credentials", &e))?,
        };
        let mut builder = SecretManagerService::builder()
            .with_credentials(credentials)
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
        if let Some(ep) = &settings.endpoint {
            builder = builder.with_endpoint(ep.trim_end_matches('/'));
        }
        let client = builder.build().await.map_err(|e| fail("client", &e))?;
        Ok(Arc::new(Self {
            id: manager.id.clone(),
            project: settings.project_id,
            client,
        }))
    }

    fn secret_path(&self, name: &str) -> Result<String, ManagerError> {
        let id = names::encode(name, MAX_ID).ok_or_else(|| {
            ManagerError::Permanent(format!("name too long for a Google secret id ({MAX_ID})"))
        })?;
        Ok(format!("projects/{}/secrets/{id}", self.project))
    }

    async fn add_version(&self, secret: &str, data: &[u8]) -> Result<String, ManagerError> {
        let payload = SecretPayload::new()
            .set_data(bytes::Bytes::copy_from_slice(data))
            .set_data_crc32c(crc32c::crc32c(data) as i64);
        let version = self
            .client
            .add_secret_version()
            .set_parent(secret)
            .set_payload(payload)
            .send()
            .await
            .map_err(classify)?;
        Ok(version
            .name
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned())
    }
}

#[async_trait]
impl SecretsManager for GcpManager {
    fn describe(&self) -> ManagerInfo {
        DESCRIPTOR.info(&self.id)
    }

    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError> {
        let path = format!(
            "{}/versions/{}",
            self.secret_path(name)?,
            version.unwrap_or("latest")
        );
        let response = once_more_if_throttled(|| async {
            self.client
                .access_secret_version()
                .set_name(path.clone())
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        let payload = response
            .payload
            .ok_or_else(|| ManagerError::Permanent("version without payload".into()))?;
        if let Some(sum) = payload.data_crc32c {
            if crc32c::crc32c(&payload.data) as i64 != sum {
                return Err(ManagerError::Transient(
                    "payload checksum mismatch (corrupted in transit)".into(),
                ));
            }
        }
        let value = SecretFields::from_json(&payload.data)
            .map_err(|e| ManagerError::Permanent(format!("stored value: {e}")))?;
        let number = response
            .name
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(Versioned {
            value,
            version: number,
            expires_in: None,
        })
    }

    async fn put(&self, request: PutRequest<'_>) -> Result<String, ManagerError> {
        let secret = self.secret_path(request.name)?;
        let data = request.value.to_json();
        let version = match self.add_version(&secret, &data).await {
            Err(ManagerError::NotFound) => {
                let id = secret.rsplit('/').next().unwrap_or_default().to_owned();
                match self
                    .client
                    .create_secret()
                    .set_parent(format!("projects/{}", self.project))
                    .set_secret_id(id)
                    .set_secret(Secret::new().set_replication(
                        Replication::new().set_automatic(replication::Automatic::new()),
                    ))
                    .send()
                    .await
                    .map_err(classify)
                {
                    // Created meanwhile by a racing first write: fine, add to it.
                    Ok(_) | Err(ManagerError::Conflict) => {}
                    Err(e) => return Err(e),
                }
                self.add_version(&secret, &data).await?
            }
            other => other?,
        };
        // Enabled versions are billed: destroy the one before the previous (which readers of
        // the previous reference may still need). Best effort; a failure only costs money.
        if let Ok(n) = version.parse::<u64>() {
            if n > 2 {
                let old = format!("{secret}/versions/{}", n - 2);
                if let Err(e) = self
                    .client
                    .destroy_secret_version()
                    .set_name(old)
                    .send()
                    .await
                {
                    tracing::debug!(store = %self.id, error = %e, "could not destroy a superseded version");
                }
            }
        }
        Ok(version)
    }

    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let path = self.secret_path(name)?;
        match self
            .client
            .delete_secret()
            .set_name(path)
            .send()
            .await
            .map_err(classify)
        {
            Ok(_) | Err(ManagerError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        let mut window = super::Window::new(&request);
        let mut token = String::new();
        loop {
            let mut call = self
                .client
                .list_secrets()
                .set_parent(format!("projects/{}", self.project))
                .set_page_size(100);
            if !token.is_empty() {
                call = call.set_page_token(token.clone());
            }
            let page = call.send().await.map_err(classify)?;
            for secret in page.secrets {
                let id = secret
                    .name
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let name = names::decode(&id).unwrap_or_else(|| id.clone());
                let full = window.offer(&name.clone(), || SecretSummary {
                    id,
                    name,
                    description: String::new(),
                    created_at: secret
                        .create_time
                        .map(|t| crate::time::from_unix(t.seconds())),
                    updated_at: None,
                });
                if let Some(page) = full {
                    return Ok(page);
                }
            }
            if page.next_page_token.is_empty() {
                return Ok(window.finish());
            }
            token = page.next_page_token;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_describes_every_key_the_settings_accept() {
        crate::manager::descriptor::assert_keys_match::<GcpSettings>(&DESCRIPTOR);
    }
}
