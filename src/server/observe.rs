//! Per-request metrics without per-request label hashing: each route's latency histogram and
//! its counters for the common status codes are looked up once, then reused.

use std::sync::OnceLock;

use prometheus::{Histogram, IntCounter};

use super::api::RouteId;
use crate::metrics::Metrics;

/// Status codes the API answers; any other is counted through the labelled family directly.
const STATUSES: [u16; 20] = [
    200, 201, 204, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 431, 500, 501, 502, 503,
    504,
];

const ROUTES: usize = RouteId::Unknown as usize + 1;

struct RouteSeries {
    duration: OnceLock<Histogram>,
    statuses: [OnceLock<IntCounter>; STATUSES.len()],
}

/// Lazily resolved, so `/metrics` lists only series that were used, as before.
pub(super) struct RequestMetrics {
    routes: [RouteSeries; ROUTES],
}

impl RequestMetrics {
    pub(super) fn new() -> Self {
        Self {
            routes: std::array::from_fn(|_| RouteSeries {
                duration: OnceLock::new(),
                statuses: std::array::from_fn(|_| OnceLock::new()),
            }),
        }
    }

    pub(super) fn observe(&self, metrics: &Metrics, route: RouteId, status: u16, seconds: f64) {
        let series = &self.routes[route as usize];
        series
            .duration
            .get_or_init(|| metrics.http_duration.with_label_values(&[route.as_str()]))
            .observe(seconds);
        match STATUSES.iter().position(|s| *s == status) {
            Some(i) => series.statuses[i].get_or_init(|| {
                metrics
                    .http_requests
                    .with_label_values(&[route.as_str(), &status.to_string()])
            }),
            None => {
                metrics
                    .http_requests
                    .with_label_values(&[route.as_str(), &status.to_string()])
                    .inc();
                return;
            }
        }
        .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_series_count_into_the_same_families() {
        let metrics = Metrics::new();
        let observed = RequestMetrics::new();
        for status in [200, 200, 404, 299] {
            observed.observe(&metrics, RouteId::CredentialGet, status, 0.001);
        }
        observed.observe(&metrics, RouteId::Unknown, 404, 0.001);
        let text = String::from_utf8(metrics.render()).unwrap();
        for line in [
            r#"credproxy_http_requests_total{route="credential_get",status="200"} 2"#,
            r#"credproxy_http_requests_total{route="credential_get",status="404"} 1"#,
            r#"credproxy_http_requests_total{route="credential_get",status="299"} 1"#,
            r#"credproxy_http_requests_total{route="unknown",status="404"} 1"#,
            r#"credproxy_http_request_duration_seconds_count{route="credential_get"} 4"#,
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert!(
            !text.contains("credential_create"),
            "only used series appear"
        );
    }
}
