//! The egress proxy's metric families. `integration_type` takes only values named by a
//! `[[proxy.upstreams]]` entry (a call is counted once its upstream is known), so the label set
//! stays as small as the configuration.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Registry};

use super::{counter_vec, gauge, register};

/// Buckets of `credproxy_proxy_request_duration_seconds`: from a loopback upstream (1 ms) to a
/// slow API (a minute).
const PROXY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Label values of `credproxy_proxy_upstream_errors_total{kind}`: connect (no connection);
/// tls (the handshake failed: the upstream's certificate, or `ca_file`); timeout (`timeout` or
/// `connect_timeout` ran out); body (a body broke off, or went past `proxy.max_body_bytes`);
/// other (an answer that was not HTTP).
pub const PROXY_ERROR_KINDS: [&str; 5] = ["connect", "tls", "timeout", "body", "other"];

pub struct ProxyMetrics {
    /// `{integration_type, status_class}`: `2xx`… of what the worker got.
    pub requests: IntCounterVec,
    /// `{integration_type}`: until the upstream's answer head.
    pub duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    /// `{integration_type}`: calls sent again after a `401` and a refresh.
    pub retries: IntCounterVec,
    pub in_flight: IntGauge,
}

impl ProxyMetrics {
    pub(super) fn new(r: &Registry) -> Self {
        let requests = counter_vec(
            r,
            "credproxy_proxy_requests_total",
            "Calls through the egress proxy, by integration type and the status class the worker got (1xx-5xx).",
            &["integration_type", "status_class"],
        );
        let duration = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "credproxy_proxy_request_duration_seconds",
                    "Egress proxy latency until the upstream's answer head, by integration type.",
                )
                .buckets(PROXY_BUCKETS.to_vec()),
                &["integration_type"],
            )
            .unwrap(),
        );
        let upstream_errors = counter_vec(
            r,
            "credproxy_proxy_upstream_errors_total",
            "Egress proxy calls that failed between credproxy and the upstream, by integration type and kind (connect, tls, timeout, body, other).",
            &["integration_type", "kind"],
        );
        let retries = counter_vec(
            r,
            "credproxy_proxy_retries_total",
            "Egress proxy calls sent again after the upstream refused the access token (401) and it was refreshed.",
            &["integration_type"],
        );
        let in_flight = gauge(
            r,
            "credproxy_proxy_in_flight",
            "Egress proxy calls in flight (until their answer body ends).",
        );
        Self {
            requests,
            duration,
            upstream_errors,
            retries,
            in_flight,
        }
    }

    /// Counts a call answered with `status`.
    pub fn answered(&self, integration_type: &str, status: u16) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests
            .with_label_values(&[integration_type, class])
            .inc();
    }
}
