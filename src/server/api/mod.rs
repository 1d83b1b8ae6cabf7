//! The HTTP API: the route table, the per-request entry point with its audit line, and a
//! dispatch that hands each route to the module of its resource. Everything here is
//! transport-agnostic: the same handler serves the Unix socket and the loopback TCP listener.

mod admin;
mod batch;
mod body;
mod credentials;
mod error;
mod events;
mod managers;
mod openapi;
mod proxy;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use super::App;
use crate::access::{Action, Caller};
use crate::service::ServiceError;

pub(crate) use body::parse_json;
pub use body::Body;
use error::guarded;
pub use error::ApiError;

/// Route names for metrics: a closed set. `Unknown` stays last (it sizes per-route tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteId {
    CredentialCreate,
    CredentialGet,
    CredentialPatch,
    CredentialDelete,
    CredentialRefresh,
    CredentialBatchGet,
    Managers,
    ManagerCreate,
    ManagerGet,
    ManagerPatch,
    ManagerDelete,
    Instructions,
    ManagerSecrets,
    Routing,
    RoutingPut,
    Migrations,
    Reload,
    Events,
    Health,
    Ready,
    OpenApi,
    Proxy,
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
            RouteId::CredentialBatchGet => "credential_batch_get",
            RouteId::Managers => "managers",
            RouteId::ManagerCreate => "manager_create",
            RouteId::ManagerGet => "manager_get",
            RouteId::ManagerPatch => "manager_patch",
            RouteId::ManagerDelete => "manager_delete",
            RouteId::Instructions => "instructions",
            RouteId::ManagerSecrets => "manager_secrets",
            RouteId::Routing => "routing",
            RouteId::RoutingPut => "routing_put",
            RouteId::Migrations => "migrations",
            RouteId::Reload => "reload",
            RouteId::Events => "events",
            RouteId::Health => "healthz",
            RouteId::Ready => "readyz",
            RouteId::OpenApi => "openapi",
            RouteId::Proxy => "proxy",
            RouteId::Unknown => "unknown",
        }
    }
}

/// A request's route and where its id sits in the path, worked out once per request without
/// allocating: the connection layer labels metrics with it and the handler dispatches on it.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub route: RouteId,
    /// Byte range of the id segment in the path, for routes that name one.
    id: Option<(usize, usize)>,
}

impl Target {
    /// The id segment of `path`, the path this target was classified from.
    pub fn id<'p>(&self, path: &'p str) -> Option<&'p str> {
        self.id.and_then(|(start, end)| path.get(start..end))
    }

    /// What follows the id segment of `path` (a proxied call's upstream path).
    pub fn after_id<'p>(&self, path: &'p str) -> &'p str {
        self.id
            .and_then(|(_, end)| path.get(end..))
            .unwrap_or_default()
    }
}

/// At most this many segments make a route; a longer path is no route.
const MAX_SEGMENTS: usize = 4;

/// Where calls through the egress proxy start: any path below.
const PROXY_PREFIX: &str = "/v1/proxy/";

