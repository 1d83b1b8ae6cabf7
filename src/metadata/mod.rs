//! The metadata database: credential references and their non-sensitive metadata, the write
//! journal, the sealed rows of the local encrypted store, OAuth refresh leases and pending
//! token responses, soft-deleted secrets awaiting their purge, the instances of a fleet, and the
//! control plane (secrets managers and routing defined through the API, per workspace). Two
//! backends: SQLite (the default, one file) and PostgreSQL (fleet mode, many instances sharing
//! one database).
//!
//! What the database does is split into role traits ([`CredentialRows`], [`JournalRows`],
//! [`SealedRows`], ...) so a component depends only on the rows it touches; [`Metadata`] is
//! all of them. The row codec (`codec.rs`) and the schema (`schema.rs`) are written once; the
//! backends add only their SQL.
//!
//! Nothing here ever holds a plaintext secret: the local store's rows and a secrets manager's
//! secret settings are sealed before they reach this layer.

mod codec;
mod fault;
mod observed;
#[cfg(feature = "postgres")]
pub mod postgres;
mod records;
mod roles;
mod schema;
pub mod sqlite;

pub use fault::Fault;
pub use observed::Observed;
pub use records::{
    ClientAuth, CredentialRecord, Delivery, EventKind, EventRecord, GrantType, Invalidation,
    JournalEntry, JournalKind, Location, ManagerRecord, ManagerSource, ManagerState,
    OAuthDescription, PurgeEntry, RoutingRecord, SealedRecord, SealedSummary,
};
pub use roles::{
    ControlRows, CredentialRows, EventRows, FleetRows, IntoSealedRows, JournalRows, LeaseRows,
    Liveness, Metadata, PendingTokenRows, PurgeRows, SealedRows,
};

/// The current schema version. A database with a newer one is refused at start.
pub const SCHEMA_VERSION: i64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A compare-and-swap lost: the row (a credential or a manager) changed or is gone. The
    /// text predates managers and is kept as it is.
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
    /// The database failed for a reason that is its own, not the request's: full, read-only,
    /// locked, unreachable. Classified for logs, metrics and readiness; the text is the
    /// database's (it names files and tables, never values).
    #[error("metadata database error: {message}")]
    Storage { fault: Fault, message: String },
}

impl MetadataError {
    /// What kind of database failure this is; `None` for the answers that are outcomes, not
    /// failures (a lost compare-and-swap, a key already taken).
    pub fn fault(&self) -> Option<Fault> {
        match self {
            MetadataError::Conflict | MetadataError::AlreadyExists => None,
            MetadataError::Storage { fault, .. } => Some(*fault),
            MetadataError::SchemaTooNew { .. }
            | MetadataError::Database(_)
            | MetadataError::Corrupt(_) => Some(Fault::Other),
        }
    }
}
