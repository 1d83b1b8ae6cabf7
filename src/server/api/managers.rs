//! `/v1/secretsmanagers`: the configured secrets managers, the instructions for setting each
//! kind up, and a page of the secrets one of them holds.

use std::sync::Arc;

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};

use super::body::{ok_json, Body};
use super::{require, ApiError, Query};
use crate::access::{Action, Caller};
use crate::manager::ListRequest;
use crate::server::App;

pub(super) fn list(app: &App, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::Read)?;
    let runtime = app.service.runtime();
    let mut managers: Vec<serde_json::Value> = runtime
        .config
        .managers
        .iter()
        .map(|m| {
            let caps = runtime
                .registry
                .get(&m.id)
                .map(|b| b.describe().capabilities);
            serde_json::json!({
                "id": m.id,
                "type": m.kind,
                "prefix": m.prefix,
                "read_only": caps.map_or_else(
                    || crate::manager::descriptor::find(&m.kind).is_some_and(|d| d.read_only),
                    |c| c.read_only,
                ),
                "compare_and_swap": caps.is_some_and(|c| c.compare_and_swap),
            })
        })
        .collect();
    managers.push(serde_json::json!({
        "id": crate::config::LOCAL_MANAGER_ID, "type": "local", "prefix": "",
        "read_only": false, "compare_and_swap": true,
    }));
    Ok(ok_json(StatusCode::OK, &managers))
}

pub(super) fn instructions(app: &App, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::Read)?;
    Ok(ok_json(
        StatusCode::OK,
        &crate::manager::descriptor::instructions(),
    ))
}

/// One page of a manager's own listing; `x-next-offset` says where the next page starts.
pub(super) async fn secrets(
    app: &Arc<App>,
    caller: &Caller,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let manager = query.get("secretsmanager_id").ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the request is invalid",
        )
        .with_detail("`secretsmanager_id` is required")
    })?;
    let number = |name: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match query.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "the request is invalid",
                    )
                    .with_detail(format!("`{name}` must be a whole number up to {max}"))
                }),
        }
    };
    let limit = number("limit", 50, 500)?.max(1);
    let offset = number("offset", 0, 1_000_000)?;
    let page = app
        .service
        .list_manager_secrets(
            caller,
            manager,
            ListRequest {
                query: query
                    .get("query")
                    .filter(|q| !q.is_empty())
                    .map(str::to_owned),
                offset,
                limit,
            },
        )
        .await?;
    let mut response = ok_json(StatusCode::OK, &page.items);
    if page.more {
        response.headers_mut().insert(
            "x-next-offset",
            HeaderValue::from(offset + page.items.len()),
        );
    }
    Ok(response)
}
