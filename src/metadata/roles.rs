//! What the metadata database does, split by role: each trait owns one group of rows, so a
//! component can ask for only the rows it touches (the local encrypted store needs
//! [`SealedRows`] and nothing else). [`Metadata`] is every role at once, which is what the
//! daemon opens and passes around.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    CredentialRecord, EventRecord, Invalidation, JournalEntry, ManagerRecord, MetadataError,
    PurgeEntry, RoutingRecord, SealedRecord, SealedSummary,
};

/// Whether the database answers at all.
#[async_trait]
pub trait Liveness: Send + Sync + 'static {
    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), MetadataError>;

    /// Why writes fail now, if the last write failed in a way that persists (the disk is
    /// full, the database read-only or unreachable) and none has succeeded since. Only the
    /// observing wrapper ([`super::Observed`]) keeps track; a bare backend says `None`.
    fn write_fault(&self) -> Option<super::Fault> {
        None
    }
}

/// The credential rows: references to where each credential's secret lives, its non-secret
/// metadata and OAuth description, and the questions asked across all of them.
#[async_trait]
pub trait CredentialRows: Send + Sync + 'static {
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
    /// in the same transaction; its entry id is returned. `event` (the change is one the
    /// credential's end customer is told about) is recorded in the same transaction too, so
    /// the change is never made without its event nor the event recorded without the change.
    async fn update_credential(
        &self,
        record: &CredentialRecord,
        expected_row_version: i64,
        abandoned: Option<&JournalEntry>,
        event: Option<&EventRecord>,
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

    /// How many credentials each secrets manager holds: credentials per recorded location's
    /// manager (`store_id`). Managers holding none are absent.
    async fn count_by_manager(
        &self,
    ) -> Result<std::collections::HashMap<String, u64>, MetadataError>;

    /// Whether any credential's recorded location is this copy.
    async fn location_in_use(&self, manager_id: &str, name: &str) -> Result<bool, MetadataError>;

    /// Whether any credential, journal entry or pending purge still refers to the store
    /// `manager_id`.
    async fn manager_in_use(&self, manager_id: &str) -> Result<bool, MetadataError>;

    /// OAuth credentials not marked for re-authorisation whose token expires at or before
    /// `before` (Unix seconds), soonest first: at most `limit` of them after `after` (the
    /// last row of the previous page: its expiry in whole seconds and its id; `(i64::MIN, "")`
    /// for the first), so a caller pages through all of them along the expiry index.
    async fn oauth_due(
        &self,
        before: i64,
        after: (i64, &str),
        limit: usize,
    ) -> Result<Vec<CredentialRecord>, MetadataError>;

    async fn count_needs_reauth(&self) -> Result<u64, MetadataError>;
}

/// The write journal: copies of secrets a write may leave behind, until they are settled.
#[async_trait]
pub trait JournalRows: Send + Sync + 'static {
    async fn journal_add(&self, entry: &JournalEntry) -> Result<i64, MetadataError>;
    async fn journal_remove(&self, id: i64) -> Result<(), MetadataError>;
    /// Every entry, oldest first. An entry whose kind cannot be read is an error, never a
    /// guess: the wrong guess would delete a copy that must stay.
    async fn journal_list(&self) -> Result<Vec<JournalEntry>, MetadataError>;
}

