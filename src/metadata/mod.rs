//! The metadata store: credential references, non-sensitive metadata, the write journal, and
//! the sealed rows of the local encrypted store. SQLite by default; the trait keeps room for
//! PostgreSQL in fleet mode.
//!
//! Nothing here ever holds a plaintext secret: the local store's rows are sealed before they
//! reach this layer.

#[cfg(feature = "postgres")]
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
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

#[async_trait]
pub trait Metadata: Send + Sync + 'static {
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), MetadataError>;

    /// Changes made by other instances sharing the database, for stores that can announce
    /// them (PostgreSQL). `None` for a store only this process writes... or that cannot tell.
    fn invalidations(&self) -> Option<tokio::sync::broadcast::Receiver<Invalidation>> {
        None
    }

    async fn get_credential(&self, id: &str) -> Result<Option<CredentialRecord>, MetadataError>;

    /// Inserts a new credential and, in the same transaction, clears the journal entry that
    /// covered its freshly written secret.
    async fn create_credential(
        &self,
        record: &CredentialRecord,
        journal_id: i64,
    ) -> Result<(), MetadataError>;

    /// Replaces the row if its `row_version` is still `expected_row_version` (the new record
    /// carries the bumped one). When the location changes, `abandoned` journals the old copy
    /// in the same transaction; its entry id is returned.
    async fn update_credential(
        &self,
        record: &CredentialRecord,
        expected_row_version: i64,
        abandoned: Option<&JournalEntry>,
    ) -> Result<Option<i64>, MetadataError>;

    /// Deletes the row if unchanged and journals its secret's copy for deletion, atomically.
    async fn delete_credential(
        &self,
        id: &str,
        expected_row_version: i64,
        abandoned: &JournalEntry,
    ) -> Result<i64, MetadataError>;

    /// Credentials in id order after `after`, for planners and sweeps.
    async fn list_credentials(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError>;

    async fn count_credentials(&self) -> Result<u64, MetadataError>;

    async fn journal_add(&self, entry: &JournalEntry) -> Result<i64, MetadataError>;
    async fn journal_remove(&self, id: i64) -> Result<(), MetadataError>;
    async fn journal_list(&self) -> Result<Vec<JournalEntry>, MetadataError>;
    /// Whether any credential's recorded location is this copy.
    async fn location_in_use(&self, manager_id: &str, name: &str) -> Result<bool, MetadataError>;
    /// Whether any credential or journal entry still refers to the store `manager_id`.
    async fn manager_in_use(&self, manager_id: &str) -> Result<bool, MetadataError>;

    async fn sealed_latest(&self, name: &str) -> Result<Option<SealedRecord>, MetadataError>;
    async fn sealed_get(
        &self,
        name: &str,
        version: i64,
    ) -> Result<Option<SealedRecord>, MetadataError>;
    /// Fails with `AlreadyExists` if `(name, version)` is taken: that is how concurrent local
    /// writers are detected.
    async fn sealed_insert(&self, record: &SealedRecord) -> Result<(), MetadataError>;
    /// Drops versions older than `keep_from` (the previous one stays for readers in flight).
    async fn sealed_prune(&self, name: &str, keep_from: i64) -> Result<(), MetadataError>;
    async fn sealed_delete(&self, name: &str) -> Result<(), MetadataError>;
    async fn sealed_list(
        &self,
        query: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<SealedSummary>, bool), MetadataError>;
    /// Sealed rows whose data key is wrapped by a key other than `current_key_id`.
    async fn sealed_with_other_key(
        &self,
        current_key_id: &str,
        limit: usize,
    ) -> Result<Vec<SealedRecord>, MetadataError>;
    /// Replaces the wrapped data key of one version (key rotation), if still wrapped by `old_key_id`.
    async fn sealed_rewrap(
        &self,
        record: &SealedRecord,
        old_key_id: &str,
    ) -> Result<(), MetadataError>;

    /// Takes the lease `key` for `holder` if it is free, expired, or already `holder`'s, for
    /// `ttl` from now. Serialises OAuth refreshers across processes sharing the database.
    async fn lease_acquire(
        &self,
        key: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, MetadataError>;
    /// Gives the lease up if `holder` still has it.
    async fn lease_release(&self, key: &str, holder: &str) -> Result<(), MetadataError>;

    /// Saves a sealed token response before it is written back, so a crash in between does
    /// not lose a rotated refresh token. One per credential; replaces any earlier one.
    async fn pending_token_put(
        &self,
        credential_id: &str,
        sealed: &SealedRecord,
    ) -> Result<(), MetadataError>;
    async fn pending_token_get(
        &self,
        credential_id: &str,
    ) -> Result<Option<SealedRecord>, MetadataError>;
    async fn pending_token_delete(&self, credential_id: &str) -> Result<(), MetadataError>;

    /// OAuth credentials not marked for re-authorisation whose token expires at or before
    /// `before` (Unix seconds), soonest first.
    async fn oauth_due(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError>;
    async fn count_needs_reauth(&self) -> Result<u64, MetadataError>;

    /// Records that instance `id` is alive and runs the routing configuration `config_hash`.
    async fn instance_heartbeat(&self, id: &str, config_hash: &str) -> Result<(), MetadataError>;
    async fn instance_remove(&self, id: &str) -> Result<(), MetadataError>;
    /// The distinct routing configurations of instances seen within `max_age`.
    async fn live_config_hashes(
        &self,
        max_age: std::time::Duration,
    ) -> Result<Vec<String>, MetadataError>;
}
