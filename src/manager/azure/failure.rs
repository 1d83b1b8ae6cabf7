//! What Key Vault answered when a call failed, read once: the HTTP status and Key Vault's most
//! specific error code (the innermost `innererror.code`, such as `ObjectIsDeletedButRecoverable`
//! under the generic `Conflict`), and how that classifies as a [`ManagerError`] whose text
//! names the code (and never a value or a token): the WARN line every failed store call gets
//! (`service::failures`) shows it.

use azure_core::error::ErrorKind;

use crate::manager::ManagerError;

/// A write to a name whose secret is soft-deleted: it can only be recovered or purged.
pub(super) const DELETED_BUT_RECOVERABLE: &str = "ObjectIsDeletedButRecoverable";
/// The soft delete (or a purge) of the name is still running.
pub(super) const BEING_DELETED: &str = "ObjectIsBeingDeleted";
/// The recovery of the name is still running.
pub(super) const BEING_RECOVERED: &str = "ObjectIsBeingRecovered";

/// A failed Key Vault call.
#[derive(Debug)]
pub(super) enum Failure {
    /// Key Vault answered with an error status and code.
    Refused { status: u16, code: String },
    /// No Entra ID token could be obtained (the text is credproxy's own, naming no secret).
    Credential(String),
    /// The vault could not be reached.
    Unreachable(String),
    /// Anything else: an answer that could not be read, a request that could not be built
    /// (the SDK's error kind only).
    Other(String),
}

/// The innermost error code of a Key Vault error body, if it has one.
fn innermost_code(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut node = value.get("error")?;
    let mut code = node.get("code")?.as_str()?.to_owned();
    while let Some(inner) = node.get("innererror") {
        if let Some(c) = inner.get("code").and_then(|c| c.as_str()) {
            code = c.to_owned();
        }
        node = inner;
    }
    Some(code)
}

impl Failure {
    pub(super) fn from_sdk(e: azure_core::Error) -> Self {
        match e.kind() {
            ErrorKind::HttpResponse {
                status,
                error_code,
                raw_response,
            } => {
                let code = raw_response
                    .as_ref()
                    .and_then(|r| innermost_code(r.body()))
                    .or_else(|| error_code.clone())
                    .unwrap_or_default();
                Failure::Refused {
                    status: u16::from(*status),
                    code,
                }
            }
            ErrorKind::Credential => Failure::Credential(e.to_string()),
            ErrorKind::Connection | ErrorKind::Io => Failure::Unreachable(e.to_string()),
            // The kind only: a decoding error's text can quote what it was decoding.
            kind => Failure::Other(kind.to_string()),
        }
    }

    pub(super) fn status(&self) -> Option<u16> {
        match self {
            Failure::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether Key Vault answered `status` with the error code `code`.
    pub(super) fn is(&self, status: u16, code: &str) -> bool {
        matches!(self, Failure::Refused { status: s, code: c } if *s == status && c == code)
    }

    /// The code for logs and error details: Key Vault's, or what kind of failure it was.
    pub(super) fn code(&self) -> &str {
        match self {
            Failure::Refused { code, .. } if !code.is_empty() => code,
            Failure::Refused { .. } => "none",
            Failure::Credential(_) => "token_unavailable",
            Failure::Unreachable(_) => "unreachable",
            Failure::Other(_) => "unreadable_answer",
        }
    }

    pub(super) fn into_error(self) -> ManagerError {
        match self {
            Failure::Refused { status, code } => match status {
                404 => ManagerError::NotFound,
                401 | 403 => ManagerError::Denied(format!("Key Vault refused access ({code})")),
                429 => ManagerError::Throttled { retry_after: None },
                409 => ManagerError::Permanent(format!("Key Vault conflict ({code})")),
                s if s >= 500 => ManagerError::Transient(format!("Key Vault HTTP {s} ({code})")),
                s => ManagerError::Permanent(format!("Key Vault HTTP {s} ({code})")),
            },
            Failure::Credential(e) => ManagerError::Denied(format!("Entra ID token: {e}")),
            Failure::Unreachable(e) => {
                ManagerError::Transient(format!("Key Vault unreachable: {e}"))
            }
            Failure::Other(e) => ManagerError::Permanent(format!("Key Vault: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_code_is_the_specific_one() {
        let body = br#"{"error":{"code":"Conflict","message":"Secret x is currently in a deleted but recoverable state","innererror":{"code":"ObjectIsDeletedButRecoverable"}}}"#;
        assert_eq!(
            innermost_code(body).as_deref(),
            Some(DELETED_BUT_RECOVERABLE)
        );
        let plain = br#"{"error":{"code":"SecretNotFound","message":"not found"}}"#;
        assert_eq!(innermost_code(plain).as_deref(), Some("SecretNotFound"));
        assert_eq!(innermost_code(b"not json"), None);
    }
}
