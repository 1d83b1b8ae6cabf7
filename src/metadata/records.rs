//! The records the metadata database holds: credentials and where their secrets are, journal
//! entries, sealed rows of the local encrypted store, and fleet invalidations.

use serde::{Deserialize, Serialize};

use super::MetadataError;

/// Where a credential's sensitive fields are now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Location {
    pub manager_id: String,
    pub name: String,
    pub version: Option<String>,
}

/// The non-secret half of an OAuth credential: enough to call the token endpoint when the
/// client secret and refresh token are read from the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthDescription {
    pub token_url: String,
    pub client_id: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// How the client authenticates at the token endpoint.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// `basic`: HTTP Basic with the client id and secret (RFC 6749's preferred way); `body`: both in
/// the form body, for token endpoints that accept only that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Basic,
    Body,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CredentialRecord {
    pub id: String,
    /// The tenant that owns the credential; rows written before workspaces existed read as
    /// `default`.
    pub workspace: String,
    pub environment: String,
    pub integration_type: String,
    /// A JSON object of non-sensitive metadata.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub oauth: Option<OAuthDescription>,
    pub pinned_manager: Option<String>,
    pub location: Location,
    /// Unix seconds at which the access token expires, if it does.
    pub expires_at: Option<i64>,
    pub needs_reauth: bool,
    /// Bumped on every update; updates compare-and-swap on it.
    pub row_version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A copy of a secret that may be left behind in a store (by a crash between writing it and
/// recording it, or after a move or delete). Recovery deletes it unless a credential refers
/// to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub id: i64,
    pub kind: JournalKind,
    pub credential_id: String,
    pub manager_id: String,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalKind {
    /// A whole copy (a new name, or the old name after a move or delete): delete it unless a
    /// credential refers to it.
    Copy,
    /// A new version under the credential's own name that may have landed without being
    /// recorded: it lets the next write replace that version instead of reporting a
    /// conflict. Cleared by the next successful write.
    Version,
}

impl JournalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JournalKind::Copy => "copy",
            JournalKind::Version => "version",
        }
    }

    /// Reads a stored kind. Anything but the two known ones is corruption, never a default:
    /// read as `Copy`, an unknown kind would get a copy deleted that may still be in use.
    pub fn parse(s: &str) -> Result<Self, MetadataError> {
        match s {
            "copy" => Ok(JournalKind::Copy),
            "version" => Ok(JournalKind::Version),
            _ => Err(MetadataError::Corrupt(
                "journal.kind is neither copy nor version".into(),
            )),
        }
    }
}

/// One sealed version in the local encrypted store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRecord {
    pub name: String,
    pub version: i64,
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSummary {
    pub name: String,
    pub latest_version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A change another instance made, for this instance's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Credential(String),
    /// Changes may have been missed (a lost connection): drop everything.
    All,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_kinds_read_back_what_was_written_and_nothing_else() {
        for kind in [JournalKind::Copy, JournalKind::Version] {
            assert_eq!(JournalKind::parse(kind.as_str()).unwrap(), kind);
        }
        for stored in ["", "Copy", "versions", "canary-value"] {
            let err = JournalKind::parse(stored).unwrap_err();
            assert!(matches!(err, MetadataError::Corrupt(_)), "{stored}: {err}");
            let text = err.to_string();
            assert!(text.contains("journal.kind"), "{text}");
            assert!(stored.is_empty() || !text.contains(stored), "{text}");
        }
    }
}