/// The methods a call through the proxy may use (`TRACE` and `CONNECT` are not forwarded).
const PROXY_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Splits a path into the route and its id.
pub fn classify(method: &Method, path: &str) -> Target {
    if let Some(after) = path
        .strip_prefix(PROXY_PREFIX)
        .filter(|after| !after.is_empty() && !after.starts_with('/'))
    {
        if !PROXY_METHODS.contains(method) {
            return Target {
                route: RouteId::Unknown,
                id: None,
            };
        }
        let start = PROXY_PREFIX.len();
        let end = start + after.find('/').unwrap_or(after.len());
        return Target {
            route: RouteId::Proxy,
            id: Some((start, end)),
        };
    }
    let trimmed = path.trim_end_matches('/');
    let mut segments = [""; MAX_SEGMENTS];
    let mut third = None;
    let mut count = 0;
    // `/a/b` splits into "", "a", "b": the leading empty segment is skipped.
    let mut offset = 0;
    for (i, segment) in trimmed.split('/').enumerate() {
        let start = offset;
        offset += segment.len() + 1;
        if i == 0 {
            continue;
        }
        if count == MAX_SEGMENTS {
            return Target {
                route: RouteId::Unknown,
                id: None,
            };
        }
        if count == 2 {
            third = Some((start, start + segment.len()));
        }
        segments[count] = segment;
        count += 1;
    }
    let route = match (method, &segments[..count]) {
        (&Method::GET, ["healthz"]) => RouteId::Health,
        (&Method::GET, ["readyz"]) => RouteId::Ready,
        (&Method::POST, ["v1", "credentials"]) => RouteId::CredentialCreate,
        (&Method::GET, ["v1", "credentials", _]) => RouteId::CredentialGet,
        (&Method::PATCH, ["v1", "credentials", _]) => RouteId::CredentialPatch,
        (&Method::DELETE, ["v1", "credentials", _]) => RouteId::CredentialDelete,
        (&Method::POST, ["v1", "credentials", _, "refresh"]) => RouteId::CredentialRefresh,
        (&Method::POST, ["v1", "credentials:batchGet"]) => RouteId::CredentialBatchGet,
        (&Method::GET, ["v1", "secretsmanagers"]) => RouteId::Managers,
        (&Method::GET, ["v1", "secretsmanagers", "instructions"]) => RouteId::Instructions,
        (&Method::GET, ["v1", "secretsmanagers", "secrets"]) => RouteId::ManagerSecrets,
        (&Method::POST, ["v1", "secretsmanagers"]) => RouteId::ManagerCreate,
        (&Method::GET, ["v1", "secretsmanagers", _]) => RouteId::ManagerGet,
        (&Method::PATCH, ["v1", "secretsmanagers", _]) => RouteId::ManagerPatch,
        (&Method::DELETE, ["v1", "secretsmanagers", _]) => RouteId::ManagerDelete,
        (&Method::GET, ["v1", "routing"]) => RouteId::Routing,
        (&Method::PUT, ["v1", "routing"]) => RouteId::RoutingPut,
        (&Method::GET, ["v1", "migrations"]) => RouteId::Migrations,
        (&Method::POST, ["v1", "reload"]) => RouteId::Reload,
        (&Method::GET, ["v1", "events"]) => RouteId::Events,
        (&Method::GET, ["v1", "openapi.json"]) => RouteId::OpenApi,
        _ => RouteId::Unknown,
    };
    let id = match route {
        RouteId::CredentialGet
        | RouteId::CredentialPatch
        | RouteId::CredentialDelete
        | RouteId::CredentialRefresh
        | RouteId::ManagerGet
        | RouteId::ManagerPatch
        | RouteId::ManagerDelete => third,
        _ => None,
    };
    Target { route, id }
}

/// Whether some method serves `path` (so another method gets 405, not 404).
const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

fn known_path(path: &str) -> bool {
    METHODS
        .iter()
        .any(|m| classify(m, path).route != RouteId::Unknown)
}

/// The methods `path` answers, for a 405's `Allow` header (`GET, PATCH, DELETE`).
fn allowed_methods(path: &str) -> String {
    let methods: &[Method] = if path.starts_with(PROXY_PREFIX) {
        &PROXY_METHODS
    } else {
        &METHODS
    };
    let allowed: Vec<&str> = methods
        .iter()
        .filter(|m| classify(m, path).route != RouteId::Unknown)
        .map(Method::as_str)
        .collect();
    allowed.join(", ")
}

const MAX_QUERY_PARAMETERS: usize = 32;

