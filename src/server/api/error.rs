//! The API's errors: a fixed code and message per kind of failure, the `{"error": {...}}`
//! response they become, how service errors map onto them, and the guard that makes a
//! handler's panic one of them. The codes are a public contract: clients match on them.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::body::{json_response, Body};
use crate::service::ServiceError;

/// An API error: a code, its fixed message, and optionally a detail that is safe by
/// construction (request-shape problems that never quote a secret).
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: &'static str,
    pub detail: Option<String>,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: &'static str) -> Self {
        Self {
            status,
            code,
            message,
            detail: None,
            retry_after: None,
        }
    }

    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// A failure on our side that the caller can do nothing about; the log has the cause.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    pub fn not_found_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "no such API route",
        )
    }

    /// The `{"code", "message", "detail"}` object an error response carries under `error`, and
    /// a batch read's item for a credential that failed.
    pub(super) fn object(&self) -> impl Serialize + '_ {
        #[derive(Serialize)]
        struct Object<'a> {
            code: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<&'a str>,
        }
        Object {
            code: self.code,
            message: self.message,
            detail: self.detail.as_deref(),
        }
    }

    pub fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct Outer<T> {
            error: T,
        }
        // Strings only: serialising them cannot fail.
        let body = serde_json::to_vec(&Outer {
            error: self.object(),
        })
        .unwrap_or_default();
        let mut response = json_response(self.status, Bytes::from(body));
        if let Some(after) = self.retry_after {
            let secs = after.as_secs().max(1);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        use ServiceError::*;
        match e {
            NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", "credential not found"),
            Forbidden => ApiError::new(StatusCode::FORBIDDEN, "forbidden", "the caller is not allowed to do this"),
            Invalid(detail) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "the request is invalid").with_detail(detail),
            TooLarge(detail) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "credential_too_large", "the credential would exceed the configured size limits ([credentials] in the configuration)").with_detail(detail),
            Conflict => ApiError::new(StatusCode::CONFLICT, "conflict", "the credential was changed concurrently; read it again and retry"),
            ReadOnly { .. } => ApiError::new(StatusCode::CONFLICT, "read_only_store", "the credential's secrets manager is read-only; credproxy never writes, refreshes or moves credentials there"),
            // The id is the caller's own input: not repeated back.
            UnknownManager(_) => ApiError::new(StatusCode::BAD_REQUEST, "unknown_secrets_manager", "no secrets manager with that id is configured (or visible to this caller)"),
            ManagerNotLoaded(_) => ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "secrets_manager_not_loaded", "the credential's secrets manager is not loaded on this instance (it cannot be built, or was created moments ago); retry later")
            },
            Unavailable { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the secrets manager is unavailable and no cached value can be served; retry later")
            },
            ManagerFailed { .. } => ApiError::new(StatusCode::BAD_GATEWAY, "store_error", "the secrets manager refused the request; see the daemon's log"),
            SecretMissing { .. } => ApiError::new(StatusCode::BAD_GATEWAY, "secret_missing", "the credential's secret is missing from its secrets manager"),
            Metadata(_) => ApiError {
                retry_after: Some(Duration::from_secs(1)),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "metadata_unavailable", "the metadata store is unavailable; retry later")
            },
            NeedsReauth => ApiError::new(StatusCode::CONFLICT, "needs_reauth", "the token endpoint rejected the refresh token and the access token has expired; the user must authorise again and the new tokens be stored with PATCH"),
            NotRefreshable(detail) => ApiError::new(StatusCode::CONFLICT, "not_refreshable", "the credential cannot be refreshed").with_detail(detail),
            TokenUnavailable { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "token_unavailable", "the access token has expired and could not be refreshed yet; retry later")
            },
            Unusable { reason, .. } => ApiError::new(StatusCode::CONFLICT, "credential_unusable", "the secrets manager holds this credential in a state that cannot be handed out").with_detail(reason),
            NameUnavailable { .. } => ApiError::new(StatusCode::CONFLICT, "store_name_unavailable", "the secrets manager keeps a deleted secret under this credential's name, and credproxy may neither recover nor purge it; grant the recover (or purge) permission, or recover or purge it there, and retry"),
        }
    }
}

impl From<crate::control::ControlError> for ApiError {
    fn from(e: crate::control::ControlError) -> Self {
        use crate::control::ControlError::*;
        match e {
            Invalid { key, reason } => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", "the request is invalid").with_detail(format!("`{key}`: {reason}")),
            Forbidden => ApiError::new(StatusCode::FORBIDDEN, "forbidden", "the caller is not allowed to do this"),
            NotFound => ApiError::new(StatusCode::NOT_FOUND, "secrets_manager_not_found", "no secrets manager with that id"),
            FileManaged(what) => ApiError::new(StatusCode::CONFLICT, "defined_in_file", "this is defined in the configuration file; change it there").with_detail(what),
            Conflict(detail) => ApiError::new(StatusCode::CONFLICT, "conflict", "the change conflicts with the current state").with_detail(detail),
            HasCredentials { count } => ApiError::new(StatusCode::CONFLICT, "manager_has_credentials", "the manager holds credentials that cannot move; delete them, or repeat with ?credentials=delete").with_detail(format!("{count} credential(s)")),
            Probe(reason) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "probe_failed", "the secrets manager could not be reached or refused the access details; nothing was saved").with_detail(reason),
            Config(e) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_config", "the configuration was not applied").with_detail(e.to_string()),
            Sealed(detail) => {
                tracing::error!(error = %detail, "cannot open sealed access details");
                ApiError::internal()
            }
            Metadata(e) => ServiceError::Metadata(e.to_string()).into(),
        }
    }
}

/// Runs a handler so that a panic in it answers `500` with the error shape (and the request
/// still gets its audit line and metrics) instead of a dropped connection.
pub(super) fn guarded(
    route: super::RouteId,
    handler: impl std::future::Future<Output = Result<Response<Body>, ApiError>>,
) -> impl std::future::Future<Output = Response<Body>> {
    use futures::FutureExt;
    // A combinator rather than an `async fn`: that would hold the handler twice (argument and
    // the future polling it) in a state that is copied with every move.
    std::panic::AssertUnwindSafe(handler)
        .catch_unwind()
        .map(move |outcome| match outcome {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => e.into_response(),
            Err(_) => {
                // The panic hook has logged where; the payload is not repeated (it may quote
                // values).
                tracing::error!(
                    route = route.as_str(),
                    "a request handler panicked; answered 500"
                );
                ApiError::internal().into_response()
            }
        })
}
