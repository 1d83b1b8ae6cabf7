//! The Prometheus registry and every metric family. Label values come from closed sets (routes,
//! status codes, configured manager ids, outcomes), never from a credential id or a value.

mod labels;
mod proxy;

pub use labels::*;
pub use proxy::{ProxyMetrics, PROXY_ERROR_KINDS};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 25 µs (a cached read) to 10 s (a slow manager).
const LATENCY_BUCKETS: &[f64] = &[
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub cache_requests: IntCounterVec,
    /// `cache_requests` for hit, miss and stale, resolved once: counted on every read.
    cache_results: [IntCounter; 3],
    pub cache_evictions: IntCounter,
    pub cache_bypasses: IntCounterVec,
    pub cache_entries: IntGauge,
    pub backend_requests: IntCounterVec,
    pub backend_duration: HistogramVec,
    pub oauth_refreshes: IntCounterVec,
    pub oauth_time_to_expiry: Histogram,
    pub needs_reauth: IntGauge,
    pub migration_pending: IntGaugeVec,
    pub invalidations: IntCounterVec,
    pub instance_info: IntGaugeVec,
    pub lease_waits: IntCounter,
    pub move_claims: IntCounterVec,
    pub migration_moves: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub access_denied: IntCounter,
    pub journal_pending: IntGauge,
    pub metadata_write_failures: IntCounterVec,
    pub access_renewals: IntCounterVec,
    pub store_purges: IntCounterVec,
    pub store_purges_pending: IntGaugeVec,
    pub audit_dropped: IntCounter,
    pub events: IntCounterVec,
    pub event_deliveries: IntCounterVec,
    pub events_queued: IntGauge,
    pub fleet_other_routing_configs: IntGauge,
    /// `credproxy_requests_shed_total{scope}`, resolved once: [all, caller].
    pub requests_shed: [IntCounter; 2],
    pub proxy: ProxyMetrics,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    // Names are constants defined below; a duplicate is a programming error caught by tests.
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(registry, IntGauge::new(name, help).unwrap())
}

