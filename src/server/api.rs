//! The HTTP API: request routing, JSON in and out, the fixed error messages, and the audit line.
//! Everything here is transport-agnostic: the same handler serves the Unix socket and the
//! loopback TCP listener.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use zeroize::Zeroizing;

use super::App;
use crate::access::{Action, Caller};
use crate::manager::ListRequest;
use crate::metadata::CredentialRecord;
use crate::secret::SecretFields;
use crate::service::{CreateRequest, PatchRequest, ServiceError};

pub type Body = Full<Bytes>;

/// Route names for metrics: a closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    CredentialCreate,
    CredentialGet,
    CredentialPatch,
    CredentialDelete,
    CredentialRefresh,
    Managers,
    Instructions,
    ManagerSecrets,
    Routing,
    Migrations,
    Reload,
    Health,
    Ready,
    Unknown,
}

impl RouteId {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteId::CredentialCreate => "credential_create",
            RouteId::CredentialGet => "credential_get",
            RouteId::CredentialPatch => "credential_patch",
            RouteId::CredentialDelete => "credential_delete",
            RouteId::CredentialRefresh => "credential_refresh",
            RouteId::Managers => "managers",
            RouteId::Instructions => "instructions",
            RouteId::ManagerSecrets => "manager_secrets",
            RouteId::Routing => "routing",
            RouteId::Migrations => "migrations",
            RouteId::Reload => "reload",
            RouteId::Health => "healthz",
            RouteId::Ready => "readyz",
            RouteId::Unknown => "unknown",
        }
    }
}

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

    fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn not_found_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            "no such API route",
        )
    }

    pub fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        let body = serde_json::to_vec(&Outer {
            error: Inner {
                code: self.code,
                message: self.message,
                detail: self.detail.as_deref(),
            },
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
            Conflict => ApiError::new(StatusCode::CONFLICT, "conflict", "the credential was changed concurrently; read it again and retry"),
            ReadOnly { .. } => ApiError::new(StatusCode::CONFLICT, "read_only_store", "the credential's secrets manager is read-only; credproxy never writes, refreshes or moves credentials there"),
            UnknownManager(id) => ApiError::new(StatusCode::BAD_REQUEST, "unknown_secrets_manager", "no secrets manager with that id is configured").with_detail(format!("secrets_manager_id `{id}`")),
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
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn ok_json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    json_response(
        status,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

/// A request's route and credential id, worked out once per request: the connection layer
/// labels metrics with it and the handler dispatches on it.
#[derive(Debug, Clone)]
pub struct Target {
    pub route: RouteId,
    pub id: Option<String>,
}

/// Splits a path into the route and its credential id.
pub fn classify(method: &Method, path: &str) -> Target {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let route = match (method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => RouteId::Health,
        (&Method::GET, ["readyz"]) => RouteId::Ready,
        (&Method::POST, ["v1", "credentials"]) => RouteId::CredentialCreate,
        (&Method::GET, ["v1", "credentials", _]) => RouteId::CredentialGet,
        (&Method::PATCH, ["v1", "credentials", _]) => RouteId::CredentialPatch,
        (&Method::DELETE, ["v1", "credentials", _]) => RouteId::CredentialDelete,
        (&Method::POST, ["v1", "credentials", _, "refresh"]) => RouteId::CredentialRefresh,
        (&Method::GET, ["v1", "secretsmanagers"]) => RouteId::Managers,
        (&Method::GET, ["v1", "secretsmanagers", "instructions"]) => RouteId::Instructions,
        (&Method::GET, ["v1", "secretsmanagers", "secrets"]) => RouteId::ManagerSecrets,
        (&Method::GET, ["v1", "routing"]) => RouteId::Routing,
        (&Method::GET, ["v1", "migrations"]) => RouteId::Migrations,
        (&Method::POST, ["v1", "reload"]) => RouteId::Reload,
        _ => RouteId::Unknown,
    };
    let id = match route {
        RouteId::CredentialGet
        | RouteId::CredentialPatch
        | RouteId::CredentialDelete
        | RouteId::CredentialRefresh => segments.get(2).map(|s| s.to_string()),
        _ => None,
    };
    Target { route, id }
}

/// Whether some method serves `path` (so another method gets 405, not 404).
fn known_path(path: &str) -> bool {
    [Method::GET, Method::POST, Method::PATCH, Method::DELETE]
        .iter()
        .any(|m| classify(m, path).route != RouteId::Unknown)
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (decode(k), decode(v))
        })
        .collect()
}

/// The audit line's outcome and which fields were handed out.
struct Audit {
    credential: Option<String>,
    fields: Option<Vec<String>>,
}

/// Handles one request; never fails (errors become JSON error responses).
pub async fn handle(
    app: &Arc<App>,
    caller: Caller,
    target: Target,
    request: Request<Incoming>,
) -> Response<Body> {
    let Target { route, id } = target;
    let mut audit = Audit {
        credential: id.clone(),
        fields: None,
    };
    let response = match dispatch(app, caller, route, id, request, &mut audit).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if app.audit
        && matches!(
            route,
            RouteId::CredentialCreate
                | RouteId::CredentialGet
                | RouteId::CredentialPatch
                | RouteId::CredentialDelete
                | RouteId::CredentialRefresh
        )
    {
        let (uid, gid, pid) = match caller {
            Caller::Unix { uid, gid, pid } => (Some(uid), Some(gid), pid),
            Caller::Tcp => (None, None, None),
        };
        tracing::info!(
            target: "credproxy::audit",
            route = route.as_str(),
            transport = if uid.is_some() { "unix" } else { "tcp" },
            uid, gid, pid,
            credential = audit.credential.as_deref().unwrap_or("-"),
            fields = ?audit.fields,
            status = response.status().as_u16(),
            "access"
        );
    }
    response
}

async fn dispatch(
    app: &Arc<App>,
    caller: Caller,
    route: RouteId,
    id: Option<String>,
    request: Request<Incoming>,
    audit: &mut Audit,
) -> Result<Response<Body>, ApiError> {
    let service = &app.service;
    let query = query_pairs(request.uri().query());
    match route {
        RouteId::Health => Ok(ok_json(
            StatusCode::OK,
            &serde_json::json!({"status": "ok"}),
        )),
        RouteId::Ready => {
            let ready = app.is_ready() && service.metadata().ping().await.is_ok();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Ok(ok_json(
                status,
                &serde_json::json!({"status": if ready { "ready" } else { "not_ready" }}),
            ))
        }
        RouteId::CredentialGet => {
            let id = id.unwrap_or_default();
            let fields: Option<Vec<String>> =
                query.iter().find(|(k, _)| k == "fields").map(|(_, v)| {
                    v.split(',')
                        .filter(|f| !f.is_empty())
                        .map(str::to_owned)
                        .collect()
                });
            let (entry, status) = service.get(&caller, &id).await?;
            let secrets = &entry.loaded.secrets;
            if app.audit {
                audit.fields = Some(secrets.selected_names(fields.as_deref()));
            }
            let record = &entry.loaded.record;
            // A pin to a manager removed from the configuration: the credential falls back
            // along the chain (and is moved there); say so.
            let pin_unavailable = record.pinned_manager.as_deref().is_some_and(|p| {
                service
                    .route_for(&record.environment, Some(p))
                    .pin_unavailable
            });
            let mut response =
                credential_response(record, secrets, fields.as_deref(), pin_unavailable);
            response
                .headers_mut()
                .insert("cache-status", HeaderValue::from_static(status.as_str()));
            Ok(response)
        }
        RouteId::CredentialCreate => {
            let body: CreateRequest = read_json(app, request).await?;
            let outcome = service.create(&caller, body).await?;
            audit.credential = Some(outcome.record.id.clone());
            Ok(write_response(StatusCode::CREATED, &outcome.record))
        }
        RouteId::CredentialPatch => {
            let body: PatchRequest = read_json(app, request).await?;
            let outcome = service
                .patch(&caller, &id.unwrap_or_default(), body)
                .await?;
            Ok(write_response(StatusCode::OK, &outcome.record))
        }
        RouteId::CredentialDelete => {
            service.delete(&caller, &id.unwrap_or_default()).await?;
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            Ok(r)
        }
        RouteId::CredentialRefresh => {
            let outcome = service
                .force_refresh(&caller, &id.unwrap_or_default())
                .await?;
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
        RouteId::Managers => {
            require(app, &caller, Action::Read)?;
            let runtime = service.runtime();
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
        RouteId::Instructions => {
            require(app, &caller, Action::Read)?;
            Ok(ok_json(
                StatusCode::OK,
                &crate::manager::descriptor::instructions(),
            ))
        }
        RouteId::ManagerSecrets => {
            let get = |name: &str| {
                query
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let manager = get("secretsmanager_id").ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the request is invalid",
                )
                .with_detail("`secretsmanager_id` is required")
            })?;
            let number = |name: &str, default: usize, max: usize| -> Result<usize, ApiError> {
                match get(name) {
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
            let page = service
                .list_manager_secrets(
                    &caller,
                    &manager,
                    ListRequest {
                        query: get("query").filter(|q| !q.is_empty()),
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
        RouteId::Routing => {
            require(app, &caller, Action::Read)?;
            let runtime = service.runtime();
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
        RouteId::Migrations => {
            require(app, &caller, Action::Admin)?;
            let with_ids = query
                .iter()
                .any(|(k, v)| k == "ids" && (v == "true" || v == "1"));
            Ok(ok_json(StatusCode::OK, &app.migrator.status(with_ids)))
        }
        RouteId::Reload => {
            require(app, &caller, Action::Admin)?;
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
        RouteId::Unknown => Err(unknown_or_method(request.uri().path())),
    }
}

fn require(app: &App, caller: &Caller, action: Action) -> Result<(), ApiError> {
    if app.service.allows(caller, action, None) {
        Ok(())
    } else {
        Err(ServiceError::Forbidden.into())
    }
}

/// Reads a JSON body within the size limit into a buffer that is wiped afterwards (it may
/// hold secrets), and parses it. Parse errors name the problem without quoting values.
async fn read_json<T: serde::de::DeserializeOwned>(
    app: &App,
    request: Request<Incoming>,
) -> Result<T, ApiError> {
    if let Some(ct) = request.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        if !ct.starts_with("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "request bodies must be application/json",
            ));
        }
    }
    let mut body = Limited::new(request.into_body(), app.max_body_bytes);
    let mut buffer = Zeroizing::new(Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than the configured limit",
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the request body could not be read",
                )
            }
        })?;
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
        }
    }
    serde_json::from_slice(&buffer).map_err(|e| {
        let detail = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("malformed JSON at line {} column {}", e.line(), e.column())
            }
            // Data errors come from our own types: unknown or missing fields, wrong types of
            // non-secret fields, and the secrets visitor's fixed message. None quote a secret.
            _ => e.to_string(),
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body is not valid JSON for this call",
        )
        .with_detail(detail)
    })
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
    let mut out = Zeroizing::new(Vec::with_capacity(512));
    let _ = serde_json::to_writer(&mut *out, &view);
    // The buffer holds secret values: hand hyper an owner that wipes it when dropped.
    json_response(StatusCode::OK, Bytes::from_owner(out))
}

/// Answers requests for paths outside the API with the right status.
pub fn unknown_or_method(path: &str) -> ApiError {
    if known_path(path) {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not accept that method",
        )
    } else {
        ApiError::not_found_route()
    }
}