/// Soft-deleted secrets awaiting their purge (`purges`), one per manager and name. Every
/// instance sharing the database works them; a lease per entry (`LeaseRows`) keeps it to one
/// at a time.
#[async_trait]
pub trait PurgeRows: Send + Sync + 'static {
    /// Records a purge to make, replacing an earlier entry for the same manager and name.
    async fn purge_add(&self, entry: &PurgeEntry) -> Result<(), MetadataError>;
    /// The entry for `name` in `manager_id`, if any.
    async fn purge_get(
        &self,
        manager_id: &str,
        name: &str,
    ) -> Result<Option<PurgeEntry>, MetadataError>;
    /// Entries due at `now_ms` (Unix milliseconds), the longest due first.
    async fn purge_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PurgeEntry>, MetadataError>;
    /// Records an attempt (`attempts`, `next_at_ms`, `last_outcome`) if the entry is still the
    /// one read (same `created_at_ms`).
    async fn purge_reschedule(&self, entry: &PurgeEntry) -> Result<(), MetadataError>;
    /// Removes the entry if it is still the one read (same `created_at_ms`).
    async fn purge_remove(&self, entry: &PurgeEntry) -> Result<(), MetadataError>;
    /// Entries per manager id; managers with none are absent.
    async fn purge_counts(&self) -> Result<std::collections::HashMap<String, u64>, MetadataError>;
}

/// The sealed versions of the local encrypted store (`local_secrets`).
#[async_trait]
pub trait SealedRows: Send + Sync + 'static {
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
    /// Every master key id that wraps something in the database: the local store's rows,
    /// sealed token responses awaiting write-back, and secrets managers' access details.
    async fn sealed_key_ids(&self) -> Result<Vec<String>, MetadataError>;
    /// Replaces the wrapped data key of one version (key rotation), if still wrapped by `old_key_id`.
    async fn sealed_rewrap(
        &self,
        record: &SealedRecord,
        old_key_id: &str,
    ) -> Result<(), MetadataError>;
}

/// A handle that can be narrowed to its sealed rows: the daemon's whole `Arc<dyn Metadata>`
/// or a concrete store. `LocalManager::new` takes this rather than `Arc<dyn SealedRows>`
/// because with the latter, `Arc::clone(&metadata)` at a call site infers the target type
/// and fails to compile instead of coercing.
pub trait IntoSealedRows {
    fn into_sealed_rows(self) -> Arc<dyn SealedRows>;
}

impl<T: SealedRows> IntoSealedRows for Arc<T> {
    fn into_sealed_rows(self) -> Arc<dyn SealedRows> {
        self
    }
}

impl IntoSealedRows for Arc<dyn SealedRows> {
    fn into_sealed_rows(self) -> Arc<dyn SealedRows> {
        self
    }
}

impl IntoSealedRows for Arc<dyn Metadata> {
    fn into_sealed_rows(self) -> Arc<dyn SealedRows> {
        // Trait upcasting (Rust 1.86).
        self
    }
}

/// Sealed OAuth token responses awaiting write-back to their credential's secrets manager
/// (`oauth_pending`).
#[async_trait]
pub trait PendingTokenRows: Send + Sync + 'static {
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
}

/// Leases: short exclusive claims on a key, shared by every process using the database.
#[async_trait]
pub trait LeaseRows: Send + Sync + 'static {
    /// Takes the lease `key` for `holder` if it is free, expired, or already `holder`'s, for
    /// `ttl` from now. Serialises OAuth refreshers across processes sharing the database.
    async fn lease_acquire(
        &self,
        key: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, MetadataError>;
    /// Gives the lease up if `holder` still has it.
    async fn lease_release(&self, key: &str, holder: &str) -> Result<(), MetadataError>;
}

/// The instances sharing the database: their heartbeats and routing configurations, and the
/// changes they announce to each other.
#[async_trait]
pub trait FleetRows: Send + Sync + 'static {
    /// Changes made by other instances sharing the database, for stores that can announce
    /// them (PostgreSQL). `None` for a store only this process writes... or that cannot tell.
    fn invalidations(&self) -> Option<tokio::sync::broadcast::Receiver<Invalidation>> {
        None
    }

    /// Records that instance `id` is alive and runs the routing configuration `config_hash`.
    async fn instance_heartbeat(&self, id: &str, config_hash: &str) -> Result<(), MetadataError>;
    async fn instance_remove(&self, id: &str) -> Result<(), MetadataError>;
    /// The distinct routing configurations of instances seen within `max_age`.
    async fn live_config_hashes(&self, max_age: Duration) -> Result<Vec<String>, MetadataError>;
}

