//! The tables and indexes of the metadata database, written once for both backends: each
//! statement (a table, an index, an added column, a seed row) with the schema version that
//! added it, in a template the backend's [`Dialect`] fills in. Every statement must also be
//! safe to re-run under PostgreSQL's dialect, which runs them all at every start. Column
//! names are a stored schema: never rename one.

use std::ops::RangeInclusive;

/// How a backend spells the few things SQL dialects disagree on.
pub(super) struct Dialect {
    /// A 64-bit integer column.
    pub int: &'static str,
    /// A byte-string column.
    pub bytes: &'static str,
    /// A boolean column, false by default.
    pub flag: &'static str,
    /// An auto-numbered 64-bit primary key.
    pub serial_key: &'static str,
    /// `needs_reauth` is false (for the partial index of refresh candidates).
    pub not_needs_reauth: &'static str,
    /// Prefix of object names that makes a `CREATE` a no-op when the object exists.
    pub if_new: &'static str,
    /// Prefix of a column name that makes `ALTER TABLE ... ADD COLUMN` a no-op when the column
    /// exists (SQLite has no such clause; it runs each version's statements once anyway).
    pub if_new_column: &'static str,
}

/// Every object, with the schema version that added it.
const OBJECTS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE {if_new}credentials (
    id               TEXT PRIMARY KEY,
    environment      TEXT NOT NULL,
    integration_type TEXT NOT NULL,
    metadata         TEXT NOT NULL,
    oauth            TEXT,
    pinned_manager   TEXT,
    store_id         TEXT NOT NULL,
    store_name       TEXT NOT NULL,
    store_version    TEXT,
    expires_at       {int},
    needs_reauth     {flag},
    row_version      {int} NOT NULL,
    created_at       {int} NOT NULL,
    updated_at       {int} NOT NULL
)",
    ),
    (
        1,
        "CREATE INDEX {if_new}credentials_location ON credentials (store_id, store_name)",
    ),
    (
        1,
        "CREATE TABLE {if_new}journal (
    id            {serial_key},
    kind          TEXT NOT NULL DEFAULT 'copy',
    credential_id TEXT NOT NULL,
    store_id      TEXT NOT NULL,
    name          TEXT NOT NULL,
    created_at    {int} NOT NULL
)",
    ),
    (
        1,
        "CREATE TABLE {if_new}local_secrets (
    name        TEXT NOT NULL,
    version     {int} NOT NULL,
    key_id      TEXT NOT NULL,
    wrapped_key {bytes} NOT NULL,
    ciphertext  {bytes} NOT NULL,
    created_at  {int} NOT NULL,
    PRIMARY KEY (name, version)
)",
    ),
    // Version 2: OAuth refresh leases and sealed token responses awaiting write-back.
    (
        2,
        "CREATE TABLE {if_new}leases (
    key           TEXT PRIMARY KEY,
    holder        TEXT NOT NULL,
    expires_at_ms {int} NOT NULL
)",
    ),
    (
        2,
        "CREATE TABLE {if_new}oauth_pending (
    credential_id TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    version       {int} NOT NULL,
    key_id        TEXT NOT NULL,
    wrapped_key   {bytes} NOT NULL,
    ciphertext    {bytes} NOT NULL,
    created_at    {int} NOT NULL
)",
    ),
    (
        2,
        "CREATE INDEX {if_new}credentials_oauth_due ON credentials (expires_at)
    WHERE oauth IS NOT NULL AND {not_needs_reauth} AND expires_at IS NOT NULL",
    ),
    // Version 3: instances sharing the database and the routing configuration each runs.
    (
        3,
        "CREATE TABLE {if_new}instances (
    id           TEXT PRIMARY KEY,
    config_hash  TEXT NOT NULL,
    heartbeat_ms {int} NOT NULL
)",
    ),
    // Version 4: workspaces (tenants) and the control plane: secrets managers and routing
    // defined through the API, and the counter instances poll to notice their changes.
    (
        4,
        "ALTER TABLE credentials ADD COLUMN {if_new_column}workspace TEXT NOT NULL DEFAULT 'default'",
    ),
    (
        4,
        "CREATE INDEX {if_new}credentials_workspace ON credentials (workspace)",
    ),
    // The `auth_*` columns are one sealed record (all set or all NULL): the manager's secret
    // settings, sealed before they reach this layer; the sealed record's name is the id.
    (
        4,
        "CREATE TABLE {if_new}managers (
    id               TEXT PRIMARY KEY,
    workspace        TEXT NOT NULL,
    name             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    settings         TEXT NOT NULL,
    auth_keys        TEXT NOT NULL,
    auth_version     {int},
    auth_key_id      TEXT,
    auth_wrapped_key {bytes},
    auth_ciphertext  {bytes},
    auth_created_at  {int},
    source           TEXT NOT NULL,
    state            TEXT NOT NULL,
    row_version      {int} NOT NULL,
    created_at       {int} NOT NULL,
    updated_at       {int} NOT NULL
)",
    ),
    // One row per routed environment of a workspace; `environment = ''` is the workspace's
    // default. No foreign key to `managers`: routing may name managers of the config file.
    (
        4,
        "CREATE TABLE {if_new}routing (
    workspace   TEXT NOT NULL,
    environment TEXT NOT NULL,
    manager_id  TEXT NOT NULL,
    PRIMARY KEY (workspace, environment)
)",
    ),
    // Exactly one row: the control version, bumped by every change of managers or routing.
    (
        4,
        "CREATE TABLE {if_new}control (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version {int} NOT NULL
)",
    ),
    (
        4,
        "INSERT INTO control (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
    ),
    // Version 5: soft-deleted secrets awaiting their purge (Key Vault with purge_on_delete).
    // Times in milliseconds: attempts back off from one second.
    (
        5,
        "CREATE TABLE {if_new}purges (
    store_id      TEXT NOT NULL,
    name          TEXT NOT NULL,
    credential_id TEXT NOT NULL,
    attempts      {int} NOT NULL,
    next_at_ms    {int} NOT NULL,
    last_outcome  TEXT,
    created_at_ms {int} NOT NULL,
    PRIMARY KEY (store_id, name)
)",
    ),
    (
        5,
        "CREATE INDEX {if_new}purges_due ON purges (next_at_ms)",
    ),
    // Version 6: a token's expiry to the millisecond. `expires_at` (whole seconds, rounded
    // down) is still written beside it: the index of refresh candidates is on it.
    (
        6,
        "ALTER TABLE credentials ADD COLUMN {if_new_column}expires_at_ms {int}",
    ),
    (
        6,
        "ALTER TABLE credentials ADD COLUMN {if_new_column}token_at_ms {int}",
    ),
    // Version 7: re-authorisation events, queued here for their webhook in the same
    // transaction as the change they report, and kept for polling until their retention ends.
    // `seq` orders them (writers of events are serialised, so it is also commit order).
    (
        7,
        "CREATE TABLE {if_new}events (
    seq              {serial_key},
    id               TEXT NOT NULL UNIQUE,
    type             TEXT NOT NULL,
    credential_id    TEXT NOT NULL,
    workspace        TEXT NOT NULL,
    environment      TEXT NOT NULL,
    integration_type TEXT NOT NULL,
    reason           TEXT NOT NULL,
    at_ms            {int} NOT NULL,
    delivery         TEXT NOT NULL,
    attempts         {int} NOT NULL,
    next_at_ms       {int} NOT NULL,
    last_outcome     TEXT
)",
    ),
    (
        7,
        "CREATE INDEX {if_new}events_due ON events (next_at_ms) WHERE delivery = 'pending'",
    ),
    (7, "CREATE INDEX {if_new}events_at ON events (at_ms)"),
    // Version 8: the change feed of fleet mode (PostgreSQL): what each instance changed, for
    // the others to poll from the last number they saw. Kept ten minutes. Unused on SQLite.
    (
        8,
        "CREATE TABLE {if_new}changes (
    seq     {serial_key},
    kind    TEXT NOT NULL,
    subject TEXT NOT NULL,
    origin  TEXT NOT NULL,
    at_ms   {int} NOT NULL
)",
    ),
    (8, "CREATE INDEX {if_new}changes_at ON changes (at_ms)"),
    // Every instance counts the credentials awaiting re-authorisation at each refresh scan:
    // with this the count reads those few rows, not the whole table.
    (
        8,
        "CREATE INDEX {if_new}credentials_needs_reauth ON credentials (id) WHERE needs_reauth",
    ),
];

