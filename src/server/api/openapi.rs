//! `GET /v1/openapi.json`: the API's OpenAPI 3.1 description, `openapi/credproxy.json`, built
//! into the binary. Like the probes it takes no parameters and needs no access rule: any
//! caller the transport admits (the socket's permissions, the TCP listener's token) may read
//! it, since it describes the API and holds nothing of any workspace.

use bytes::Bytes;
use hyper::{Response, StatusCode};

use super::body::{json_response, Body};

/// The document, exactly as committed.
pub(super) const DOCUMENT: &str = include_str!("../../../openapi/credproxy.json");

pub(super) fn document() -> Response<Body> {
    json_response(StatusCode::OK, Bytes::from_static(DOCUMENT.as_bytes()))
}

#[cfg(test)]
mod tests {
    use hyper::Method;
    use serde_json::Value;

    use super::super::{classify, RouteId};
    use super::DOCUMENT;

    /// Every route but `Unknown`. `RouteId::Unknown` stays last, so its discriminant counts
    /// the others: a route added to the enum but not here fails to compile.
    const ALL: [RouteId; RouteId::Unknown as usize] = [
        RouteId::CredentialCreate,
        RouteId::CredentialGet,
        RouteId::CredentialPatch,
        RouteId::CredentialDelete,
        RouteId::CredentialRefresh,
        RouteId::CredentialBatchGet,
        RouteId::Managers,
        RouteId::ManagerCreate,
        RouteId::ManagerGet,
        RouteId::ManagerPatch,
        RouteId::ManagerDelete,
        RouteId::Instructions,
        RouteId::ManagerSecrets,
        RouteId::Routing,
        RouteId::RoutingPut,
        RouteId::Migrations,
        RouteId::Reload,
        RouteId::Events,
        RouteId::Health,
        RouteId::Ready,
        RouteId::OpenApi,
        RouteId::Proxy,
    ];

    /// The methods a call through the proxy may use; the document has one operation each.
    const PROXY_METHODS: usize = 7;

