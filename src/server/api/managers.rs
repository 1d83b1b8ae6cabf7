//! `/v1/secretsmanagers`: the configured secrets managers, the instructions for setting each
//! kind up, and a page of the secrets one of them holds.

use std::sync::Arc;

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};

use hyper::body::Incoming;
use hyper::Request;

use super::body::{ok_json, read_json, Body};
use super::{require, ApiError, Query};
use crate::access::{Action, Caller};
use crate::manager::ListRequest;
use crate::server::App;

pub(super) async fn list(
    app: &App,
    caller: &Caller,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::View)?;
    let views = app
        .control
        .list_managers(caller, query.get("workspace"))
        .await?;
    Ok(ok_json(StatusCode::OK, &views))
}

pub(super) async fn create(
    app: &Arc<App>,
    caller: &Caller,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: crate::control::CreateManager = read_json(app, request).await?;
    let view = app.control.create_manager(caller, body).await?;
    Ok(ok_json(StatusCode::CREATED, &view))
}

pub(super) async fn get(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    // As for the list: the local store's view is in no workspace, so this is its only check.
    require(app, caller, Action::View)?;
    Ok(ok_json(
        StatusCode::OK,
        &app.control.get_manager(caller, id).await?,
    ))
}

pub(super) async fn patch(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: crate::control::PatchManager = read_json(app, request).await?;
    Ok(ok_json(
        StatusCode::OK,
        &app.control.patch_manager(caller, id, body).await?,
    ))
}

/// `?dry_run=true` answers the plan and changes nothing; `?credentials=delete` agrees that
/// credentials which cannot move (a read-only manager's) are deleted.
pub(super) async fn delete(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let dry_run = query.flag("dry_run", "true");
    let plan = app
        .control
        .delete_manager(caller, id, dry_run, query.flag("credentials", "delete"))
        .await?;
    let status = if dry_run {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(ok_json(status, &plan))
}

pub(super) fn instructions(app: &App, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::View)?;
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
    let (limit, offset) = query.page()?;
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
