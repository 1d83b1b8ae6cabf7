//! AWS Secrets Manager (`type = "aws"`): one secret per credential whose value is the JSON
//! object of its sensitive fields. Writes carry a `ClientRequestToken`, so a retried write is
//! idempotent, and the reference records the `VersionId`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_secretsmanager::types::{Filter, FilterNameStringType};
use aws_sdk_secretsmanager::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use serde::Deserialize;

use super::descriptor::{Descriptor, Key};
use super::{
    ListRequest, ManagerError, ManagerInfo, Page, PutRequest, SecretSummary, SecretsManager,
    Versioned,
};
use crate::config::{ConfigError, ManagerConfig, SecretRef};
use crate::secret::SecretFields;

/// The type-specific keys of an `aws` manager.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    pub region: String,
    /// A VPC endpoint, LocalStack or moto; the regional endpoint when absent.
    pub endpoint: Option<String>,
    pub access_key_id: Option<SecretRef>,
    pub secret_access_key: Option<SecretRef>,
    /// A role to assume with the base credentials (static keys or the default chain).
    pub role_arn: Option<String>,
    /// Days AWS keeps a deleted secret recoverable (7-30); absent deletes at once.
    pub recovery_window_days: Option<i64>,
    /// KMS key for new secrets; the account's default key when absent.
    pub kms_key_id: Option<String>,
}

/// The `aws` type, for the table in `descriptor`.
pub static DESCRIPTOR: Descriptor = Descriptor {
    kind: "aws",
    read_only: false,
    compare_and_swap: false,
    // AWS advises at most one sustained update per secret every 10 minutes, or versions pile up
    // faster than they are removed and hit the per-secret version quota.
    advised_min_write_interval: Some(Duration::from_secs(600)),
    keys: &[
    Key {
        name: "region",
        locates: true,
        required: true,
        secret: false,
        label: "AWS region",
        instructions: "The region of the Secrets Manager endpoint, e.g. eu-west-1.",
    },
    Key {
        name: "endpoint",
        locates: true,
        required: false,
        secret: false,
        label: "Endpoint URL (optional)",
        instructions: "A VPC endpoint or a test server URL; omit for the public regional endpoint.",
    },
    Key {
        name: "access_key_id",
        locates: false,
        required: false,
        secret: true,
        label: "Access key id (optional)",
        instructions: "An IAM user's access key id as { env = \"VAR\" } or { file = \"/path\" }; omit with secret_access_key to use the SDK's default chain (pod identity, instance role).",
    },
    Key {
        name: "secret_access_key",
        locates: false,
        required: false,
        secret: true,
        label: "Secret access key (optional)",
        instructions: "The matching secret access key, as { env } or { file }; never inline.",
    },
    Key {
        name: "role_arn",
        locates: true,
        required: false,
        secret: false,
        label: "Role to assume (optional)",
        instructions: "An IAM role ARN that allows secretsmanager:GetSecretValue, PutSecretValue, CreateSecret, DeleteSecret and ListSecrets on the prefix.",
    },
    Key {
        name: "recovery_window_days",
        locates: false,
        required: false,
        secret: false,
        label: "Recovery window (optional)",
        instructions: "Days (7 to 30) AWS keeps a deleted secret recoverable; omit to delete at once.",
    },
    Key {
        name: "kms_key_id",
        locates: false,
        required: false,
        secret: false,
        label: "KMS key (optional)",
        instructions: "The KMS key id or ARN new secrets are encrypted with; omit for the account's default key.",
    },
    ],
    check_values: |manager| parse_settings(manager).map(drop),
    build: |manager| Box::pin(AwsManager::build(manager)),
};

pub fn parse_settings(manager: &ManagerConfig) -> Result<AwsSettings, ConfigError> {
    let settings: AwsSettings = super::parse_table(manager)?;
    if settings.region.is_empty() {
        return Err(super::setting_error(manager, "region", "must not be empty"));
    }
    if settings.access_key_id.is_some() != settings.secret_access_key.is_some() {
        return Err(super::setting_error(
            manager,
            "access_key_id",
            "give both access_key_id and secret_access_key, or neither to use the default chain",
        ));
    }
    if let Some(ep) = &settings.endpoint {
        if !(ep.starts_with("https://") || ep.starts_with("http://")) {
            return Err(super::setting_error(
                manager,
                "endpoint",
                "must be an http(s) URL",
            ));
        }
    }
    if let Some(days) = settings.recovery_window_days {
        if !(7..=30).contains(&days) {
            return Err(super::setting_error(
                manager,
                "recovery_window_days",
                "AWS accepts 7 to 30",
            ));
        }
    }
    if let Some(role) = &settings.role_arn {
        if !role.starts_with("arn:") {
            return Err(super::setting_error(
                manager,
                "role_arn",
                "must be an IAM role ARN",
            ));
        }
    }
    Ok(settings)
}

pub struct AwsManager {
    id: String,
    client: Client,
    settings: AwsSettings,
}

impl AwsManager {
    pub async fn build(manager: &ManagerConfig) -> Result<Arc<dyn SecretsManager>, ConfigError> {
        let settings = parse_settings(manager)?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .http_client(http)
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .build(),
            )
            // The SDK's standard mode: exponential backoff with jitter on throttling and
            // transient errors, classified by the SDK. The daemon's backends.timeout bounds it.
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
        if let (Some(key_id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key)
        {
            let key_id = manager.resolve("access_key_id", key_id)?;
            let secret = manager.resolve("secret_access_key", secret)?;
            // The SDK keeps its own copy; it needs the plain strings to sign requests.
            loader = loader.credentials_provider(Credentials::new(
                key_id.expose(),
                secret.expose(),
                None,
                None,
                "credproxy-config",
            ));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let mut sdk_config = loader.load().await;
        if let Some(role) = &settings.role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                .session_name("credproxy")
                .configure(&sdk_config)
                .build()
                .await;
            sdk_config = sdk_config
                .into_builder()
                .credentials_provider(SharedCredentialsProvider::new(provider))
                .build();
        }
        Ok(Arc::new(AwsManager {
            id: manager.id.clone(),
            client: Client::new(&sdk_config),
            settings,
        }))
    }
}