    /// Each route's method and OpenAPI path template. The match is exhaustive: a new route
    /// needs its template here, and the test below then needs it in the document.
    fn template(route: RouteId) -> Option<(Method, &'static str)> {
        use RouteId::*;
        Some(match route {
            CredentialCreate => (Method::POST, "/v1/credentials"),
            CredentialGet => (Method::GET, "/v1/credentials/{id}"),
            CredentialPatch => (Method::PATCH, "/v1/credentials/{id}"),
            CredentialDelete => (Method::DELETE, "/v1/credentials/{id}"),
            CredentialRefresh => (Method::POST, "/v1/credentials/{id}/refresh"),
            CredentialBatchGet => (Method::POST, "/v1/credentials:batchGet"),
            Managers => (Method::GET, "/v1/secretsmanagers"),
            ManagerCreate => (Method::POST, "/v1/secretsmanagers"),
            ManagerGet => (Method::GET, "/v1/secretsmanagers/{id}"),
            ManagerPatch => (Method::PATCH, "/v1/secretsmanagers/{id}"),
            ManagerDelete => (Method::DELETE, "/v1/secretsmanagers/{id}"),
            Instructions => (Method::GET, "/v1/secretsmanagers/instructions"),
            ManagerSecrets => (Method::GET, "/v1/secretsmanagers/secrets"),
            Routing => (Method::GET, "/v1/routing"),
            RoutingPut => (Method::PUT, "/v1/routing"),
            Migrations => (Method::GET, "/v1/migrations"),
            Reload => (Method::POST, "/v1/reload"),
            Events => (Method::GET, "/v1/events"),
            Health => (Method::GET, "/healthz"),
            Ready => (Method::GET, "/readyz"),
            OpenApi => (Method::GET, "/v1/openapi.json"),
            Proxy => (Method::GET, "/v1/proxy/{id}/{path}"),
            Unknown => return None,
        })
    }

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi/credproxy.json is JSON")
    }

    #[test]
    fn the_document_describes_every_route_the_server_knows() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("`paths` is an object");
        for route in ALL {
            let (method, path) = template(route).expect("a known route has a template");
            // The template is the route's: a concrete path made from it classifies as it.
            let concrete = path.replace("{id}", "some-id").replace("{path}", "a/b");
            assert_eq!(
                classify(&method, &concrete).route,
                route,
                "{method} {path} does not classify as {route:?}"
            );
            let operation = &paths
                .get(path)
                .unwrap_or_else(|| panic!("the document has no path {path}"))
                [method.as_str().to_ascii_lowercase()];
            assert!(
                operation.is_object(),
                "the document has no {method} {path} ({route:?})"
            );
            // Operation ids are unique: the proxy's are `proxy_get`, `proxy_post`...
            let id = operation["operationId"].as_str().unwrap_or_default();
            assert!(
                id == route.as_str()
                    || (route == RouteId::Proxy
                        && id == format!("proxy_{}", method.as_str().to_ascii_lowercase())),
                "{method} {path}: operationId {id} is not the route's metrics label"
            );
        }
        let proxy = &paths["/v1/proxy/{id}/{path}"];
        for method in ["get", "head", "post", "put", "patch", "delete", "options"] {
            assert_eq!(proxy[method]["operationId"], format!("proxy_{method}"));
        }
    }

    #[test]
    fn every_operation_in_the_document_is_a_route() {
        const METHODS: [&str; 8] = [
            "get", "put", "post", "delete", "options", "head", "patch", "trace",
        ];
        let doc = document();
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (key, _) in item.as_object().unwrap() {
                if !METHODS.contains(&key.as_str()) {
                    continue;
                }
                operations += 1;
                let method = Method::from_bytes(key.to_ascii_uppercase().as_bytes()).unwrap();
                let route = classify(&method, &path.replace("{id}", "some-id")).route;
                assert_ne!(route, RouteId::Unknown, "{method} {path} is no route");
                assert_eq!(template(route).map(|(_, p)| p), Some(path.as_str()));
            }
        }
        assert_eq!(operations, ALL.len() + PROXY_METHODS - 1);
    }

    /// Every `StatusCode::X, "code"` pair the server's sources construct an error from.
    fn codes_in_sources() -> Vec<(u16, String)> {
        const SOURCES: [&str; 10] = [
            include_str!("proxy.rs"),
            include_str!("error.rs"),
            include_str!("body.rs"),
            include_str!("mod.rs"),
            include_str!("admin.rs"),
            include_str!("batch.rs"),
            include_str!("credentials.rs"),
            include_str!("events.rs"),
            include_str!("managers.rs"),
            include_str!("../mod.rs"),
        ];
        let mut out = Vec::new();
        for source in SOURCES {
            for (at, _) in source.match_indices("StatusCode::") {
                let rest = &source[at + "StatusCode::".len()..];
                let name_end = rest
                    .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                    .unwrap_or(rest.len());
                let (name, rest) = rest.split_at(name_end);
                let Some(rest) = rest.strip_prefix(',') else {
                    continue;
                };
                let Some(rest) = rest.trim_start().strip_prefix('"') else {
                    continue;
                };
                let code = &rest[..rest.find('"').unwrap()];
                let status = match name {
                    "BAD_REQUEST" => 400,
                    "UNAUTHORIZED" => 401,
                    "FORBIDDEN" => 403,
                    "NOT_FOUND" => 404,
                    "METHOD_NOT_ALLOWED" => 405,
                    "REQUEST_TIMEOUT" => 408,
                    "CONFLICT" => 409,
                    "PAYLOAD_TOO_LARGE" => 413,
                    "UNSUPPORTED_MEDIA_TYPE" => 415,
                    "UNPROCESSABLE_ENTITY" => 422,
                    "INTERNAL_SERVER_ERROR" => 500,
                    "BAD_GATEWAY" => 502,
                    "SERVICE_UNAVAILABLE" => 503,
                    "GATEWAY_TIMEOUT" => 504,
                    other => panic!("a status this test does not know: {other} ({code})"),
                };
                out.push((status, code.to_owned()));
            }
        }
        out
    }

    /// The error codes are a public contract: the document's `ErrorCode` lists exactly the
    /// codes the server answers with, each under its status's `ErrorNNN`.
    #[test]
    fn the_document_lists_every_error_code_under_its_status() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        let listed: Vec<&str> = schemas["ErrorCode"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let found = codes_in_sources();
        assert!(found.len() > 30, "the scan found only {found:?}");
        for (status, code) in &found {
            assert!(
                listed.contains(&code.as_str()),
                "`{code}` is not in ErrorCode"
            );
            let by_status = &schemas[format!("Error{status}")]["allOf"][1]["properties"]["error"]
                ["properties"]["code"]["enum"];
            assert!(
                by_status
                    .as_array()
                    .is_some_and(|codes| codes.contains(&Value::from(code.as_str()))),
                "`{code}` is not listed under Error{status}"
            );
        }
        for code in listed {
            assert!(
                found.iter().any(|(_, c)| c == code),
                "ErrorCode lists `{code}`, which no source answers with"
            );
        }
    }

    #[tokio::test]
    async fn the_route_serves_the_document_as_json() {
        use http_body_util::BodyExt;
        let response = super::document();
        assert_eq!(response.status(), hyper::StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let served: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(served, document());
    }
}