/// A request's query string, decoded once. A parameter given twice is refused: which one
/// counts would otherwise be a guess (`fields=a&fields=b`).
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            // No route takes more than a handful; a URI of thousands costs nothing to refuse.
            if pairs.len() == MAX_QUERY_PARAMETERS {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "too many query parameters",
                )
                .with_detail(format!("at most {MAX_QUERY_PARAMETERS}")));
            }
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            let (k, v) = (decode(k), decode(v));
            if !seen.insert(k.clone()) {
                let shown =
                    if k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        format!("`{k}`")
                    } else {
                        "a parameter".to_owned()
                    };
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    "a query parameter is given more than once",
                )
                .with_detail(format!("{shown} appears more than once")));
            }
            pairs.push((k, v));
        }
        Ok(Self(pairs))
    }

    /// The first value of `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.pairs().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    pub(crate) fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `?fields=a,b`: the secret fields a read asks for; `None` for all of them.
    pub(crate) fn fields(&self) -> Option<Vec<String>> {
        self.get("fields").map(|v| {
            v.split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect()
        })
    }

    /// Whether the first value of `name` is `yes` or `1`.
    pub(crate) fn flag(&self, name: &str, yes: &str) -> bool {
        self.get(name).is_some_and(|v| v == yes || v == "1")
    }

    /// `?limit=&offset=` of a listing: `limit` 1-500 (50 when absent), `offset` up to a million.
    pub(crate) fn page(&self) -> Result<(usize, usize), ApiError> {
        let limit = self.number("limit", 50, 500)?.max(1);
        let offset = self.number("offset", 0, 1_000_000)?;
        Ok((limit, offset))
    }

    /// A whole number `name` up to `max`, `default` when absent.
    fn number(&self, name: &str, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.get(name) {
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
    }
}

/// The audit line's outcome and which fields were handed out.
struct Audit<'a> {
    credential: Option<std::borrow::Cow<'a, str>>,
    fields: Option<Vec<String>>,
    /// A batch read's items: one audit line each (id, status, fields handed out).
    batch: Vec<(String, u16, Option<Vec<String>>)>,
    /// A call through the egress proxy: its method and the upstream's host.
    upstream: Option<(Method, String)>,
}

/// Handles one request; never fails (errors become JSON error responses). A handler still
/// running at `deadline` is dropped and the request answered `503 request_timeout`, with its
/// audit line like any other. Audit lines that find the buffer full in blocking mode are left
/// in `unwritten`: the caller appends them with no deadline running, so a timeout cannot drop
/// them.
pub async fn handle(
    app: &Arc<App>,
    caller: Caller,
    target: Target,
    request: Request<Incoming>,
    deadline: Option<tokio::time::Instant>,
    unwritten: &mut Vec<String>,
) -> Response<Body> {
    let route = target.route;
    // The path outlives the request, which the handler consumes (a shared buffer: no copy).
    let uri = request.uri().clone();
    let id = target.id(uri.path());
    let mut audit = Audit {
        credential: id.map(std::borrow::Cow::Borrowed),
        fields: None,
        batch: Vec::new(),
        upstream: None,
    };
    let rest = target.after_id(uri.path());
    let answered = {
        // Pinned here, not moved into the deadline's wrapper: the handler's state is large.
        let handler = std::pin::pin!(guarded(
            route,
            dispatch(app, caller, route, (id, rest), request, &mut audit),
        ));
        match deadline {
            None => Some(handler.await),
            Some(deadline) => super::within(deadline, handler).await,
        }
    };
    let mut response = answered.unwrap_or_else(|| {
        // Cut short: nothing the handler had found was handed out, so the audit line names
        // the request and its 503 only (a batch read gets one line, not one per item).
        audit.fields = None;
        audit.batch.clear();
        super::timed_out().into_response()
    });
    let upstreams = response
        .extensions()
        .get::<crate::proxy::UpstreamAnswer>()
        .is_some();
    if response.status() == StatusCode::METHOD_NOT_ALLOWED && !upstreams {
        // RFC 9110 §15.5.6: a 405 says which methods the resource has.
        if let Ok(allow) = hyper::header::HeaderValue::from_str(&allowed_methods(uri.path())) {
            response.headers_mut().insert(hyper::header::ALLOW, allow);
        }
    }
    let audited = matches!(
        route,
        RouteId::CredentialCreate
            | RouteId::CredentialGet
            | RouteId::CredentialPatch
            | RouteId::CredentialDelete
            | RouteId::CredentialRefresh
            | RouteId::CredentialBatchGet
            | RouteId::Proxy
    );
    if let Some(log) = app.audit_log.as_ref().filter(|_| audited) {
        let who = match caller {
            Caller::Unix { uid, gid, pid } => crate::audit::Who::Unix { uid, gid, pid },
            Caller::Tcp => crate::audit::Who::Tcp,
        };
        let line = |credential: &str, fields: &Option<Vec<String>>, status: u16| {
            log.line(crate::audit::Access {
                route: route.as_str(),
                who,
                credential,
                fields: fields
                    .as_ref()
                    .map(|names| names.iter().map(String::as_str)),
                upstream: audit
                    .upstream
                    .as_ref()
                    .map(|(method, host)| (method.as_str(), host.as_str())),
                status,
            })
        };
        // A batch read answers 200 with a status per credential: one line for each. Refused
        // whole (403, 400), it gets one line like any other request.
        if audit.batch.is_empty() {
            let one = line(
                audit.credential.as_deref().unwrap_or("-"),
                &audit.fields,
                response.status().as_u16(),
            );
            if let Err(one) = log.offer(one) {
                unwritten.push(one);
            }
        }
        for (id, status, fields) in &audit.batch {
            if let Err(one) = log.offer(line(id, fields, *status)) {
                unwritten.push(one);
            }
        }
    }
    response
}

