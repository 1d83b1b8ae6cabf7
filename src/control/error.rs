//! Why a control-plane change was refused. Details name keys and ids, never a value.

use crate::config::ConfigError;
use crate::metadata::MetadataError;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("`{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("caller is not allowed to do this")]
    Forbidden,
    #[error("no secrets manager with that id")]
    NotFound,
    /// Defined in the config file: changed there, not through the API.
    #[error("{0} is defined in the config file; change it there")]
    FileManaged(String),
    #[error("{0}")]
    Conflict(String),
    /// A read-only manager's credentials cannot move anywhere.
    #[error("the manager still holds {count} credential(s) that cannot move")]
    HasCredentials { count: u64 },
    /// The access details did not work: the manager's own (classified) reason.
    #[error("the secrets manager refused the access details: {0}")]
    Probe(String),
    #[error("sealed access details: {0}")]
    Sealed(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("metadata database: {0}")]
    Metadata(#[from] MetadataError),
}

impl ControlError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ControlError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
