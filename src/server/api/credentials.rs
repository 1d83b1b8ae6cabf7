//! `/v1/credentials`: create, read, patch, delete and force-refresh one credential. A read
//! answers with the body the cache rendered (`cache::view`, the one place secret values are
//! serialised for a caller).

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use super::body::{json_response, ok_json, read_json, Body};
use super::{ApiError, Audit, Query};
use crate::access::Caller;
use crate::cache::{view, Entry};
use crate::metadata::CredentialRecord;
use crate::server::App;
use crate::service::{CreateRequest, PatchRequest};

pub(super) async fn get(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
    query: &Query,
    audit: &mut Audit<'_>,
) -> Result<Response<Body>, ApiError> {
    let service = &app.service;
    let fields = query.fields();
    let (entry, status) = service.get(caller, id).await?;
    if app.audits() {
        audit.fields = Some(view::field_names(&entry, fields.as_deref()));
    }
    let body = view::body(&entry, fields.as_deref(), pin_unavailable(app, &entry));
    let mut response = json_response(StatusCode::OK, body);
    response
        .headers_mut()
        .insert("cache-status", HeaderValue::from_static(status.as_str()));
    Ok(response)
}

/// Whether `entry` is pinned to a manager removed from the configuration: the credential falls
/// back along the chain (and is moved there), and its read says so.
pub(super) fn pin_unavailable(app: &App, entry: &Entry) -> bool {
    entry.pinned_manager().is_some_and(|p| {
        app.service
            .route_for(entry.workspace(), entry.environment(), Some(p))
            .pin_unavailable
    })
}

pub(super) async fn create(
    app: &Arc<App>,
    caller: &Caller,
    request: Request<Incoming>,
    audit: &mut Audit<'_>,
) -> Result<Response<Body>, ApiError> {
    let body: CreateRequest = read_json(app, request).await?;
    let outcome = app.service.create(caller, body).await?;
    audit.credential = Some(outcome.record.id.clone().into());
    Ok(write_response(StatusCode::CREATED, &outcome.record))
}

pub(super) async fn patch(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body: PatchRequest = read_json(app, request).await?;
    let outcome = app.service.patch(caller, id, body).await?;
    Ok(write_response(StatusCode::OK, &outcome.record))
}

pub(super) async fn delete(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    app.service.delete(caller, id).await?;
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

pub(super) async fn refresh(
    app: &Arc<App>,
    caller: &Caller,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    let outcome = app.service.force_refresh(caller, id).await?;
    let record = outcome.record();
    Ok(ok_json(
        StatusCode::OK,
        &serde_json::json!({
            "id": record.id,
            "refreshed": matches!(outcome, crate::service::Refreshed::Done(_)),
            "expires_at": record.expires_at.map(crate::time::rfc3339),
            "secrets_manager_id": record.location.manager_id,
            "reference": reference(record),
        }),
    ))
}

#[derive(Serialize)]
struct Reference<'a> {
    name: &'a str,
    version: Option<&'a str>,
}

fn reference(record: &CredentialRecord) -> Reference<'_> {
    Reference {
        name: &record.location.name,
        version: record.location.version.as_deref(),
    }
}

fn write_response(status: StatusCode, record: &CredentialRecord) -> Response<Body> {
    ok_json(
        status,
        &serde_json::json!({
            "id": record.id,
            "workspace": record.workspace,
            "secrets_manager_id": record.location.manager_id,
            "reference": reference(record),
            "pinned_secrets_manager_id": record.pinned_manager,
        }),
    )
}
