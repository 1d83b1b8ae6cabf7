//! The daemon's own state: liveness and readiness probes, the effective routing chain, the
//! migration plan, and reloading the configuration file.

use std::sync::Arc;

use hyper::{Response, StatusCode};

use hyper::body::Incoming;
use hyper::Request;

use super::body::{ok_json, read_json, Body};
use super::{require, ApiError, Query};
use crate::access::{Action, Caller};
use crate::metadata::Fault;
use crate::server::App;
use crate::service::ServiceError;

pub(super) fn health() -> Response<Body> {
    ok_json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// Ready once start-up is done, while the metadata database answers, and while it can be
/// written: after a write failed because the disk is full or the database read-only or
/// unreachable, not ready until a write succeeds again (the instance heartbeat retries every
/// two seconds). Reads are served meanwhile; readiness is what orchestrators and operators
/// look at.
pub(super) async fn ready(app: &App) -> Response<Body> {
    let metadata = app.service.metadata();
    let reason = if !app.is_ready() {
        Some("starting")
    } else if metadata.ping().await.is_err() {
        Some("metadata_unreachable")
    } else {
        metadata.write_fault().map(|fault| match fault {
            Fault::Full => "metadata_full",
            Fault::ReadOnly => "metadata_read_only",
            _ => "metadata_unwritable",
        })
    };
    match reason {
        None => ok_json(StatusCode::OK, &serde_json::json!({"status": "ready"})),
        Some(reason) => ok_json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "not_ready", "reason": reason}),
        ),
    }
}

pub(super) async fn routing(
    app: &App,
    caller: &Caller,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::View)?;
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
    let with_ids = query
        .pairs()
        .any(|(k, v)| k == "ids" && (v == "true" || v == "1"));
    let Some(workspace) = query.get("workspace") else {
        // Every workspace's moves: for operators of all of them.
        if !app
            .service
            .allows(caller, Action::Admin, crate::access::Scope::EVERY_WORKSPACE)
        {
            return Err(ServiceError::Forbidden.into());
        }
        return Ok(ok_json(StatusCode::OK, &app.migrator.status(with_ids)));
    };
    if !app.service.allows(
        caller,
        Action::Admin,
        crate::access::Scope::workspace(workspace),
    ) {
        return Err(ServiceError::Forbidden.into());
    }
    // A move of a workspace's credential has one of the workspace's managers on one side:
    // routing never sends a credential to another workspace's manager.
    let runtime = app.service.runtime();
    let ours = |id: &str| {
        runtime
            .topology
            .manager(id)
            .is_some_and(|m| m.workspace == workspace)
    };
    let mut status = app.migrator.status(with_ids);
    status.moves.retain(|p| ours(&p.source) || ours(&p.target));
    status
        .failures
        .retain(|f| ours(&f.source) || ours(&f.target));
    status.pending = status.moves.iter().map(|p| p.pending).sum();
    Ok(ok_json(StatusCode::OK, &status))
}

pub(super) async fn reload(app: &Arc<App>, caller: &Caller) -> Result<Response<Body>, ApiError> {
    // The file is every workspace's: reloading it is for operators of all of them.
    if !app
        .service
        .allows(caller, Action::Admin, crate::access::Scope::EVERY_WORKSPACE)
    {
        return Err(ServiceError::Forbidden.into());
    }
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
