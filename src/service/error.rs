//! `ServiceError`, and how failures of a secrets manager or the metadata database map to it.

use std::time::Duration;

use crate::cache::LoadFailure;
use crate::manager::ManagerError;
use crate::metadata::MetadataError;

/// Retry-After suggested when a secrets manager is down and nothing is cached.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why a use case failed. Details are for logs; the API maps each variant to a fixed message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    #[error("credential not found")]
    NotFound,
    #[error("caller is not allowed to do this")]
    Forbidden,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the credential is too large: {0}")]
    TooLarge(String),
    #[error("the credential changed concurrently")]
    Conflict,
    #[error("secrets manager `{manager}` is read-only")]
    ReadOnly { manager: String },
    #[error("no secrets manager `{0}` is configured")]
    UnknownManager(String),
    /// A credential is recorded in a manager this instance has not loaded: one that cannot be
    /// built now, or (in a fleet) one created moments ago on another instance.
    #[error("secrets manager `{0}` is not loaded on this instance")]
    ManagerNotLoaded(String),
    #[error("secrets manager `{manager}` unavailable: {detail}")]
    Unavailable {
        manager: String,
        detail: String,
        retry_after: Duration,
    },
    #[error("secrets manager `{manager}` refused the request: {detail}")]
    ManagerFailed { manager: String, detail: String },
    #[error("the secret recorded for this credential is missing from secrets manager `{manager}`")]
    SecretMissing { manager: String },
    #[error("metadata database: {0}")]
    Metadata(String),
    #[error("the refresh token was rejected; the credential needs re-authorisation")]
    NeedsReauth,
    #[error("the credential cannot be refreshed: {0}")]
    NotRefreshable(String),
    #[error("the access token expired and could not be refreshed: {detail}")]
    TokenUnavailable {
        detail: String,
        retry_after: Duration,
    },
    #[error("secrets manager `{manager}` holds this credential in a state that cannot be used: {reason}")]
    Unusable { manager: String, reason: String },
    /// The credential's name in the manager is held by a deleted secret credproxy may neither
    /// recover nor purge.
    #[error(
        "secrets manager `{manager}` keeps a deleted secret under the credential's name: {reason}"
    )]
    NameUnavailable { manager: String, reason: String },
}

impl LoadFailure for ServiceError {
    fn allows_stale(&self) -> bool {
        matches!(
            self,
            ServiceError::Unavailable { .. } | ServiceError::Metadata(_)
        )
    }
}

impl From<MetadataError> for ServiceError {
    fn from(e: MetadataError) -> Self {
        match e {
            MetadataError::Conflict => ServiceError::Conflict,
            other => ServiceError::Metadata(other.to_string()),
        }
    }
}

pub(super) fn manager_failure(manager: &str, e: ManagerError) -> ServiceError {
    let manager = manager.to_owned();
    match e {
        ManagerError::Conflict => ServiceError::Conflict,
        ManagerError::ReadOnly => ServiceError::ReadOnly { manager },
        ManagerError::NotFound => ServiceError::SecretMissing { manager },
        ManagerError::Throttled { retry_after } => ServiceError::Unavailable {
            manager,
            detail: "throttled".into(),
            retry_after: retry_after.unwrap_or(UNAVAILABLE_RETRY_AFTER),
        },
        e @ (ManagerError::Transient(_) | ManagerError::Timeout) => ServiceError::Unavailable {
            manager,
            detail: e.to_string(),
            retry_after: UNAVAILABLE_RETRY_AFTER,
        },
        ManagerError::Unusable(reason) | ManagerError::AccountInactive(reason) => {
            ServiceError::Unusable { manager, reason }
        }
        ManagerError::NameUnavailable(reason) => ServiceError::NameUnavailable { manager, reason },
        e @ (ManagerError::Denied(_) | ManagerError::Permanent(_)) => ServiceError::ManagerFailed {
            manager,
            detail: e.to_string(),
        },
    }
}