async fn dispatch(
    app: &Arc<App>,
    caller: Caller,
    route: RouteId,
    (id, rest): (Option<&str>, &str),
    request: Request<Incoming>,
    audit: &mut Audit<'_>,
) -> Result<Response<Body>, ApiError> {
    // Probes (also served without a token on the metrics port) take no parameters; a proxied
    // call's query is the upstream's.
    let query = match route {
        RouteId::Health | RouteId::Ready | RouteId::OpenApi | RouteId::Proxy => Query::parse(None)?,
        _ => Query::parse(request.uri().query())?,
    };
    let id = id.unwrap_or_default();
    // The cached read is the hot path: its future is kept inline. Every other route's is boxed,
    // so the request future (moved a few times per request) stays small.
    match route {
        RouteId::Health => Ok(admin::health()),
        RouteId::Ready => Ok(Box::pin(admin::ready(app)).await),
        RouteId::OpenApi => Ok(openapi::document()),
        RouteId::CredentialGet => {
            let bypass = credentials::bypasses_cache(request.headers());
            credentials::get(app, &caller, id, &query, bypass, audit).await
        }
        RouteId::CredentialCreate => {
            Box::pin(credentials::create(app, &caller, request, audit)).await
        }
        RouteId::CredentialPatch => Box::pin(credentials::patch(app, &caller, id, request)).await,
        RouteId::CredentialDelete => Box::pin(credentials::delete(app, &caller, id)).await,
        RouteId::CredentialRefresh => Box::pin(credentials::refresh(app, &caller, id)).await,
        RouteId::CredentialBatchGet => Box::pin(batch::get(app, &caller, request, audit)).await,
        RouteId::Managers => Box::pin(managers::list(app, &caller, &query)).await,
        RouteId::ManagerCreate => Box::pin(managers::create(app, &caller, request)).await,
        RouteId::ManagerGet => Box::pin(managers::get(app, &caller, id)).await,
        RouteId::ManagerPatch => Box::pin(managers::patch(app, &caller, id, request)).await,
        RouteId::ManagerDelete => Box::pin(managers::delete(app, &caller, id, &query)).await,
        RouteId::Instructions => managers::instructions(app, &caller),
        RouteId::ManagerSecrets => Box::pin(managers::secrets(app, &caller, &query)).await,
        RouteId::Routing => Box::pin(admin::routing(app, &caller, &query)).await,
        RouteId::RoutingPut => Box::pin(admin::put_routing(app, &caller, request)).await,
        RouteId::Migrations => admin::migrations(app, &caller, &query),
        RouteId::Reload => Box::pin(admin::reload(app, &caller)).await,
        RouteId::Events => Box::pin(events::list(app, &caller, &query)).await,
        RouteId::Proxy => Box::pin(proxy::forward(app, caller, id, rest, request, audit)).await,
        RouteId::Unknown => Err(unknown_or_method(request.uri().path())),
    }
}

