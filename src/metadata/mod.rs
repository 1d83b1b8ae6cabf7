//! The metadata store: credential references, non-sensitive metadata, the write journal, and
//! the sealed rows of the local encrypted store. SQLite by default; the trait keeps room for
//! PostgreSQL in fleet mode.
//!
//! Nothing here ever holds a plaintext secret: the local store's rows are sealed before they
//! reach this layer.

mod codec;
#[cfg(feature = "postgres")]
pub mod postgres;
mod records;
mod roles;
mod schema;
pub mod sqlite;

pub use records::{
    ClientAuth, CredentialRecord, Invalidation, JournalEntry, JournalKind, Location,
    OAuthDescription, SealedRecord, SealedSummary,
};
pub use roles::{
    CredentialRows, FleetRows, IntoSealedRows, JournalRows, LeaseRows, Liveness, Metadata,
    PendingTokenRows, SealedRows,
};

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