/// Maps an SDK error to the layer's classification by its error code, never its message.
fn classify<E, R>(e: SdkError<E, R>) -> ManagerError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown");
            let detail = format!("AWS {code}");
            match code {
                "ResourceNotFoundException" => ManagerError::NotFound,
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "IncompleteSignature"
                | "MissingAuthenticationToken" => ManagerError::Denied(detail),
                "ThrottlingException"
                | "TooManyRequestsException"
                | "RequestLimitExceeded"
                | "LimitExceededException" => ManagerError::Throttled { retry_after: None },
                "InternalServiceError" | "InternalFailure" | "ServiceUnavailable" => {
                    ManagerError::Transient(detail)
                }
                "ResourceExistsException" => ManagerError::Conflict,
                _ => ManagerError::Permanent(detail),
            }
        }
        SdkError::TimeoutError(_) => ManagerError::Timeout,
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            ManagerError::Transient(format!(
                "AWS request failed: {}",
                aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
            ))
        }
        _ => ManagerError::Permanent(format!(
            "AWS request failed: {}",
            aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
        )),
    }
}

fn to_system_time(t: Option<&aws_smithy_types::DateTime>) -> Option<std::time::SystemTime> {
    t.and_then(|t| std::time::SystemTime::try_from(*t).ok())
}

#[async_trait]
impl SecretsManager for AwsManager {
    fn describe(&self) -> ManagerInfo {
        DESCRIPTOR.info(&self.id)
    }

    async fn get(&self, name: &str, version: Option<&str>) -> Result<Versioned, ManagerError> {
        let mut request = self.client.get_secret_value().secret_id(name);
        request = match version {
            Some(v) => request.version_id(v),
            // Explicit stage: some implementations return the old value without it after a
            // stage move.
            None => request.version_stage("AWSCURRENT"),
        };
        let output = request.send().await.map_err(classify)?;
        let text = output
            .secret_string()
            .ok_or_else(|| ManagerError::Permanent("AWS secret has no SecretString".into()))?;
        let value = SecretFields::from_json(text.as_bytes())
            .map_err(|e| ManagerError::Permanent(e.to_string()))?;
        Ok(Versioned {
            value,
            version: output.version_id().unwrap_or_default().to_owned(),
            expires_in: None,
        })
    }

    async fn put(&self, request: PutRequest<'_>) -> Result<String, ManagerError> {
        let body = request.value.to_json();
        // The SDK needs a String; this copy is not wiped (a limit of the SDK's types).
        let text = String::from_utf8_lossy(&body).into_owned();
        let put = self
            .client
            .put_secret_value()
            .secret_id(request.name)
            .secret_string(text.clone())
            .client_request_token(request.idempotency_key)
            .send()
            .await;
        match put.map_err(classify) {
            Ok(out) => return Ok(out.version_id().unwrap_or_default().to_owned()),
            Err(ManagerError::NotFound) => {}
            Err(e) => return Err(e),
        }
        let mut create = self
            .client
            .create_secret()
            .name(request.name)
            .secret_string(text.clone())
            .client_request_token(request.idempotency_key)
            .description("credential stored by credproxy");
        if let Some(kms) = &self.settings.kms_key_id {
            create = create.kms_key_id(kms);
        }
        match create.send().await.map_err(classify) {
            Ok(out) => Ok(out.version_id().unwrap_or_default().to_owned()),
            // Another writer created it between our two calls: write a version on top.
            Err(ManagerError::Conflict) => self
                .client
                .put_secret_value()
                .secret_id(request.name)
                .secret_string(text)
                .client_request_token(request.idempotency_key)
                .send()
                .await
                .map(|out| out.version_id().unwrap_or_default().to_owned())
                .map_err(classify),
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, name: &str) -> Result<(), ManagerError> {
        let mut request = self.client.delete_secret().secret_id(name);
        request = match self.settings.recovery_window_days {
            Some(days) => request.recovery_window_in_days(days),
            None => request.force_delete_without_recovery(true),
        };
        match request.send().await.map_err(classify) {
            Ok(_) | Err(ManagerError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, request: ListRequest) -> Result<Page, ManagerError> {
        let mut items = Vec::new();
        let mut skipped = 0;
        let mut token: Option<String> = None;
        loop {
            let mut call = self
                .client
                .list_secrets()
                .max_results(100)
                .set_next_token(token.clone());
            if let Some(q) = &request.query {
                call = call.filters(
                    Filter::builder()
                        .key(FilterNameStringType::Name)
                        .values(q)
                        .build(),
                );
            }
            let out = call.send().await.map_err(classify)?;
            for entry in out.secret_list() {
                if skipped < request.offset {
                    skipped += 1;
                    continue;
                }
                if items.len() == request.limit {
                    return Ok(Page { items, more: true });
                }
                items.push(SecretSummary {
                    id: entry.arn().unwrap_or_default().to_owned(),
                    name: entry.name().unwrap_or_default().to_owned(),
                    description: entry.description().unwrap_or_default().to_owned(),
                    created_at: to_system_time(entry.created_date()),
                    updated_at: to_system_time(entry.last_changed_date()),
                });
            }
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(Page { items, more: false });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_describes_every_key_the_settings_accept() {
        crate::manager::descriptor::assert_keys_match::<AwsSettings>(&DESCRIPTOR);
    }
}
