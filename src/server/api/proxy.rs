//! `ANY /v1/proxy/{id}/{path…}`: a call through the egress proxy (`crate::proxy`), its errors
//! in the API's shape, and what the audit line and the metrics say about it.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::{ApiError, Audit, Body};
use crate::access::Caller;
use crate::proxy::{Call, ProxyError, Scope, Seen};
use crate::server::App;

pub(super) async fn forward(
    app: &Arc<App>,
    caller: Caller,
    id: &str,
    rest: &str,
    request: Request<Incoming>,
    audit: &mut Audit<'_>,
) -> Result<Response<Body>, ApiError> {
    let method = request.method().clone();
    let mut seen = None;
    let call = Call {
        caller,
        id,
        rest,
        request,
    };
    let result = app.proxy.forward(call, &mut seen).await;
    let result = result.map(|r| r.map(Body::Proxied)).map_err(ApiError::from);
    if let Some(Seen {
        host,
        integration_type,
    }) = &seen
    {
        let status = match &result {
            Ok(r) => r.status(),
            Err(e) => e.status,
        };
        app.service
            .metrics()
            .proxy
            .answered(integration_type, status.as_u16());
        audit.upstream = Some((method, host.clone()));
    } else {
        audit.upstream = Some((method, "-".to_owned()));
    }
    result
}

impl From<ProxyError> for ApiError {
    fn from(e: ProxyError) -> Self {
        use ProxyError::*;
        let error = ApiError::new;
        let retry = |error: ApiError| ApiError {
            retry_after: Some(std::time::Duration::from_secs(1)),
            ..error
        };
        match e {
            Service(e) => e.into(),
            InvalidPath(why) => error(
                StatusCode::BAD_REQUEST,
                "invalid_proxy_path",
                "the path would leave the upstream's base URL, or cannot be checked",
            )
            .with_detail(why),
            NoUpstream => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "no_upstream",
                "the credential's integration type has no [[proxy.upstreams]] entry; it cannot be used through the proxy",
            ),
            UpstreamUnresolved(key) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "upstream_unresolved",
                "the upstream's host takes a label from the credential's metadata, which does not give it as a DNS label",
            )
            .with_detail(format!("metadata `{key}`")),
            SecretFieldMissing(field) => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "secret_field_missing",
                "the credential has no secret field the upstream's auth applies",
            )
            .with_detail(format!("`{field}`")),
            NotAHeader => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "secret_field_invalid",
                "the credential's secret cannot be sent in a header (it holds a line break or another control character)",
            ),
            TooLarge => error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than proxy.max_body_bytes",
            ),
            WorkerBody(why) => {
                tracing::info!(error = %why, "a proxied request's body did not arrive whole");
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "the request body did not arrive whole",
                )
            }
            Overloaded { scope } => retry(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many calls through the proxy in flight; retry shortly",
            ))
            .with_detail(match scope {
                Scope::All => "proxy.max_concurrent calls are in flight",
                Scope::Credential => {
                    "this credential has proxy.max_concurrent_per_credential calls in flight"
                }
                Scope::Caller => "this caller has proxy.max_concurrent_per_caller calls in flight",
            }),
            Unreachable(_) => retry(error(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "the upstream could not be reached or did not answer in HTTP; see the daemon's log",
            )),
            Timeout => retry(error(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream did not answer within its timeout",
            )),
            AnswerTooLarge => error(
                StatusCode::BAD_GATEWAY,
                "upstream_too_large",
                "the upstream's answer is larger than proxy.max_body_bytes",
            ),
            Client(detail) => {
                tracing::error!(error = %detail, "cannot build the HTTP client for an upstream");
                ApiError::internal()
            }
        }
    }
}
