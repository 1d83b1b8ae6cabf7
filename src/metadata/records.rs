//! The records the metadata database holds: credentials and where their secrets are, journal
//! entries, sealed rows of the local encrypted store, the control plane's secrets managers and
//! routing, and fleet invalidations.

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
    /// What buys a new access token. Left out of the stored JSON when it is the default, so
    /// rows of refresh-token credentials stay readable by binaries that predate the field.
    #[serde(default, skip_serializing_if = "GrantType::is_refresh_token")]
    pub grant: GrantType,
    /// Sent as `audience` with every token request (Auth0 and others name the API this way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Sent as `resource` with every token request (RFC 8707 resource indicators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// `refresh_token`: the stored refresh token buys the next access token (and maybe a new
/// refresh token). `client_credentials`: the client id and secret alone buy it (RFC 6749
/// §4.4), for server-to-server APIs that issue no refresh token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    #[default]
    RefreshToken,
    ClientCredentials,
}

impl GrantType {
    fn is_refresh_token(&self) -> bool {
        *self == GrantType::RefreshToken
    }
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
    /// Unix milliseconds at which the access token expires, if it does: a token that lives
    /// six seconds must not be believed to live five.
    pub expires_at_ms: Option<i64>,
    /// When the current access token was stored, in Unix milliseconds: its lifetime counts
    /// from here, so a write that leaves the token alone (metadata, a pin, a move) does not
    /// shorten it. `None` in rows from before schema version 6 (the lifetime then counts from
    /// `updated_at`).
    pub token_at_ms: Option<i64>,
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

/// A secret a secrets manager deleted softly and credproxy still has to purge (Key Vault with
/// `purge_on_delete`): kept until the manager says nothing is left under the name. Names a
/// location and a credential id, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeEntry {
    pub manager_id: String,
    pub name: String,
    /// The credential whose copy it was, for logs.
    pub credential_id: String,
    /// Attempts made so far.
    pub attempts: i64,
    /// When the next attempt is due, in Unix milliseconds.
    pub next_at_ms: i64,
    /// How the last attempt ended (a metric outcome, such as `waiting` or `denied`), if any.
    pub last_outcome: Option<String>,
    /// When the delete was journaled, in Unix milliseconds; an entry added again for the same
    /// name (deleted again later) gets a new one, so a worker finishing the older one cannot
    /// remove it.
    pub created_at_ms: i64,
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

/// Where a secrets manager in the metadata database came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ManagerSource {
    Api,
    File,
}

impl ManagerSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ManagerSource::Api => "api",
            ManagerSource::File => "file",
        }
    }

    /// Reads a stored source; anything else is corruption (the error names the column, never
    /// the value).
    pub fn parse(s: &str) -> Result<Self, MetadataError> {
        match s {
            "api" => Ok(ManagerSource::Api),
            "file" => Ok(ManagerSource::File),
            _ => Err(MetadataError::Corrupt(
                "managers.source is neither api nor file".into(),
            )),
        }
    }
}

/// Whether a secrets manager takes new credentials or only waits for its last one to move out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ManagerState {
    Active,
    Retiring,
}

impl ManagerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ManagerState::Active => "active",
            ManagerState::Retiring => "retiring",
        }
    }

    /// Reads a stored state. Never defaulted: read as `Active`, an unknown state could route
    /// new credentials to a manager being emptied.
    pub fn parse(s: &str) -> Result<Self, MetadataError> {
        match s {
            "active" => Ok(ManagerState::Active),
            "retiring" => Ok(ManagerState::Retiring),
            _ => Err(MetadataError::Corrupt(
                "managers.state is neither active nor retiring".into(),
            )),
        }
    }
}

/// A secrets manager created through the API, or one removed from the config file that is
/// kept (retiring) until its last credential has moved out.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagerRecord {
    pub id: String,
    pub workspace: String,
    pub name: String,
    /// The manager type: "aws", "hashicorp", ...
    pub kind: String,
    pub prefix: String,
    /// The non-secret settings, a TOML-compatible JSON object (stored as JSON text).
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Names of the secret settings that are set, never their values (JSON text column).
    pub auth_keys: Vec<String>,
    /// The secret settings, sealed by the caller (AES-GCM; the metadata layer stores bytes it
    /// cannot read). `SealedRecord.name` is the manager id, `.version` the auth version.
    pub auth: Option<SealedRecord>,
    pub source: ManagerSource,
    pub state: ManagerState,
    /// Bumped on every update; updates compare-and-swap on it, like credentials.
    pub row_version: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// One workspace's routing: its default manager and per-environment managers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RoutingRecord {
    pub workspace: String,
    pub default: Option<String>,
    /// Environment name to manager id. Environment names are never empty: the empty name is
    /// how the default is stored.
    pub environments: std::collections::BTreeMap<String, String>,
}

