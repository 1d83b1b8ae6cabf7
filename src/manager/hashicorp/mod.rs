//! HashiCorp Vault and OpenBao (`type = "hashicorp"`), KV v2 by default (KV v1 supported).
//! Writes use KV v2 check-and-set on the version read, so a concurrent writer is detected;
//! the reference records the KV version. Authentication (token, or AppRole with renewal and
//! re-login) runs in a background task, never on the request path.
//!
//! This file holds the manager and its requests; `settings` holds what the configuration may
//! say and `auth` how the manager gets and keeps its token.

mod auth;
mod settings;

pub use settings::{parse_settings, AppRoleSettings, HashicorpSettings, DESCRIPTOR};

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use tokio::sync::Notify;
use vaultrs::api::kv2::requests::{ReadSecretRequest, SetSecretRequest, SetSecretRequestOptions};
use vaultrs::client::VaultClient;
use vaultrs::error::ClientError;

use super::{
    ListRequest, ManagerError, ManagerInfo, Page, PutRequest, SecretSummary, SecretsManager,
    Versioned,
};
use crate::config::{ConfigError, ManagerConfig};
use crate::secret::{SecretFields, SecretString};
use auth::{auth_loop, make_client, Auth};

/// Most folders one listing request walks: a bound on the LIST calls a single API request
/// can cause.
const LIST_FOLDER_LIMIT: usize = 10_000;

pub struct HashicorpManager {
    id: String,
    settings: HashicorpSettings,
    auth: Auth,
    client: ArcSwap<VaultClient>,
    /// Wakes the auth task early: a request was refused with 403 (a revoked or expired token).
    relogin: Arc<Notify>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for HashicorpManager {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

fn classify(e: ClientError) -> ManagerError {
    match e {
        ClientError::APIError { code: 404, .. } => ManagerError::NotFound,
        ClientError::APIError { code, errors }
            if code == 400 && errors.iter().any(|m| m.contains("check-and-set")) =>
        {
            ManagerError::Conflict
        }
        ClientError::APIError {
            code: 401 | 403, ..
        } => ManagerError::Denied("Vault refused the token".into()),
        ClientError::APIError { code: 429, .. } => ManagerError::Throttled { retry_after: None },
        ClientError::APIError { code, .. } if code >= 500 => {
            ManagerError::Transient(format!("Vault answered {code}"))
        }
        ClientError::APIError { code, .. } => {
            ManagerError::Permanent(format!("Vault answered {code}"))
        }
        ClientError::RestClientError { .. } => ManagerError::Transient("cannot reach Vault".into()),
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
            ManagerError::NotFound
        }
        other => ManagerError::Permanent(format!("Vault client error: {other}")),
    }
}

impl HashicorpManager {
    /// The keys of one folder of the mount, sorted; subfolders end with `/`.
    async fn list_folder(
        &self,
        client: &VaultClient,
        folder: &str,
    ) -> Result<Vec<String>, ManagerError> {
        let keys = if self.settings.kv_version == 1 {
            vaultrs::kv1::list(client, self.mount(), folder)
                .await
                .map(|r| r.data.keys)
        } else {
            vaultrs::kv2::list(client, self.mount(), folder).await
        };
        let mut keys = match keys.map_err(classify) {
            Ok(k) => k,
            Err(ManagerError::NotFound) => Vec::new(),
            Err(e) => return Err(self.after_error(e)),
        };
        keys.sort();
        Ok(keys)
    }