/// The statements that create the objects added in `versions`, in `dialect`, as one batch.
pub(super) fn ddl(dialect: &Dialect, versions: RangeInclusive<i64>) -> String {
    OBJECTS
        .iter()
        .filter(|(since, _)| versions.contains(since))
        .map(|(_, template)| {
            format!(
                "{};\n",
                template
                    .replace("{if_new}", dialect.if_new)
                    .replace("{if_new_column}", dialect.if_new_column)
                    .replace("{int}", dialect.int)
                    .replace("{bytes}", dialect.bytes)
                    .replace("{flag}", dialect.flag)
                    .replace("{serial_key}", dialect.serial_key)
                    .replace("{not_needs_reauth}", dialect.not_needs_reauth)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::SCHEMA_VERSION;

    #[test]
    fn every_version_adds_something_and_none_is_ahead_of_the_binary() {
        for v in 1..=SCHEMA_VERSION {
            assert!(OBJECTS.iter().any(|(since, _)| *since == v), "version {v}");
        }
        assert!(OBJECTS.iter().all(|(since, _)| *since <= SCHEMA_VERSION));
    }

    #[test]
    fn every_placeholder_is_filled() {
        let d = Dialect {
            int: "I",
            bytes: "B",
            flag: "F",
            serial_key: "S",
            not_needs_reauth: "N",
            if_new: "",
            if_new_column: "",
        };
        let all = ddl(&d, 1..=SCHEMA_VERSION);
        assert!(!all.contains('{') && !all.contains('}'), "{all}");
        assert_eq!(all.matches(";\n").count(), OBJECTS.len());
    }

    #[test]
    fn only_the_requested_versions_are_in_a_batch() {
        let d = Dialect {
            int: "I",
            bytes: "B",
            flag: "F",
            serial_key: "S",
            not_needs_reauth: "N",
            if_new: "",
            if_new_column: "IF NOT EXISTS ",
        };
        let v4 = ddl(&d, 4..=4);
        assert!(v4.contains("ADD COLUMN IF NOT EXISTS workspace"), "{v4}");
        assert!(!v4.contains("CREATE TABLE credentials"), "{v4}");
        assert!(!ddl(&d, 1..=3).contains("workspace"));
    }
}