impl RoutingRecord {
    /// Whether the record routes nothing (storing it removes the workspace's routing).
    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.environments.is_empty()
    }
}

/// A change another instance made, for this instance's cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    Credential(String),
    /// The control plane (secrets managers or routing) changed: reload it.
    Control,
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

    #[test]
    fn manager_sources_and_states_read_back_what_was_written_and_nothing_else() {
        for source in [ManagerSource::Api, ManagerSource::File] {
            assert_eq!(ManagerSource::parse(source.as_str()).unwrap(), source);
            assert_eq!(
                serde_json::to_value(source).unwrap(),
                serde_json::json!(source.as_str())
            );
        }
        for state in [ManagerState::Active, ManagerState::Retiring] {
            assert_eq!(ManagerState::parse(state.as_str()).unwrap(), state);
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::json!(state.as_str())
            );
        }
        for stored in ["", "API", "retired", "canary-value"] {
            for (err, column) in [
                (ManagerSource::parse(stored).map(drop), "managers.source"),
                (ManagerState::parse(stored).map(drop), "managers.state"),
            ] {
                let err = err.unwrap_err();
                assert!(matches!(err, MetadataError::Corrupt(_)), "{stored}: {err}");
                let text = err.to_string();
                assert!(text.contains(column), "{text}");
                assert!(stored.is_empty() || !text.contains(stored), "{text}");
            }
        }
    }
}

/// Something that happened to a credential that its end customer has to act on (authorise
/// again, reconnect an account), as recorded in `events`: what the platform is told by
/// webhook and by `GET /v1/events`. Names a credential and its scope, never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// The position in the database's order of events (its sequence); 0 before it is recorded.
    pub seq: i64,
    /// Unique per event; a receiver deduplicates by it. Events that several instances or
    /// attempts may notice alike get an id derived from what they are about, so the second
    /// notice is the same event and is not recorded twice.
    pub id: String,
    pub kind: EventKind,
    pub credential_id: String,
    pub workspace: String,
    pub environment: String,
    pub integration_type: String,
    /// Why, in words; names no value.
    pub reason: String,
    /// When it happened, in Unix milliseconds.
    pub at_ms: i64,
    pub delivery: Delivery,
    /// Delivery attempts made so far.
    pub attempts: i64,
    /// When the next delivery attempt is due, in Unix milliseconds.
    pub next_at_ms: i64,
    /// How the last attempt ended (`HTTP 500`, `timed out`...), if any.
    pub last_outcome: Option<String>,
}

/// What an event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The provider refused the refresh token (or the client): the user must authorise again.
    NeedsReauth,
    /// New tokens or secrets were stored for a credential that needed re-authorisation.
    Reauthorized,
    /// The token has expired and refreshing it still fails (the token endpoint is down or
    /// answers errors that are not refusals).
    RefreshFailing,
    /// The account behind the credential is no longer usable at its manager (a Composio
    /// connected account that is not `ACTIVE`): the user must reconnect it.
    AccountInactive,
    /// The account is usable again.
    AccountActive,
    /// A token whose refresh was reported failing (`RefreshFailing`) was refreshed after all.
    RefreshRecovered,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::NeedsReauth,
        EventKind::Reauthorized,
        EventKind::RefreshFailing,
        EventKind::AccountInactive,
        EventKind::AccountActive,
        EventKind::RefreshRecovered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::NeedsReauth => "needs_reauth",
            EventKind::Reauthorized => "reauthorized",
            EventKind::RefreshFailing => "refresh_failing",
            EventKind::AccountInactive => "account_inactive",
            EventKind::AccountActive => "account_active",
            EventKind::RefreshRecovered => "refresh_recovered",
        }
    }

    pub fn parse(s: &str) -> Result<Self, MetadataError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| MetadataError::Corrupt("events.type is not a known event type".into()))
    }
}

/// How far an event's webhook delivery has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// To be delivered (at `next_at_ms`).
    Pending,
    Delivered,
    /// Given up: every attempt failed until the event was too old to deliver.
    Failed,
    /// No webhook was configured for its workspace when it happened: only for polling.
    Unrouted,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Pending => "pending",
            Delivery::Delivered => "delivered",
            Delivery::Failed => "failed",
            Delivery::Unrouted => "none",
        }
    }

    pub fn parse(s: &str) -> Result<Self, MetadataError> {
        match s {
            "pending" => Ok(Delivery::Pending),
            "delivered" => Ok(Delivery::Delivered),
            "failed" => Ok(Delivery::Failed),
            "none" => Ok(Delivery::Unrouted),
            _ => Err(MetadataError::Corrupt(
                "events.delivery is not a known state".into(),
            )),
        }
    }
}
