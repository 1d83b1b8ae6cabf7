//! The closed sets of label values the `outcome` and `reason` labels take.

/// Label values of `credproxy_oauth_refreshes_total{outcome}`.
pub const OAUTH_OUTCOMES: [&str; 7] = [
    "success",
    "recovered",
    "skipped",
    "invalid_grant",
    "rejected",
    "unavailable",
    "write_failed",
];

/// Label values of `credproxy_cache_bypasses_total{outcome}`: loaded (read from the store);
/// limited (within `cache.bypass_interval` of the last one, no store read); failed (the store
/// read failed).
pub const BYPASS_OUTCOMES: [&str; 3] = ["loaded", "limited", "failed"];

/// Label values of `credproxy_metadata_write_failures_total{reason}` (the metadata
/// database's failure kinds).
pub const METADATA_WRITE_FAILURE_REASONS: [&str; 5] =
    ["full", "read_only", "locked", "unavailable", "other"];

/// Label values of `credproxy_store_purges_total{outcome}`: purged; gone (nothing left to
/// purge); waiting (the delete still runs); denied (no permission); failed (anything else).
pub const PURGE_OUTCOMES: [&str; 5] = ["purged", "gone", "waiting", "denied", "failed"];

/// Label values of `credproxy_event_deliveries_total{outcome}`: delivered (the webhook
/// answered 2xx); retried (an attempt failed and another is scheduled); failed (given up after
/// `events.give_up_after`); unrouted (no webhook takes its workspace on this instance; put off
/// for a minute).
pub const EVENT_DELIVERY_OUTCOMES: [&str; 4] = ["delivered", "retried", "failed", "unrouted"];
