//! `/v1/credentials`: create, read, patch, delete and force-refresh one credential, and the
//! one place secret values are serialised for a caller.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use super::body::{ok_json, read_json, secret_json, Body};
use super::{ApiError, Audit, Query};
use crate::access::Caller;
use crate::metadata::CredentialRecord;
use crate::secret::SecretFields;
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
    let secrets = &entry.loaded.secrets;
    if app.audit {
        audit.fields = Some(secrets.selected_names(fields.as_deref()));
    }
    let record = &entry.loaded.record;
    // A pin to a manager removed from the configuration: the credential falls back
    // along the chain (and is moved there); say so.
    let pin_unavailable = record.pinned_manager.as_deref().is_some_and(|p| {
        service
            .route_for(&record.workspace, &record.environment, Some(p))
            .pin_unavailable
    });
    let mut response = credential_response(record, secrets, fields.as_deref(), pin_unavailable);
    response
        .headers_mut()
        .insert("cache-status", HeaderValue::from_static(status.as_str()));
    Ok(response)
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

/// The one place secret values are serialised for a caller.
fn credential_response(
    record: &CredentialRecord,
    secrets: &SecretFields,
    only: Option<&[String]>,
    pin_unavailable: bool,
) -> Response<Body> {
    struct Exposed<'a>(&'a SecretFields, Option<&'a [String]>);
    impl Serialize for Exposed<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            // Exposed on purpose: this is the response to an authorised read.
            self.0.serialize_exposed(s, self.1)
        }
    }
    #[derive(Serialize)]
    struct View<'a> {
        id: &'a str,
        workspace: &'a str,
        environment: &'a str,
        integration_type: &'a str,
        secrets_manager_id: &'a str,
        pinned_secrets_manager_id: Option<&'a str>,
        pin_unavailable: bool,
        metadata: &'a serde_json::Map<String, serde_json::Value>,
        secrets: Exposed<'a>,
        #[serde(serialize_with = "crate::time::serialize_opt_unix_rfc3339")]
        expires_at: Option<i64>,
        needs_reauth: bool,
        reference: Reference<'a>,
    }
    let view = View {
        id: &record.id,
        workspace: &record.workspace,
        environment: &record.environment,
        integration_type: &record.integration_type,
        secrets_manager_id: &record.location.manager_id,
        pinned_secrets_manager_id: record.pinned_manager.as_deref(),
        pin_unavailable,
        metadata: &record.metadata,
        secrets: Exposed(secrets, only),
        expires_at: record.expires_at,
        needs_reauth: record.needs_reauth,
        reference: reference(record),
    };
    secret_json(StatusCode::OK, &view)
}