impl Metrics {
    /// The counter of `credproxy_cache_requests_total{result}`.
    pub fn cache_result(&self, result: &str) -> &IntCounter {
        match result {
            "hit" => &self.cache_results[0],
            "miss" => &self.cache_results[1],
            _ => &self.cache_results[2],
        }
    }

    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let http_requests = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_http_requests_total",
                    "API requests by route and status code.",
                ),
                &["route", "status"],
            )
            .unwrap(),
        );
        let http_duration = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "credproxy_http_request_duration_seconds",
                    "API request latency by route.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["route"],
            )
            .unwrap(),
        );
        let cache_requests = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_cache_requests_total",
                    "Credential lookups by cache result (hit, miss, stale).",
                ),
                &["result"],
            )
            .unwrap(),
        );
        let cache_evictions = register(
            r,
            IntCounter::new(
                "credproxy_cache_evictions_total",
                "Cache entries evicted for size or expiry.",
            )
            .unwrap(),
        );
        let cache_bypasses = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_cache_bypasses_total",
                    "Reads that asked to bypass the cache (Cache-Control: no-cache), by outcome (loaded, limited, failed).",
                ),
                &["outcome"],
            )
            .unwrap(),
        );
        for outcome in BYPASS_OUTCOMES {
            cache_bypasses.with_label_values(&[outcome]);
        }
        let cache_entries = register(
            r,
            IntGauge::new("credproxy_cache_entries", "Credentials currently cached.").unwrap(),
        );
        let backend_requests = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_backend_requests_total",
                    "Calls to secrets managers by manager id, operation and outcome.",
                ),
                &["manager", "operation", "outcome"],
            )
            .unwrap(),
        );
        let backend_duration = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "credproxy_backend_request_duration_seconds",
                    "Secrets manager call latency, by manager id and operation.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["manager", "operation"],
            )
            .unwrap(),
        );
        let oauth_refreshes = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_oauth_refreshes_total",
                    "OAuth token refreshes by outcome.",
                ),
                &["outcome"],
            )
            .unwrap(),
        );
        let oauth_time_to_expiry = register(
            r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "credproxy_oauth_time_to_expiry_seconds",
                    "Time left on an access token when it was refreshed.",
                )
                .buckets(vec![
                    0.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                ]),
            )
            .unwrap(),
        );
        let needs_reauth = register(
            r,
            IntGauge::new(
                "credproxy_credentials_needing_reauth",
                "Credentials whose refresh token was rejected and need the user to authorise again.",
            )
            .unwrap(),
        );
        let migration_pending = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "credproxy_migration_pending",
                    "Credentials waiting to be moved, by source and target secrets manager.",
                ),
                &["source", "target"],
            )
            .unwrap(),
        );
        let invalidations = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_cache_invalidations_received_total",
                    "Cache invalidations received from other instances (credential) and full flushes after a lost connection (all).",
                ),
                &["kind"],
            )
            .unwrap(),
        );
        let instance_info = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "credproxy_instance_info",
                    "This instance's id among those sharing the metadata database; always 1.",
                ),
                &["instance"],
            )
            .unwrap(),
        );
        let lease_waits = register(
            r,
            IntCounter::new(
                "credproxy_refresh_lease_waits_total",
                "Refreshes that waited for another instance's refresh lease.",
            )
            .unwrap(),
        );
        let move_claims = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_migration_claims_total",
                    "Move claims: taken by this instance, or busy (another instance moves it).",
                ),
                &["outcome"],
            )
            .unwrap(),
        );
        for outcome in ["taken", "busy"] {
            move_claims.with_label_values(&[outcome]);
        }
        let migration_moves = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_migration_moves_total",
                    "Background move attempts by source, target and outcome (moved, failed).",
                ),
                &["source", "target", "outcome"],
            )
            .unwrap(),
        );
        let config_reloads = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_config_reloads_total",
                    "Configuration reloads by outcome.",
                ),
                &["outcome"],
            )
            .unwrap(),
        );
        let access_denied = register(
            r,
            IntCounter::new(
                "credproxy_access_denied_total",
                "Requests refused by the access policy.",
            )
            .unwrap(),
        );
        let journal_pending = register(
            r,
            IntGauge::new(
                "credproxy_journal_pending",
                "Secret copies awaiting clean-up after a crash, move or delete.",
            )
            .unwrap(),
        );
        let metadata_write_failures = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_metadata_write_failures_total",
                    "Failed writes to the metadata database by reason (full, read_only, locked, unavailable, other).",
                ),
                &["reason"],
            )
            .unwrap(),
        );
        for reason in METADATA_WRITE_FAILURE_REASONS {
            metadata_write_failures.with_label_values(&[reason]);
        }
        let access_renewals = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_backend_access_renewals_total",
                    "Secrets manager clients rebuilt with fresh access (renewed: after a refusal; rotated: access-detail files changed), renewals whose fresh access was refused again, renewals skipped while backing off, and rebuilds that failed.",
                ),
                &["manager", "outcome"],
            )
            .unwrap(),
        );
        let store_purges = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "credproxy_store_purges_total",
                    "Attempts to purge soft-deleted secrets, by manager and outcome (purged, gone, waiting, denied, failed).",
                ),
                &["manager", "outcome"],
            )
            .unwrap(),
        );
        let store_purges_pending = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "credproxy_store_purges_pending",
                    "Soft-deleted secrets awaiting their purge, by manager.",
                ),
                &["manager"],
            )
            .unwrap(),
        );
        let audit_dropped = register(
            r,
            IntCounter::new(
                "credproxy_audit_lines_dropped_total",
                "Audit lines lost: dropped because the audit buffer was full, or not written.",
            )
            .unwrap(),
        );
        let events = counter_vec(
            r,
            "credproxy_events_total",
            "Events recorded by this instance, by type.",
            &["type"],
        );
        let event_deliveries = counter_vec(
            r,
            "credproxy_event_deliveries_total",
            "Webhook delivery attempts made by this instance, by outcome (delivered, retried, failed, unrouted).",
            &["outcome"],
        );
        let events_queued = gauge(
            r,
            "credproxy_events_queued",
            "Events awaiting webhook delivery in the metadata database (all instances).",
        );
        let fleet_other_routing_configs = gauge(
            r,
            "credproxy_fleet_other_routing_configs",
            "Routing configurations other than this instance's that live instances sharing the metadata database run (moves wait while it is not 0).",
        );
        let requests_shed = counter_vec(
            r,
            "credproxy_requests_shed_total",
            "Requests answered 503 overloaded, by scope (all: server.max_concurrent_requests in flight; caller: the caller's server.max_requests_per_caller).",
            &["scope"],
        );
        let build_info = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "credproxy_build_info",
                    "Build information; the value is always 1.",
                ),
                &["version"],
            )
            .unwrap(),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        // Families with a closed label set start at zero so dashboards see them before use.
        for result in ["hit", "miss", "stale"] {
            cache_requests.with_label_values(&[result]);
        }
        for outcome in OAUTH_OUTCOMES {
            oauth_refreshes.with_label_values(&[outcome]);
        }
        for outcome in ["success", "failure"] {
            config_reloads.with_label_values(&[outcome]);
        }
        for kind in crate::metadata::EventKind::ALL {
            events.with_label_values(&[kind.as_str()]);
        }
        for outcome in EVENT_DELIVERY_OUTCOMES {
            event_deliveries.with_label_values(&[outcome]);
        }

        let proxy = ProxyMetrics::new(r);
        Self {
            registry,
            http_requests,
            http_duration,
            cache_results: ["hit", "miss", "stale"].map(|r| cache_requests.with_label_values(&[r])),
            cache_requests,
            cache_evictions,
            cache_bypasses,
            cache_entries,
            backend_requests,
            backend_duration,
            oauth_refreshes,
            migration_pending,
            migration_moves,
            invalidations,
            instance_info,
            lease_waits,
            move_claims,
            oauth_time_to_expiry,
            needs_reauth,
            config_reloads,
            access_denied,
            journal_pending,
            metadata_write_failures,
            access_renewals,
            store_purges,
            store_purges_pending,
            audit_dropped,
            events,
            event_deliveries,
            events_queued,
            fleet_other_routing_configs,
            requests_shed: ["all", "caller"].map(|s| requests_shed.with_label_values(&[s])),
            proxy,
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on a malformed family, which the constructors prevent.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
