//! The metadata store: credential references, non-sensitive metadata, the write journal, and
//! the sealed rows of the local encrypted store. SQLite by default; the trait keeps room for
//! PostgreSQL in fleet mode.
//!
//! Nothing here ever holds a plaintext secret: the local store's rows are sealed before they
//! reach this layer.

mod codec;
#[cfg(feature = "postgres")]
pub mod postgres;
mod roles;
mod schema;
pub mod sqlite;

pub use roles::{
    CredentialRows, FleetRows, IntoSealedRows, JournalRows, LeaseRows, Liveness, Metadata,
    PendingTokenRows, SealedRows,
};

use serde::{Deserialize, Serialize};

/// The current schema version. A database with a newer one is refused at start.
pub const SCHEMA_VERSION: i64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("the credential row changed since it was read")]
    Conflict,
    #[error("a record with that key already exists")]
    AlreadyExists,
    #[error(
        "metadata database schema version {found} is newer than this binary supports ({supported})"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("metadata database error: {0}")]
    Database(String),
    #[error("metadata record is corrupt: {0}")]
    Corrupt(String),
}

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

    pub fn parse(s: &str) -> Self {
        if s == "version" {
            JournalKind::Version
        } else {
            JournalKind::Copy
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
