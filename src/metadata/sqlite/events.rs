//! Re-authorisation events in SQLite.

use async_trait::async_trait;
use rusqlite::{params, Connection};

use super::{db_err, query_all, query_first, SqliteMetadata};
use crate::metadata::codec::{self, EVENT_COLUMNS, EVENT_INSERT_COLUMNS};
use crate::metadata::{Delivery, EventRecord, EventRows, MetadataError};

/// Records `event` unless its id is taken; whether it was recorded. Also called inside the
/// transaction of a credential update.
pub(super) fn event_insert(
    conn: &Connection,
    e: &EventRecord,
    requires: Option<&str>,
) -> Result<bool, MetadataError> {
    conn.execute(
        &format!(
            "INSERT INTO events ({EVENT_INSERT_COLUMNS}) \
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 \
             WHERE ?13 IS NULL OR EXISTS (SELECT 1 FROM events WHERE id = ?13) \
             ON CONFLICT (id) DO NOTHING"
        ),
        params![
            e.id,
            e.kind.as_str(),
            e.credential_id,
            e.workspace,
            e.environment,
            e.integration_type,
            e.reason,
            e.at_ms,
            e.delivery.as_str(),
            e.attempts,
            e.next_at_ms,
            e.last_outcome,
            requires
        ],
    )
    .map(|n| n == 1)
    .map_err(db_err)
}

#[async_trait]
impl EventRows for SqliteMetadata {
    async fn event_add(
        &self,
        event: &EventRecord,
        requires: Option<&str>,
    ) -> Result<bool, MetadataError> {
        let e = event.clone();
        let requires = requires.map(str::to_owned);
        self.with(move |c| event_insert(c, &e, requires.as_deref()))
            .await
    }

    async fn event_get(&self, seq: i64) -> Result<Option<EventRecord>, MetadataError> {
        self.with(move |c| {
            query_first(
                c,
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq = ?1"),
                params![seq],
                codec::event,
            )
        })
        .await
    }

    async fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError> {
        self.with(move |c| {
            query_all(
                c,
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"),
                params![after, limit as i64],
                codec::event,
            )
        })
        .await
    }

    async fn events_due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError> {
        self.with(move |c| {
            query_all(
                c,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE delivery = 'pending' AND next_at_ms <= ?1 \
                     ORDER BY next_at_ms LIMIT ?2"
                ),
                params![now_ms, limit as i64],
                codec::event,
            )
        })
        .await
    }

    async fn event_delivery(
        &self,
        event: &EventRecord,
        (attempts, next_at_ms): (i64, i64),
    ) -> Result<bool, MetadataError> {
        let e = event.clone();
        self.with(move |c| {
            c.execute(
                "UPDATE events SET delivery = ?1, attempts = ?2, next_at_ms = ?3, last_outcome = ?4 \
                 WHERE seq = ?5 AND delivery = ?6 AND attempts = ?7 AND next_at_ms = ?8",
                params![
                    e.delivery.as_str(),
                    e.attempts,
                    e.next_at_ms,
                    e.last_outcome,
                    e.seq,
                    Delivery::Pending.as_str(),
                    attempts,
                    next_at_ms
                ],
            )
            .map(|n| n == 1)
            .map_err(db_err)
        })
        .await
    }

    async fn events_pending(&self) -> Result<u64, MetadataError> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM events WHERE delivery = 'pending'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
            .map_err(db_err)
        })
        .await
    }

    async fn events_prune(&self, before_ms: i64) -> Result<u64, MetadataError> {
        self.with(move |c| {
            c.execute("DELETE FROM events WHERE at_ms < ?1", params![before_ms])
                .map(|n| n as u64)
                .map_err(db_err)
        })
        .await
    }
}
