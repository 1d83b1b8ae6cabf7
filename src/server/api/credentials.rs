//! `/v1/credentials`: create, read, patch, delete and force-refresh one credential. A read
//! answers with the body the cache rendered (`cache::view`, the one place secret values are
//! serialised for a caller).

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
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
    bypass: bool,
    audit: &mut Audit<'_>,
) -> Result<Response<Body>, ApiError> {
    let service = &app.service;
    let fields = query.fields();
    let (entry, status) = if bypass {
        // Boxed: the cached read is the hot path, and its future stays as small as it was.
        Box::pin(service.get_current(caller, id)).await?
    } else {
        service.get(caller, id).await?
    };
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

/// Whether a read's `Cache-Control` asks for the store's current value: `no-cache`, or
/// `max-age=0`, which HTTP caches treat alike. Directive names are case-insensitive; other
/// directives, and header values that are not text, are ignored.
pub(super) fn bypasses_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(hyper::header::CACHE_CONTROL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|directive| {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim())),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-cache") {
                return argument.is_none();
            }
            name.eq_ignore_ascii_case("max-age")
                && argument
                    .map(|a| a.trim_matches('"'))
                    .is_some_and(|a| !a.is_empty() && a.bytes().all(|b| b == b'0'))
        })
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
    let mut r = Response::new(Body::full(Bytes::new()));
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
            "expires_at": record.expires_at_ms.map(crate::time::rfc3339_ms),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bypasses(values: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_str(v).unwrap(),
            );
        }
        bypasses_cache(&headers)
    }

    #[test]
    fn cache_control_no_cache_or_max_age_zero_bypasses_the_cache() {
        for yes in [
            &["no-cache"][..],
            &["No-Cache"],
            &[" no-store , NO-CACHE "],
            &["max-age=0"],
            &["MAX-AGE = 0"],
            &["max-age=\"0\""],
            &["max-age=00"],
            &["private", "no-cache"],
        ] {
            assert!(bypasses(yes), "{yes:?}");
        }
        for no in [
            &[][..],
            &[""],
            &["no-store"],
            &["max-age=10"],
            &["max-age"],
            &["max-age="],
            &["max-stale=0"],
            &["no-cache-please"],
            &["no-cache=\"set-cookie\""],
            &["min-fresh=0, only-if-cached"],
        ] {
            assert!(!bypasses(no), "{no:?}");
        }
    }
}
