//! The control plane's rows and the queues worked in the background (purges, events), as the
//! daemon uses them: each call through [`Observed`]'s failure accounting.

use std::collections::HashMap;

use async_trait::async_trait;

use super::Observed;
use crate::metadata::{
    ControlRows, EventRecord, EventRows, ManagerRecord, MetadataError, PurgeEntry, PurgeRows,
    RoutingRecord,
};

#[async_trait]
impl ControlRows for Observed {
    async fn control_version(&self) -> Result<i64, MetadataError> {
        self.read("control_version", self.inner.control_version())
            .await
    }

    async fn managers(&self) -> Result<Vec<ManagerRecord>, MetadataError> {
        self.read("managers", self.inner.managers()).await
    }

    async fn manager_get(&self, id: &str) -> Result<Option<ManagerRecord>, MetadataError> {
        self.read("manager_get", self.inner.manager_get(id)).await
    }

    async fn manager_insert(&self, record: &ManagerRecord) -> Result<(), MetadataError> {
        self.write("manager_insert", self.inner.manager_insert(record))
            .await
    }

    async fn manager_update(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError> {
        self.write(
            "manager_update",
            self.inner.manager_update(record, expected_row_version),
        )
        .await
    }

    async fn manager_retire(
        &self,
        record: &ManagerRecord,
        expected_row_version: i64,
    ) -> Result<(), MetadataError> {
        self.write(
            "manager_retire",
            self.inner.manager_retire(record, expected_row_version),
        )
        .await
    }

    async fn manager_delete(&self, id: &str) -> Result<(), MetadataError> {
        self.write("manager_delete", self.inner.manager_delete(id))
            .await
    }

    async fn routing_all(&self) -> Result<Vec<RoutingRecord>, MetadataError> {
        self.read("routing_all", self.inner.routing_all()).await
    }

    async fn routing_put(&self, record: &RoutingRecord) -> Result<(), MetadataError> {
        self.write("routing_put", self.inner.routing_put(record))
            .await
    }
}

#[async_trait]
impl PurgeRows for Observed {
    async fn purge_add(&self, entry: &PurgeEntry) -> Result<(), MetadataError> {
        self.write("purge_add", self.inner.purge_add(entry)).await
    }

    async fn purge_get(
        &self,
        manager_id: &str,
        name: &str,
    ) -> Result<Option<PurgeEntry>, MetadataError> {
        self.read("purge_get", self.inner.purge_get(manager_id, name))
            .await
    }

    async fn purge_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PurgeEntry>, MetadataError> {
        self.read("purge_due", self.inner.purge_due(now_ms, limit))
            .await
    }

    async fn purge_reschedule(&self, entry: &PurgeEntry) -> Result<(), MetadataError> {
        self.write("purge_reschedule", self.inner.purge_reschedule(entry))
            .await
    }

    async fn purge_remove(&self, entry: &PurgeEntry) -> Result<(), MetadataError> {
        self.write("purge_remove", self.inner.purge_remove(entry))
            .await
    }

    async fn purge_counts(&self) -> Result<HashMap<String, u64>, MetadataError> {
        self.read("purge_counts", self.inner.purge_counts()).await
    }
}

#[async_trait]
impl EventRows for Observed {
    async fn event_add(
        &self,
        event: &EventRecord,
        requires: Option<&str>,
    ) -> Result<bool, MetadataError> {
        self.write("event_add", self.inner.event_add(event, requires))
            .await
    }

    async fn event_get(&self, seq: i64) -> Result<Option<EventRecord>, MetadataError> {
        self.read("event_get", self.inner.event_get(seq)).await
    }

    async fn events_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError> {
        self.read("events_after", self.inner.events_after(after, limit))
            .await
    }

    async fn events_due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<EventRecord>, MetadataError> {
        self.read("events_due", self.inner.events_due(now_ms, limit))
            .await
    }

    async fn event_delivery(
        &self,
        event: &EventRecord,
        expected: (i64, i64),
    ) -> Result<bool, MetadataError> {
        self.write("event_delivery", self.inner.event_delivery(event, expected))
            .await
    }

    async fn events_pending(&self) -> Result<u64, MetadataError> {
        self.read("events_pending", self.inner.events_pending())
            .await
    }

    async fn events_prune(&self, before_ms: i64) -> Result<u64, MetadataError> {
        self.write("events_prune", self.inner.events_prune(before_ms))
            .await
    }
}
