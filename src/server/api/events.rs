//! `GET /v1/events`: recent re-authorisation events, for callers that poll instead of (or as
//! well as) receiving webhooks.

use hyper::{Response, StatusCode};

use super::body::{ok_json, Body};
use super::{ApiError, Query};
use crate::access::Caller;
use crate::events::Listed;
use crate::server::App;

/// `?after=<seq>&limit=<n>`: the events recorded after `after` (0 when absent: the oldest
/// kept), at most `limit` (1-500, 100 when absent), in the order they were recorded.
pub(super) async fn list(
    app: &App,
    caller: &Caller,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    for (k, _) in query.pairs() {
        if !matches!(k, "after" | "limit") {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "unknown query parameter",
            )
            .with_detail("this route takes `after` and `limit`"));
        }
    }
    let after = match query.get("after") {
        None => 0,
        Some(v) => v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "the query is invalid",
            )
            .with_detail("`after` must be a whole number (the `seq` of an event)")
        })?,
    };
    let limit = match query.get("limit") {
        None => 100,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "the query is invalid",
                )
                .with_detail("`limit` must be a whole number from 1 to 500")
            })?,
    };
    let page = app.service.list_events(caller, after, limit).await?;
    let events: Vec<Listed<'_>> = page.events.iter().map(Listed::of).collect();
    Ok(ok_json(
        StatusCode::OK,
        &serde_json::json!({
            "events": events,
            "next_after": page.next_after,
            "more": page.more,
        }),
    ))
}
