//! The daemon's own state: liveness and readiness probes, the effective routing chain, the
//! migration plan, and reloading the configuration file.

use std::sync::Arc;

use hyper::{Response, StatusCode};

use hyper::body::Incoming;
use hyper::Request;

use super::body::{ok_json, read_json, Body};
use super::{require, ApiError, Query};
use crate::access::{Action, Caller};
use crate::server::App;

pub(super) fn health() -> Response<Body> {
    ok_json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// Ready once start-up is done and while the metadata database answers.
pub(super) async fn ready(app: &App) -> Response<Body> {
    let ready = app.is_ready() && app.service.metadata().ping().await.is_ok();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    ok_json(
        status,
        &serde_json::json!({"status": if ready { "ready" } else { "not_ready" }}),
    )
}

pub(super) async fn routing(
    app: &App,
    caller: &Caller,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::Read)?;
    let view = app
        .control
        .get_routing(caller, query.get("workspace"))
        .await?;
    Ok(ok_json(StatusCode::OK, &view))
}

pub(super) async fn put_routing(
    app: &Arc<App>,
    caller: &Caller,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: crate::control::RoutingBody = read_json(app, request).await?;
    Ok(ok_json(
        StatusCode::OK,
        &app.control.put_routing(caller, body).await?,
    ))
}

pub(super) fn migrations(
    app: &App,
    caller: &Caller,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::Admin)?;
    let with_ids = query
        .pairs()
        .any(|(k, v)| k == "ids" && (v == "true" || v == "1"));
    Ok(ok_json(StatusCode::OK, &app.migrator.status(with_ids)))
}

pub(super) async fn reload(app: &Arc<App>, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::Admin)?;
    match app.reloader.reload("api").await {
        Ok(report) => Ok(ok_json(StatusCode::OK, &report)),
        Err(crate::reload::ReloadError::Control(e)) => Err(e.into()),
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            "the configuration file was not reloaded; the running configuration stays in force",
        )
        .with_detail(e.to_string())),
    }
}
