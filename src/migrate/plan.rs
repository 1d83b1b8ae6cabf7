//! The plan of a migration: which credentials are not where the routing chain now puts them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::metadata::{CredentialRecord, Metadata, MetadataError};
use crate::routing::Topology;

/// Credentials read per page while planning.
const PLAN_PAGE: usize = 500;

/// One credential that is not where the chain now says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedMove {
    pub id: String,
    pub source: String,
    pub target: String,
    /// Pinned to a manager that is no longer configured: it falls back along the chain.
    pub pin_unavailable: bool,
}

/// Where `record` belongs under `topology`, if that is not where it is. Read-only managers
/// are never a source or a target.
pub fn plan_one(
    topology: &Topology,
    record: &CredentialRecord,
    read_only: &(dyn Fn(&str) -> bool + Sync),
) -> Option<PlannedMove> {
    let target = topology.route(
        &record.workspace,
        &record.environment,
        record.pinned_manager.as_deref(),
    );
    let source = &record.location.manager_id;
    if &target.manager_id == source || read_only(source) || read_only(&target.manager_id) {
        return None;
    }
    Some(PlannedMove {
        id: record.id.clone(),
        source: source.clone(),
        target: target.manager_id,
        pin_unavailable: target.pin_unavailable,
    })
}

/// The plan for every credential in `store` under `topology`.
pub async fn plan(
    store: &dyn Metadata,
    topology: &Topology,
    read_only: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Vec<PlannedMove>, MetadataError> {
    let mut moves = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_credentials(after.as_deref(), PLAN_PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(moves);
        };
        after = Some(last.id.clone());
        moves.extend(page.iter().filter_map(|r| plan_one(topology, r, read_only)));
    }
}

/// Counts of a plan by source → target.
pub fn summarize(moves: &[PlannedMove]) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for m in moves {
        *out.entry((m.source.clone(), m.target.clone())).or_insert(0) += 1;
    }
    out
}
