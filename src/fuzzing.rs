//! Entry points for the fuzz targets in `fuzz/`, and for nothing else: thin wrappers that
//! reach the crate-private parsers and checks of the request path, so that a target feeds its
//! input through exactly the code a request goes through. Not part of the crate's API; the
//! regression tests at the end replay what the fuzzers found.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use serde_json::{Map, Value};

use crate::config::{Config, ConfigError, CredentialLimits, Principal};
use crate::control::{self, CheckedManager, CreateManager, PatchManager, RoutingBody};
use crate::metadata::{ClientAuth, OAuthDescription};
use crate::oauth::{Grant, OAuthError};
use crate::secret::{SecretFields, SecretString};
use crate::server::api::{parse_json, ApiError, Query};
use crate::service::{CreateFields, CreateRequest, PatchRequest};

pub use crate::manager::names::{decode as decode_name, encode as encode_name};
pub use crate::server::api::{unknown_or_method, RouteId};

// --- the router's query strings --------------------------------------------------------------

/// A query string as the API reads it.
pub struct QueryView {
    /// Every pair, decoded, in order.
    pub pairs: Vec<(String, String)>,
    /// `fields=`: the secret fields a credential read selects.
    pub fields: Option<Vec<String>>,
    /// `limit` and `offset` of a manager's secret listing.
    pub page: Result<(usize, usize), ApiError>,
    /// `workspace=` of the routing view and the manager list.
    pub workspace: Option<String>,
    /// `dry_run=` and `credentials=` of a manager delete.
    pub dry_run: bool,
    pub delete_credentials: bool,
}

/// A query string as the API reads it, or the API's refusal (a parameter given twice).
/// A path's route and its id segment, as the server classifies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub route: RouteId,
    pub id: Option<String>,
}

pub fn classify(method: &http::Method, path: &str) -> Classified {
    let target = crate::server::api::classify(method, path);
    Classified {
        route: target.route,
        id: target.id(path).map(str::to_owned),
    }
}

pub fn query(raw: Option<&str>) -> Result<QueryView, ApiError> {
    let q = Query::parse(raw)?;
    Ok(QueryView {
        pairs: q
            .pairs()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        fields: q.fields(),
        page: q.page(),
        workspace: q.get("workspace").map(str::to_owned),
        dry_run: q.flag("dry_run", "true"),
        delete_credentials: q.flag("credentials", "delete"),
    })
}

/// `Query::get`: the first value of `name`.
pub fn query_get(raw: Option<&str>, name: &str) -> Option<String> {
    Query::parse(raw).ok()?.get(name).map(str::to_owned)
}

// --- request bodies --------------------------------------------------------------------------
// Each decodes with the handler's own `parse_json`, then makes the checks its use case makes
// before it needs the runtime (the manager table, the database), in the same order.

/// `POST /v1/credentials` after every check that needs no runtime.
pub struct CredentialCreate {
    pub workspace: String,
    pub environment: String,
    pub integration_type: String,
    pub metadata: Map<String, Value>,
    pub oauth: Option<OAuthDescription>,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
    pub secrets: Option<SecretFields>,
    pub secrets_manager_id: Option<String>,
    pub external_id: Option<String>,
}

pub fn credential_create(body: &[u8]) -> Result<CredentialCreate, ApiError> {
    let request: CreateRequest = parse_json(body)?;
    let workspace = crate::service::check_scope(request.workspace, &request.environment)?;
    let CreateFields {
        integration_type,
        metadata,
        oauth,
        expires_at_ms,
    } = crate::service::check_fields(
        request.integration_type,
        request.metadata,
        request.oauth,
        &CredentialLimits::default(),
    )?;
    Ok(CredentialCreate {
        workspace,
        environment: request.environment,
        integration_type,
        metadata,
        oauth,
        expires_at_ms,
        secrets: request.secrets,
        secrets_manager_id: request.secrets_manager_id,
        external_id: request.external_id,
    })
}

/// `PATCH /v1/credentials/{id}` after every check that needs no runtime.
pub struct CredentialPatch {
    pub secrets: Option<SecretFields>,
    pub metadata: Option<Map<String, Value>>,
    pub secrets_manager_id: Option<Option<String>>,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
}

pub fn credential_patch(body: &[u8]) -> Result<CredentialPatch, ApiError> {
    let request: PatchRequest = parse_json(body)?;
    let expires_at_ms = crate::service::check_patch(&request, &CredentialLimits::default())?;
    Ok(CredentialPatch {
        secrets: request.secrets,
        metadata: request.metadata,
        secrets_manager_id: request.secrets_manager_id,
        expires_at_ms,
    })
}

