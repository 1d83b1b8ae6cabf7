//! The daemon's own state: liveness and readiness probes, the effective routing chain, the
//! migration plan, and reloading the configuration file.

use std::sync::Arc;

use hyper::{Response, StatusCode};

use super::body::{ok_json, Body};
use super::{require, ApiError, Query};
use crate::access::{Action, Caller};
use crate::server::App;
use crate::service::ServiceError;

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

pub(super) fn routing(app: &App, caller: &Caller) -> Result<Response<Body>, ApiError> {
    require(app, caller, Action::Read)?;
    let runtime = app.service.runtime();
    let routing = &runtime.config.routing;
    Ok(ok_json(
        StatusCode::OK,
        &serde_json::json!({
            "default": routing.default.as_deref().unwrap_or(crate::config::LOCAL_MANAGER_ID),
            "environments": routing.environments,
            "fallback": crate::config::LOCAL_MANAGER_ID,
        }),
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
        Err(crate::reload::ReloadError::Metadata(_)) => {
            Err(ServiceError::Metadata("during reload".into()).into())
        }
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_config",
            "the configuration file was not reloaded; the running configuration stays in force",
        )
        .with_detail(e.to_string())),
    }
}