fn require(app: &App, caller: &Caller, action: Action) -> Result<(), ApiError> {
    if app
        .service
        .allows(caller, action, crate::access::Scope::ANY)
    {
        Ok(())
    } else {
        Err(ServiceError::Forbidden.into())
    }
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

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_the_error_shape() {
        async fn panics() -> Result<Response<Body>, ApiError> {
            let stored: Option<i64> = None;
            // What a broken invariant looks like: an unwrap on a value that is not there.
            stored.map(|_| ()).expect("a stored value");
            Err(ApiError::internal())
        }
        let response = guarded(RouteId::CredentialGet, panics()).await;
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            br#"{"error":{"code":"internal","message":"internal error"}}"#
        );
    }

    /// The request future is moved several times per request (into hyper's task, into the
    /// deadline wrapper): every byte of it is copied each time. Boxing the cold routes keeps
    /// it to what a cached read needs.
    #[test]
    fn the_request_future_stays_small() {
        fn size_of_returned<A, F: std::future::Future>(_: impl FnOnce(A) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let target = classify(&Method::GET, "/v1/credentials/x");
        let bytes = size_of_returned(|(app, request): (Arc<App>, Request<Incoming>)| async move {
            handle(&app, Caller::Tcp, target, request, None, &mut Vec::new()).await
        });
        println!("the request future takes {bytes} bytes");
        assert!(bytes < 4096, "the request future takes {bytes} bytes");
    }

    #[test]
    fn routes_and_ids_are_classified() {
        let path = "/v1/credentials/abc/";
        let t = classify(&Method::GET, path);
        assert_eq!((t.route, t.id(path)), (RouteId::CredentialGet, Some("abc")));
        let path = "/v1/credentials/abc/refresh";
        let t = classify(&Method::POST, path);
        assert_eq!(
            (t.route, t.id(path)),
            (RouteId::CredentialRefresh, Some("abc"))
        );
        for unknown in [
            "",
            "/",
            "v1/credentials",
            "//v1/credentials",
            "/v1/credentials/a/b/c",
        ] {
            assert_eq!(
                classify(&Method::POST, unknown).route,
                RouteId::Unknown,
                "{unknown}"
            );
        }
        assert_eq!(classify(&Method::GET, "/v1/routing").id(""), None);
        assert_eq!(
            classify(&Method::PUT, "/v1/credentials/abc").route,
            RouteId::Unknown
        );
        assert_eq!(
            unknown_or_method("/v1/credentials/abc").code,
            "method_not_allowed"
        );
        assert_eq!(unknown_or_method("/v2").code, "route_not_found");
        assert_eq!(allowed_methods("/v1/credentials/abc"), "GET, PATCH, DELETE");
        assert_eq!(allowed_methods("/v1/routing"), "GET, PUT");
        let path = "/v1/proxy/c-1/v3/objects/contacts";
        let t = classify(&Method::OPTIONS, path);
        assert_eq!((t.route, t.id(path)), (RouteId::Proxy, Some("c-1")));
        assert_eq!(t.after_id(path), "/v3/objects/contacts");
        let t = classify(&Method::DELETE, "/v1/proxy/c-1");
        assert_eq!((t.route, t.after_id("/v1/proxy/c-1")), (RouteId::Proxy, ""));
        assert_eq!(classify(&Method::TRACE, path).route, RouteId::Unknown);
        // No credential id, no call (found by the fuzzer: `/v1/proxy/` was one, `/v1/proxy`
        // not).
        for no_id in ["/v1/proxy", "/v1/proxy/", "/v1/proxy//x"] {
            assert_eq!(
                classify(&Method::GET, no_id).route,
                RouteId::Unknown,
                "{no_id}"
            );
        }
        assert_eq!(unknown_or_method(path).code, "method_not_allowed");
        assert_eq!(
            allowed_methods(path),
            "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        );
    }
}