/// `POST /v1/secretsmanagers` after every check that needs no runtime.
pub struct ManagerCreate {
    pub workspace: String,
    pub id: String,
    pub name: String,
    pub kind: &'static str,
    pub prefix: String,
    pub settings: Map<String, Value>,
    pub auth: SecretFields,
}

pub fn manager_create(body: &[u8]) -> Result<ManagerCreate, ApiError> {
    let body: CreateManager = parse_json(body)?;
    let workspace = control::workspace_or_default(body.workspace)?;
    let CheckedManager {
        id,
        descriptor,
        prefix,
        auth,
    } = control::check_create(
        body.id,
        &body.name,
        &body.kind,
        body.prefix,
        &body.settings,
        body.auth,
    )?;
    Ok(ManagerCreate {
        workspace,
        id,
        name: body.name,
        kind: descriptor.kind,
        prefix,
        settings: body.settings,
        auth,
    })
}

/// The types of secrets manager built into this binary.
pub fn manager_kinds() -> Vec<&'static str> {
    crate::manager::descriptor::TYPES
        .iter()
        .map(|d| d.kind)
        .collect()
}

/// `PATCH /v1/secretsmanagers/{id}` of a manager of type `kind`, after every check that needs
/// no runtime.
pub struct ManagerPatch {
    pub name: Option<String>,
    pub settings: Option<Map<String, Value>>,
    pub auth: Option<SecretFields>,
}

pub fn manager_patch(kind: &str, body: &[u8]) -> Result<ManagerPatch, ApiError> {
    let body: PatchManager = parse_json(body)?;
    let Some(descriptor) = crate::manager::descriptor::find(kind) else {
        return Err(control::ControlError::invalid("type", "not built into this binary").into());
    };
    if let Some(name) = &body.name {
        control::check_name(name)?;
    }
    if let Some(settings) = &body.settings {
        control::check_settings(descriptor, settings)?;
    }
    let auth = body
        .auth
        .map(|given| control::check_auth(descriptor, given))
        .transpose()?;
    Ok(ManagerPatch {
        name: body.name,
        settings: body.settings,
        auth,
    })
}

/// `PUT /v1/routing` after every check that needs no runtime.
pub struct RoutingPut {
    pub workspace: String,
    pub default: Option<String>,
    pub environments: BTreeMap<String, String>,
}

pub fn routing_put(body: &[u8]) -> Result<RoutingPut, ApiError> {
    let body: RoutingBody = parse_json(body)?;
    let workspace = control::workspace_or_default(body.workspace)?;
    for env in body.environments.keys() {
        control::check_environment_name(env)?;
    }
    Ok(RoutingPut {
        workspace,
        default: body.default,
        environments: body.environments,
    })
}

// --- the configuration file ------------------------------------------------------------------

/// `Config::parse`, then `setup::check` with every user and group name taken as id 0: looking
/// names up is the only I/O `setup` does.
pub fn config(text: &str) -> Result<Config, ConfigError> {
    let mut config = Config::parse(text)?;
    for rule in &mut config.access {
        match rule.principal {
            Principal::User(_) => rule.principal = Principal::Uid(0),
            Principal::Group(_) => rule.principal = Principal::Gid(0),
            _ => {}
        }
    }
    crate::setup::check(config)
}

// --- names in the secrets managers -----------------------------------------------------------

/// The name a credential's secret gets in a manager with `prefix` (`Service::secret_name`).
pub fn secret_name(prefix: &str, workspace: &str, environment: &str, id: &str) -> String {
    crate::service::secret_name(prefix, workspace, environment, id)
}

// --- secret-field selection ------------------------------------------------------------------

/// What a credential read with the query string `raw` hands out: the field names the audit
/// line lists, and the response's `secrets` object as bytes.
pub fn select_fields(secrets: &SecretFields, raw: Option<&str>) -> (Vec<String>, Vec<u8>) {
    // A query the API refuses selects nothing here (the API answers 400 before any read).
    let fields = Query::parse(raw).ok().and_then(|q| q.fields());
    let names = secrets.selected_names(fields.as_deref());
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    // Writing into a Vec cannot fail, and the map has string keys only.
    secrets
        .serialize_exposed(&mut ser, fields.as_deref())
        .expect("serialising secret fields into a Vec");
    (names, out)
}

// --- the egress proxy's upstream URL ---------------------------------------------------------

/// The upstream URL of a proxied call (`proxy::target::build`): `base` is an upstream's
/// validated `base_url`, `rest` the path after `/v1/proxy/{id}`, `parameter` the `query`
/// kind's name and value.
pub fn proxy_target(
    base: &url::Url,
    rest: &str,
    query: Option<&str>,
    parameter: Option<(&str, &str)>,
) -> Result<url::Url, &'static str> {
    crate::proxy::target::build(base, rest, query, parameter)
}

// --- the OAuth token answer ------------------------------------------------------------------