/// The control plane: secrets managers and routing defined through the API, and a counter
/// every change bumps so that instances sharing the database notice changes by polling it.
#[async_trait]
pub trait ControlRows: Send + Sync + 'static {
    /// Bumped (by at least 1) in the same transaction as every change made through this trait.
    async fn control_version(&self) -> Result<i64, MetadataError>;
    /// Every manager row, ordered by id.
    async fn managers(&self) -> Result<Vec<ManagerRecord>, MetadataError>;
    async fn manager_get(&self, id: &str) -> Result<Option<ManagerRecord>, MetadataError>;
    /// `AlreadyExists` if the id is taken.
    async fn manager_insert(&self, record: &ManagerRecord) -> Result<(), MetadataError>;
    /// Replaces the row if its row_version is still `expected_row_version` (the record
    /// carries the bumped one), else `Conflict`; `Conflict` too if the row is gone.
    async fn manager_update(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError>;
    /// In one transaction: updates the row like `manager_update` (the caller sets
    /// state = Retiring) and removes every routing entry (default or environment, in any
    /// workspace) that names `record.id`.
    async fn manager_retire(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError>;
    /// Deletes the row; deleting what is not there succeeds.
    async fn manager_delete(&self, id: &str) -> Result<(), MetadataError>;
    /// Every workspace's routing that has any entry, ordered by workspace.
    async fn routing_all(&self) -> Result<Vec<RoutingRecord>, MetadataError>;
    /// Replaces the workspace's routing with `record` (an empty record removes it).
    async fn routing_put(&self, record: &RoutingRecord) -> Result<(), MetadataError>;
}

/// Re-authorisation events (`events`): recorded with the change they report, delivered to
/// webhooks by whichever instance claims them first, and paged through by pollers.
#[async_trait]
pub trait EventRows: Send + Sync + 'static {
    /// Records `event` (its `seq` is the database's) unless one with its id is already
    /// recorded, or `requires` names an event that is not; `false` then, and nothing changes.
    async fn event_add(
        &self,
        event: &EventRecord,
        requires: Option<&str>,
    ) -> Result<bool, MetadataError>;
    async fn event_get(&self, seq: i64) -> Result<Option<EventRecord>, MetadataError>;
    /// Events with a `seq` above `after`, in order, at most `limit`.
    async fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError>;
    /// Pending deliveries due at `now_ms`, the longest due first.
    async fn events_due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError>;
    /// Records a delivery's progress (`delivery`, `attempts`, `next_at_ms`, `last_outcome`) if
    /// the row is still pending with `expected` (`attempts`, `next_at_ms`); `false` if it was
    /// not. A claim is such a change that only moves `next_at_ms` past the attempt: other
    /// instances neither list nor claim the event until then.
    async fn event_delivery(
        &self,
        event: &EventRecord,
        expected: (i64, i64),
    ) -> Result<bool, MetadataError>;
    /// How many deliveries are pending.
    async fn events_pending(&self) -> Result<u64, MetadataError>;
    /// Drops events that happened before `before_ms`, whatever their delivery; returns how many.
    async fn events_prune(&self, before_ms: i64) -> Result<u64, MetadataError>;
}

/// The whole metadata database: every role. Implemented for anything that has them all.
pub trait Metadata:
    Liveness
    + CredentialRows
    + JournalRows
    + SealedRows
    + PendingTokenRows
    + LeaseRows
    + FleetRows
    + ControlRows
    + PurgeRows
    + EventRows
{
}

impl<T> Metadata for T where
    T: Liveness
        + CredentialRows
        + JournalRows
        + SealedRows
        + PendingTokenRows
        + LeaseRows
        + FleetRows
        + ControlRows
        + PurgeRows
        + EventRows
{
}
