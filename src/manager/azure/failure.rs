//! What Key Vault answered when a call failed, read once: the HTTP status and Key Vault's most
//! specific error code (the innermost `innererror.code`, such as `ObjectIsDeletedButRecoverable`
//! under the generic `Conflict`), how that classifies as a [`ManagerError`], and the WARN line
//! a failure the caller sees gets — rate-limited, naming the manager, the operation and the
//! code, never a value or a token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use azure_core::error::ErrorKind;

use crate::manager::ManagerError;

/// A write to a name whose secret is soft-deleted: it can only be recovered or purged.
pub(super) const DELETED_BUT_RECOVERABLE: &str = "ObjectIsDeletedButRecoverable";
/// The soft delete (or a purge) of the name is still running.
pub(super) const BEING_DELETED: &str = "ObjectIsBeingDeleted";
/// The recovery of the name is still running.
pub(super) const BEING_RECOVERED: &str = "ObjectIsBeingRecovered";

/// At most one WARN line per operation and error code this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Distinct (operation, code) pairs remembered; codes come from the server, so the map is
/// bounded rather than trusted to stay small.
const MAX_TRACKED: usize = 64;

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

    /// Whether the caller is told something went wrong that an operator should see: every
    /// failure but a 404, which is an answer (the secret is not there).
    fn worth_a_warning(&self) -> bool {
        self.status() != Some(404)
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

/// Per operation and code: when a line was last logged, and how many were held back since.
type Logged = HashMap<(&'static str, String), (Instant, u64)>;

/// The WARN lines of one manager, at most one per operation and code per [`LOG_EVERY`], each
/// saying how many were held back since the last.
#[derive(Default)]
pub(super) struct Warnings {
    logged: Mutex<Logged>,
}

impl Warnings {
    /// Whether a line for `operation` and `code` is due now, and how many were held back.
    fn due(&self, operation: &'static str, code: &str) -> Option<u64> {
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() >= MAX_TRACKED && !logged.contains_key(&(operation, code.to_owned())) {
            logged.retain(|_, (last, _)| now.duration_since(*last) < LOG_EVERY);
            if logged.len() >= MAX_TRACKED {
                logged.clear();
            }
        }
        match logged.get_mut(&(operation, code.to_owned())) {
            Some((last, held)) if now.duration_since(*last) < LOG_EVERY => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                logged.insert((operation, code.to_owned()), (now, 0));
                Some(0)
            }
        }
    }

    /// Logs `failure` of `operation` (unless it is a plain 404 or a line was logged lately)
    /// and turns it into the caller's error.
    pub(super) fn failed(
        &self,
        manager: &str,
        operation: &'static str,
        failure: Failure,
    ) -> ManagerError {
        if failure.worth_a_warning() {
            if let Some(suppressed) = self.due(operation, failure.code()) {
                match &failure {
                    Failure::Refused { status, code } => tracing::warn!(
                        manager = %manager, operation, status, code = %code, suppressed,
                        "Key Vault refused a request"
                    ),
                    Failure::Credential(e) | Failure::Unreachable(e) | Failure::Other(e) => {
                        tracing::warn!(
                            manager = %manager, operation, code = %failure.code(), suppressed,
                            error = %e, "Key Vault request failed"
                        )
                    }
                }
            }
        }
        failure.into_error()
    }

    /// Logs a refusal that is not one call's failure but the outcome of several (a name that
    /// can be neither recovered nor purged), under the same rate limit.
    pub(super) fn refused(&self, manager: &str, operation: &'static str, reason: &str) {
        if let Some(suppressed) = self.due(operation, reason) {
            tracing::warn!(
                manager = %manager, operation, reason = %reason, suppressed,
                "Key Vault refused a request"
            );
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

    #[test]
    fn warnings_are_held_back_per_operation_and_code() {
        let w = Warnings::default();
        assert_eq!(w.due("put", "Forbidden"), Some(0));
        assert_eq!(w.due("put", "Forbidden"), None);
        assert_eq!(w.due("put", "Forbidden"), None);
        assert_eq!(w.due("get", "Forbidden"), Some(0), "per operation");
        assert_eq!(w.due("put", "Throttled"), Some(0), "per code");
        for i in 0..2 * MAX_TRACKED {
            w.due("put", &format!("code-{i}"));
        }
        assert!(
            w.logged.lock().unwrap().len() <= MAX_TRACKED,
            "bounded even when every line is recent"
        );
    }
}