    pub async fn build(manager: &ManagerConfig) -> Result<Arc<dyn SecretsManager>, ConfigError> {
        // reqwest is built without a default crypto provider; this one is ring. Installing
        // twice is harmless (the first wins).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let settings = parse_settings(manager)?;
        let auth = match (&settings.token, &settings.approle) {
            (Some(token), _) => Auth::Token(manager.resolve("token", token)?),
            (_, Some(a)) => Auth::AppRole {
                role_id: manager.resolve("approle.role_id", &a.role_id)?,
                secret_id: manager.resolve("approle.secret_id", &a.secret_id)?,
                mount: a.mount.clone(),
            },
            _ => unreachable!("parse_settings requires one"),
        };
        let initial = match &auth {
            Auth::Token(t) => t.clone(),
            Auth::AppRole { .. } => SecretString::from(""),
        };
        let client = make_client(&settings, &initial)
            .map_err(|e| super::setting_error(manager, "address", e.to_string()))?;
        let backend = Arc::new(HashicorpManager {
            id: manager.id.clone(),
            settings,
            auth,
            client: ArcSwap::from_pointee(client),
            relogin: Arc::new(Notify::new()),
            task: std::sync::Mutex::new(None),
        });
        if matches!(backend.auth, Auth::AppRole { .. }) {
            // One attempt now so the first requests find a token; failures are retried in
            // the background instead of stopping the daemon.
            if let Err(e) = backend.login().await {
                tracing::warn!(manager = %backend.id, error = %e, "Vault AppRole login failed; retrying in the background");
            }
        }
        let task = tokio::spawn(auth_loop(
            Arc::downgrade(&backend),
            Arc::clone(&backend.relogin),
        ));
        *backend.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(backend)
    }

    fn mount(&self) -> &str {
        &self.settings.mount
    }
}

fn fields_from_value(data: serde_json::Value) -> Result<SecretFields, ManagerError> {
    let serde_json::Value::Object(map) = data else {
        return Err(ManagerError::Permanent(
            "Vault secret data is not an object".into(),
        ));
    };
    let mut fields = SecretFields::new();
    for (k, v) in map {
        match v {
            serde_json::Value::String(s) => fields.insert(k, SecretString::new(s)),
            _ => {
                return Err(ManagerError::Permanent(
                    "Vault secret has a non-string field".into(),
                ))
            }
        }
    }
    Ok(fields)
}

fn value_from_fields(fields: &SecretFields) -> HashMap<&str, &str> {
    // Exposed on purpose: this is the payload written to Vault.
    fields.iter().map(|(k, v)| (k, v.expose())).collect()
}

#[async_trait]
impl SecretsManager for HashicorpManager {
    /// Looks the token up: proves it is valid whatever paths its policy grants (listing the
    /// mount's root may be denied to a policy scoped to the prefix).
    async fn probe(&self) -> Result<(), ManagerError> {
        let client = self.client.load_full();
        vaultrs::token::lookup_self(&*client)
            .await
            .map(drop)
            .map_err(|e| self.after_error(classify(e)))
    }

    fn describe(&self) -> ManagerInfo {
        let mut info = DESCRIPTOR.info(&self.id);
        // KV v1 has no versions to compare.
        info.capabilities.compare_and_swap = self.settings.kv_version == 2;
        info
    }

    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError> {
        let client = self.client.load_full();
        if self.settings.kv_version == 1 {
            let data: serde_json::Value = vaultrs::kv1::get(&*client, self.mount(), name)
                .await
                .map_err(|e| self.after_error(classify(e)))?;
            return Ok(Versioned {
                value: fields_from_value(data)?,
                version: "1".into(),
                expires_in: None,
            });
        }
        let version = version
            .map(|v| v.parse::<u64>().map_err(|_| ManagerError::NotFound))
            .transpose()?;
        let endpoint = ReadSecretRequest::builder()
            .mount(self.mount())
            .path(name)
            .version(version)
            .build()
            .map_err(|e| ManagerError::Permanent(e.to_string()))?;
        let response = vaultrs::api::exec_with_result(&*client, endpoint)
            .await
            .map_err(|e| self.after_error(classify(e)))?;
        Ok(Versioned {
            value: fields_from_value(response.data)?,
            version: response.metadata.version.to_string(),
            expires_in: None,
        })
    }

