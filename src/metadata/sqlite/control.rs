//! The control plane's rows in SQLite: secrets managers, routing, and the control version.
//! SQLite cannot announce a change to other processes sharing the file, so they notice one by
//! polling [`ControlRows::control_version`], which every change bumps in its own transaction.

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{db_err, query_all, query_first, SqliteMetadata};
use crate::metadata::codec::{self, ManagerColumns, MANAGER_COLUMNS, ROUTING_COLUMNS};
use crate::metadata::{ControlRows, ManagerRecord, MetadataError, RoutingRecord};

/// Bumps the control version; called inside the transaction of the change it announces.
fn bump(c: &Connection) -> Result<(), MetadataError> {
    let changed = c
        .execute("UPDATE control SET version = version + 1 WHERE id = 1", [])
        .map_err(db_err)?;
    // The seed row is part of the schema: without it no instance would notice any change.
    if changed != 1 {
        return Err(MetadataError::Corrupt("the control row is missing".into()));
    }
    Ok(())
}

/// Replaces the manager row if its row_version is still `expected`; `Conflict` if it changed
/// or is gone. `created_at` is kept, like a credential's.
fn manager_replace(
    c: &Connection,
    r: &ManagerRecord,
    expected: i64,
    m: &ManagerColumns,
) -> Result<(), MetadataError> {
    let changed = c
        .execute(
            "UPDATE managers SET workspace=?2, name=?3, kind=?4, prefix=?5, settings=?6, \
             auth_keys=?7, auth_version=?8, auth_key_id=?9, auth_wrapped_key=?10, \
             auth_ciphertext=?11, auth_created_at=?12, source=?13, state=?14, row_version=?15, \
             updated_at=?16 WHERE id=?1 AND row_version=?17",
            params![
                r.id,
                r.workspace,
                r.name,
                r.kind,
                r.prefix,
                m.settings,
                m.auth_keys,
                m.auth_version,
                m.auth_key_id,
                m.auth_wrapped_key,
                m.auth_ciphertext,
                m.auth_created_at,
                m.source,
                m.state,
                r.row_version,
                r.updated_at,
                expected
            ],
        )
        .map_err(db_err)?;
    if changed == 0 {
        return Err(MetadataError::Conflict);
    }
    Ok(())
}

impl SqliteMetadata {
    /// Replaces the manager row like `manager_update`, and with `retire`, also drops every
    /// routing entry naming it: both in one transaction with the version bump.
    async fn manager_replace_tx(
        &self,
        record: &ManagerRecord,
        expected: i64,
        retire: bool,
    ) -> Result<(), MetadataError> {
        let r = record.clone();
        let m = ManagerColumns::of(&r)?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            manager_replace(&tx, &r, expected, &m)?;
            if retire {
                tx.execute("DELETE FROM routing WHERE manager_id = ?1", [&r.id])
                    .map_err(db_err)?;
            }
            bump(&tx)?;
            tx.commit().map_err(db_err)
        })
        .await
    }
}

#[async_trait]
impl ControlRows for SqliteMetadata {
    async fn control_version(&self) -> Result<i64, MetadataError> {
        self.with(|c| {
            c.query_row("SELECT version FROM control WHERE id = 1", [], |r| r.get(0))
                .map_err(db_err)
        })
        .await
    }

    async fn managers(&self) -> Result<Vec<ManagerRecord>, MetadataError> {
        self.with(|c| {
            query_all(
                c,
                &format!("SELECT {MANAGER_COLUMNS} FROM managers ORDER BY id"),
                [],
                codec::manager,
            )
        })
        .await
    }

    async fn manager_get(&self, id: &str) -> Result<Option<ManagerRecord>, MetadataError> {
        let id = id.to_owned();
        self.with(move |c| {
            query_first(
                c,
                &format!("SELECT {MANAGER_COLUMNS} FROM managers WHERE id = ?1"),
                [id],
                codec::manager,
            )
        })
        .await
    }

    async fn manager_insert(&self, record: &ManagerRecord) -> Result<(), MetadataError> {
        let r = record.clone();
        let m = ManagerColumns::of(&r)?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let inserted = tx.execute(
                &format!(
                    "INSERT INTO managers ({MANAGER_COLUMNS}) \
                     VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17)"
                ),
                params![
                    r.id,
                    r.workspace,
                    r.name,
                    r.kind,
                    r.prefix,
                    m.settings,
                    m.auth_keys,
                    m.auth_version,
                    m.auth_key_id,
                    m.auth_wrapped_key,
                    m.auth_ciphertext,
                    m.auth_created_at,
                    m.source,
                    m.state,
                    r.row_version,
                    r.created_at,
                    r.updated_at
                ],
            );
            match inserted {
                // Only the id is unique: another constraint failing is a bug, not a duplicate.
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
                {
                    return Err(MetadataError::AlreadyExists)
                }
                other => other.map_err(db_err)?,
            };
            bump(&tx)?;
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn manager_update(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError> {
        self.manager_replace_tx(record, expected_row_version, false)
            .await
    }

    async fn manager_retire(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError> {
        self.manager_replace_tx(record, expected_row_version, true)
            .await
    }

    async fn manager_delete(&self, id: &str) -> Result<(), MetadataError> {
        let id = id.to_owned();
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            let deleted = tx
                .execute("DELETE FROM managers WHERE id = ?1", [id])
                .map_err(db_err)?;
            // Nothing changed when nothing was there: no instance needs to reload.
            if deleted > 0 {
                bump(&tx)?;
            }
            tx.commit().map_err(db_err)
        })
        .await
    }

    async fn routing_all(&self) -> Result<Vec<RoutingRecord>, MetadataError> {
        let entries = self
            .with(|c| {
                query_all(
                    c,
                    &format!(
                        "SELECT {ROUTING_COLUMNS} FROM routing ORDER BY workspace, environment"
                    ),
                    [],
                    codec::routing_entry,
                )
            })
            .await?;
        Ok(codec::routing_records(entries))
    }

    async fn routing_put(&self, record: &RoutingRecord) -> Result<(), MetadataError> {
        let workspace = record.workspace.clone();
        let rows = codec::routing_rows(record)?;
        self.with(move |c| {
            let tx = c.transaction().map_err(db_err)?;
            tx.execute("DELETE FROM routing WHERE workspace = ?1", [&workspace])
                .map_err(db_err)?;
            for (environment, manager_id) in rows {
                tx.execute(
                    &format!("INSERT INTO routing ({ROUTING_COLUMNS}) VALUES (?1, ?2, ?3)"),
                    params![workspace, environment, manager_id],
                )
                .map_err(db_err)?;
            }
            bump(&tx)?;
            tx.commit().map_err(db_err)
        })
        .await
    }
}
