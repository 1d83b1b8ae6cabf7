//! Re-authorisation events in PostgreSQL.

use async_trait::async_trait;

use super::{db_err, decode_all, decode_opt, PostgresMetadata};
use crate::metadata::codec::{self, EVENT_COLUMNS, EVENT_INSERT_COLUMNS};
use crate::metadata::{Delivery, EventRecord, EventRows, MetadataError};

/// Key of the advisory lock that serialises the transactions recording events. A sequence
/// hands out numbers at insert, not at commit: without the lock, a poller that has read
/// event 8 could miss an event 7 committed after it. Events are rare, so the wait is too.
const EVENTS_LOCK: i64 = 0x6372_6564_6576_7473; // "credevts"

/// Records `event` unless its id is taken; whether it was recorded. Also called inside the
/// transaction of a credential update.
pub(super) async fn event_insert(
    tx: &tokio_postgres::Transaction<'_>,
    e: &EventRecord,
    requires: Option<&str>,
) -> Result<bool, MetadataError> {
    tx.execute_typed("SELECT pg_advisory_xact_lock($1)", params![&EVENTS_LOCK])
        .await
        .map_err(db_err)?;
    tx.execute_typed(
        &format!(
            "INSERT INTO events ({EVENT_INSERT_COLUMNS}) \
             SELECT $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12 \
             WHERE $13::TEXT IS NULL OR EXISTS (SELECT 1 FROM events WHERE id = $13::TEXT) \
             ON CONFLICT (id) DO NOTHING"
        ),
        params![
            &e.id,
            &e.kind.as_str(),
            &e.credential_id,
            &e.workspace,
            &e.environment,
            &e.integration_type,
            &e.reason,
            &e.at_ms,
            &e.delivery.as_str(),
            &e.attempts,
            &e.next_at_ms,
            &e.last_outcome,
            &requires,
        ],
    )
    .await
    .map(|n| n == 1)
    .map_err(db_err)
}

#[async_trait]
impl EventRows for PostgresMetadata {
    async fn event_add(
        &self,
        event: &EventRecord,
        requires: Option<&str>,
    ) -> Result<bool, MetadataError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let added = event_insert(&tx, event, requires).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(added)
    }

    async fn event_get(&self, seq: i64) -> Result<Option<EventRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq = $1"),
                params![&seq],
            )
            .await
            .map_err(db_err)?;
        decode_opt(row, codec::event)
    }

    async fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"),
                params![&after, &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::event)
    }

    async fn events_due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_typed(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE delivery = 'pending' AND next_at_ms <= $1 \
                     ORDER BY next_at_ms LIMIT $2"
                ),
                params![&now_ms, &(limit as i64)],
            )
            .await
            .map_err(db_err)?;
        decode_all(rows, codec::event)
    }

    async fn event_delivery(
        &self,
        e: &EventRecord,
        (attempts, next_at_ms): (i64, i64),
    ) -> Result<bool, MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed(
            "UPDATE events SET delivery = $1, attempts = $2, next_at_ms = $3, last_outcome = $4 \
             WHERE seq = $5 AND delivery = $6 AND attempts = $7 AND next_at_ms = $8",
            params![
                &e.delivery.as_str(),
                &e.attempts,
                &e.next_at_ms,
                &e.last_outcome,
                &e.seq,
                &Delivery::Pending.as_str(),
                &attempts,
                &next_at_ms,
            ],
        )
        .await
        .map(|n| n == 1)
        .map_err(db_err)
    }

    async fn events_pending(&self) -> Result<u64, MetadataError> {
        let conn = self.pool.get().await?;
        conn.query_typed_one(
            "SELECT COUNT(*) FROM events WHERE delivery = 'pending'",
            params![],
        )
        .await
        .map(|r| r.get::<_, i64>(0) as u64)
        .map_err(db_err)
    }

    async fn events_prune(&self, before_ms: i64) -> Result<u64, MetadataError> {
        let conn = self.pool.get().await?;
        conn.execute_typed("DELETE FROM events WHERE at_ms < $1", params![&before_ms])
            .await
            .map_err(db_err)
    }
}