    async fn put(&self, request: PutRequest<'_>) -> Result<String, ManagerError> {
        let client = self.client.load_full();
        let data = value_from_fields(request.value);
        if self.settings.kv_version == 1 {
            vaultrs::kv1::set(&*client, self.mount(), request.name, &data)
                .await
                .map_err(|e| self.after_error(classify(e)))?;
            return Ok("1".into());
        }
        let payload =
            serde_json::to_value(&data).map_err(|e| ManagerError::Permanent(e.to_string()))?;
        let mut builder = SetSecretRequest::builder();
        builder.mount(self.mount()).path(request.name).data(payload);
        if let Some(expected) = request.expected_version {
            let cas = expected
                .parse::<u32>()
                .map_err(|_| ManagerError::Conflict)?;
            builder.options(SetSecretRequestOptions { cas });
        }
        let endpoint = builder
            .build()
            .map_err(|e| ManagerError::Permanent(e.to_string()))?;
        let written = vaultrs::api::exec_with_result(&*client, endpoint)
            .await
            .map_err(|e| self.after_error(classify(e)))?;
        Ok(written.version.to_string())
    }

    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let client = self.client.load_full();
        let result = if self.settings.kv_version == 1 {
            vaultrs::kv1::delete(&*client, self.mount(), name).await
        } else {
            vaultrs::kv2::delete_metadata(&*client, self.mount(), name).await
        };
        match result.map_err(classify) {
            Ok(()) | Err(ManagerError::NotFound) => Ok(()),
            Err(e) => Err(self.after_error(e)),
        }
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        let client = self.client.load_full();
        // LIST answers one folder at a time. Walked depth-first with each folder's keys
        // sorted, the full names come out sorted (everything in `a/` starts with `a/`), so
        // the walk stops as soon as it meets one match past the page: that one says "more".
        struct Folder {
            path: String,
            keys: Vec<String>,
            next: usize,
        }
        let mut stack = vec![Folder {
            keys: self.list_folder(&client, "").await?,
            path: String::new(),
            next: 0,
        }];
        let (mut walked, mut matched, mut more) = (1, 0, false);
        let mut names = Vec::new();
        while let Some(folder) = stack.last_mut() {
            let Some(key) = folder.keys.get(folder.next) else {
                stack.pop();
                continue;
            };
            folder.next += 1;
            let full = format!("{}{key}", folder.path);
            if key.ends_with('/') {
                walked += 1;
                if walked > LIST_FOLDER_LIMIT {
                    return Err(ManagerError::Permanent(format!(
                        "listing walked {LIST_FOLDER_LIMIT} folders of the mount without filling the page"
                    )));
                }
                let keys = self.list_folder(&client, &full).await?;
                stack.push(Folder {
                    path: full,
                    keys,
                    next: 0,
                });
                continue;
            }
            if request
                .query
                .as_ref()
                .is_some_and(|q| !full.contains(q.as_str()))
            {
                continue;
            }
            matched += 1;
            if matched <= request.offset {
                continue;
            }
            if names.len() == request.limit {
                more = true;
                break;
            }
            names.push(full);
        }
        let mut items = Vec::with_capacity(names.len());
        for name in names {
            let (created_at, updated_at) = if self.settings.kv_version == 2 {
                match vaultrs::kv2::read_metadata(&*client, self.mount(), &name)
                    .await
                    .map_err(classify)
                {
                    Ok(m) => (
                        crate::time::parse_rfc3339(&m.created_time).map(crate::time::from_unix),
                        crate::time::parse_rfc3339(&m.updated_time).map(crate::time::from_unix),
                    ),
                    // Deleted between the listing and this read: not there any more.
                    Err(ManagerError::NotFound) => continue,
                    Err(e) => return Err(self.after_error(e)),
                }
            } else {
                (None, None)
            };
            items.push(SecretSummary {
                id: format!("{}/{}", self.mount(), name),
                name,
                description: String::new(),
                created_at,
                updated_at,
            });
        }
        Ok(Page { items, more })
    }
}