/// What a refresh makes of a token endpoint's answer: `status`, `headers` (pairs that are not
/// valid HTTP are left out) and `body`, through the same grant request, status check, parse
/// and classification as `TokenClient::refresh`.
pub fn token_answer(
    status: u16,
    headers: &[(Vec<u8>, Vec<u8>)],
    body: &[u8],
) -> Result<Grant, OAuthError> {
    let mut response = http::Response::new(body.to_vec());
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    let oauth = OAuthDescription {
        token_url: "https://token.invalid/token".into(),
        client_id: "fuzz".into(),
        scopes: vec!["read".into()],
        client_auth: ClientAuth::Basic,
        grant: Default::default(),
        audience: None,
        resource: None,
    };
    let refresh_token = SecretString::from("refresh-token");
    let transport = |_request| {
        std::future::ready(
            match crate::oauth::unavailable(response.status(), response.headers()) {
                Some(e) => Err(e),
                None => Ok(response.clone()),
            },
        )
    };
    ready(crate::oauth::exchange(
        &oauth,
        None,
        Some(&refresh_token),
        transport,
    ))
}

/// Runs a future that never waits (the canned transport answers at once).
fn ready<T>(future: impl Future<Output = T>) -> T {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the token exchange waited on a canned answer"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wrappers_reach_the_request_path() {
        assert_eq!(
            classify(&http::Method::GET, "/v1/credentials/abc")
                .id
                .as_deref(),
            Some("abc")
        );
        let q = query(Some("fields=a,,b&limit=0&workspace=w%20x"))
            .ok()
            .unwrap();
        assert_eq!(q.fields, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(q.page.ok(), Some((1, 0)));
        assert_eq!(q.workspace.as_deref(), Some("w x"));
        let c = credential_create(
            br#"{"environment":"Production","integration_type":"github","secrets":{"token":"t"}}"#,
        )
        .ok()
        .unwrap();
        assert_eq!(c.workspace, "default");
        assert!(routing_put(br#"{"environments":{"..":"local"}}"#).is_err());
        let grant = token_answer(
            200,
            &[(b"content-type".to_vec(), b"application/json".to_vec())],
            br#"{"access_token":"a","token_type":"bearer","expires_in":60}"#,
        )
        .ok()
        .unwrap();
        assert_eq!(grant.access_token.expose(), "a");
        let e = token_answer(503, &[(b"retry-after".to_vec(), b"7".to_vec())], b"")
            .err()
            .unwrap();
        assert_eq!(e.retry_after(), Some(std::time::Duration::from_secs(7)));
    }

    /// Only the token endpoint's own error code refuses a grant or a client (which marks a
    /// credential for re-authorisation for good): a 401 or 403 without one (a gateway's page,
    /// nothing, JSON that is no error object) is a protocol error, retried with back-off.
    #[test]
    fn only_an_oauth_error_code_is_a_refusal() {
        let html = [(b"content-type".to_vec(), b"text/html".to_vec())];
        let json = [(b"content-type".to_vec(), b"application/json".to_vec())];
        let code = |status, headers: &[(Vec<u8>, Vec<u8>)], body: &[u8]| match token_answer(
            status, headers, body,
        ) {
            Err(OAuthError::Rejected { code }) => Some(code),
            Err(OAuthError::Protocol { .. }) => None,
            other => panic!("{status}: {:?}", other.err()),
        };
        assert_eq!(code(401, &html, b"<h1>Unauthorized</h1>"), None);
        assert_eq!(code(401, &[], b""), None);
        assert_eq!(code(401, &json, br#"{"message":"bad client"}"#), None);
        assert_eq!(code(403, &json, br#"{"message":"no"}"#), None);
        assert_eq!(code(400, &json, br#"["invalid_grant"]"#), None);
        assert_eq!(code(401, &json, br#" ["Unauthorized"]"#), None);
        assert_eq!(
            code(401, &json, br#"{"error":"invalid_client"}"#).as_deref(),
            Some("invalid_client")
        );
        assert_eq!(
            code(400, &json, br#"{"error":"invalid_grant"}"#).as_deref(),
            Some("invalid_grant")
        );
    }

    /// `names`: store names that `encode` never makes decoded all the same, so two store
    /// names mapped back to one credproxy name. `from_str_radix` takes a sign (`-+b` was byte
    /// 0x0b, like `-0b`), and the empty name decoded to the empty name.
    #[test]
    fn names_decode_only_what_encode_makes() {
        for foreign in ["e-+bJ--", "", "a-+f", "a-0B"] {
            assert_eq!(decode_name(foreign), None, "{foreign:?}");
        }
        for name in ["e\u{b}J-", "a/b", "ü"] {
            let e = encode_name(name, usize::MAX).unwrap();
            assert_eq!(decode_name(&e).as_deref(), Some(name));
        }
    }
}
