//! The control plane's rows in PostgreSQL: secrets managers, routing, and the control version.
//! Every change bumps the version and appends to the change feed in its own transaction, so
//! other instances hear of it once it commits (and still compare the version now and then).

use async_trait::async_trait;
use tokio_postgres::Transaction;

use super::fleet::{change_insert, Change};
use super::{db_err, decode_all, decode_opt, unique_violation, PostgresMetadata};
use crate::metadata::codec::{self, ManagerColumns, MANAGER_COLUMNS, ROUTING_COLUMNS};
use crate::metadata::{ControlRows, ManagerRecord, MetadataError, RoutingRecord};

impl PostgresMetadata {
    /// Bumps the control version and announces the change, both inside `tx`: the notification
    /// is delivered only if the change commits.
    async fn control_changed(&self, tx: &Transaction<'_>) -> Result<(), MetadataError> {
        let changed = tx
            .execute_typed(
                "UPDATE control SET version = version + 1 WHERE id = 1",
                params![],
            )
            .await
            .map_err(db_err)?;
        // The seed row is part of the schema: without it no instance would notice any change.
        if changed != 1 {
            return Err(MetadataError::Corrupt("the control row is missing".into()));
        }
        change_insert(tx, Change::Control, &self.origin).await
    }

    /// Replaces the manager row if its row_version is still `expected` (`Conflict` if it
    /// changed or is gone; `created_at` is kept), with `retire` also dropping every routing
    /// entry naming it: all in one transaction with the version bump.
    async fn manager_replace(
        &self,
        r: &ManagerRecord,
        expected: i64,
        retire: bool,
    ) -> Result<(), MetadataError> {
        let m = ManagerColumns::of(r)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let changed = tx
            .execute_typed(
                "UPDATE managers SET workspace=$2, name=$3, kind=$4, prefix=$5, settings=$6, \
                 auth_keys=$7, auth_version=$8, auth_key_id=$9, auth_wrapped_key=$10, \
                 auth_ciphertext=$11, auth_created_at=$12, source=$13, state=$14, row_version=$15, \
                 updated_at=$16 WHERE id=$1 AND row_version=$17",
                params![
                    &r.id,
                    &r.workspace,
                    &r.name,
                    &r.kind,
                    &r.prefix,
                    &m.settings,
                    &m.auth_keys,
                    &m.auth_version,
                    &m.auth_key_id,
                    &m.auth_wrapped_key,
                    &m.auth_ciphertext,
                    &m.auth_created_at,
                    &m.source,
                    &m.state,
                    &r.row_version,
                    &r.updated_at,
                    &expected,
                ],
            )
            .await
            .map_err(db_err)?;
        if changed == 0 {
            return Err(MetadataError::Conflict);
        }
        if retire {
            tx.execute_typed("DELETE FROM routing WHERE manager_id = $1", params![&r.id])
                .await
                .map_err(db_err)?;
        }
        self.control_changed(&tx).await?;
        tx.commit().await.map_err(db_err)
    }
}

#[async_trait]
impl ControlRows for PostgresMetadata {
    async fn control_version(&self) -> Result<i64, MetadataError> {
        let conn = self.pool.get().await?;
        conn.query_typed_one("SELECT version FROM control WHERE id = 1", params![])
            .await
            .map(|r| r.get(0))
            .map_err(db_err)
    }

    async fn managers(&self) -> Result<Vec<ManagerRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!("SELECT {MANAGER_COLUMNS} FROM managers ORDER BY id"),
                params![],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::manager)
    }

    async fn manager_get(&self, id: &str) -> Result<Option<ManagerRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(
                &format!("SELECT {MANAGER_COLUMNS} FROM managers WHERE id = $1"),
                params![&id],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::manager)
    }

    async fn manager_insert(&self, r: &ManagerRecord) -> Result<(), MetadataError> {
        let m = ManagerColumns::of(r)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let inserted = tx
            .execute_typed(
                &format!(
                    "INSERT INTO managers ({MANAGER_COLUMNS}) \
                     VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"
                ),
                params![
                    &r.id,
                    &r.workspace,
                    &r.name,
                    &r.kind,
                    &r.prefix,
                    &m.settings,
                    &m.auth_keys,
                    &m.auth_version,
                    &m.auth_key_id,
                    &m.auth_wrapped_key,
                    &m.auth_ciphertext,
                    &m.auth_created_at,
                    &m.source,
                    &m.state,
                    &r.row_version,
                    &r.created_at,
                    &r.updated_at,
                ],
            )
            .await;
        match inserted {
            // Only the id is unique.
            Err(e) if unique_violation(&e) => return Err(MetadataError::AlreadyExists),
            other => other.map_err(db_err)?,
        };
        self.control_changed(&tx).await?;
        tx.commit().await.map_err(db_err)
    }

    async fn manager_update(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError> {
        self.manager_replace(record, expected_row_version, false)
            .await
    }

    async fn manager_retire(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError> {
        self.manager_replace(record, expected_row_version, true)
            .await
    }

    async fn manager_delete(&self, id: &str) -> Result<(), MetadataError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let deleted = tx
            .execute_typed("DELETE FROM managers WHERE id = $1", params![&id])
            .await
            .map_err(db_err)?;
        // Nothing changed when nothing was there: no instance needs to reload.
        if deleted > 0 {
            self.control_changed(&tx).await?;
        }
        tx.commit().await.map_err(db_err)
    }

    async fn routing_all(&self) -> Result<Vec<RoutingRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!("SELECT {ROUTING_COLUMNS} FROM routing ORDER BY workspace, environment"),
                params![],
            )
            .await
            .map_err(db_err)?;
        Ok(codec::routing_records(decode_all(
            rows,
            codec::routing_entry,
        )?))
    }

    async fn routing_put(&self, record: &RoutingRecord) -> Result<(), MetadataError> {
        let rows = codec::routing_rows(record)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        tx.execute_typed(
            "DELETE FROM routing WHERE workspace = $1",
            params![&record.workspace],
        )
        .await
        .map_err(db_err)?;
        for (environment, manager_id) in &rows {
            tx.execute_typed(
                &format!("INSERT INTO routing ({ROUTING_COLUMNS}) VALUES ($1, $2, $3)"),
                params![&record.workspace, environment, manager_id],
            )
            .await
            .map_err(db_err)?;
        }
        self.control_changed(&tx).await?;
        tx.commit().await.map_err(db_err)
    }
}
