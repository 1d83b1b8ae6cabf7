//! JSON on the wire: reading request bodies within the size limit, and building JSON
//! responses with the headers every answer carries.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use zeroize::Zeroizing;

use super::ApiError;
use crate::server::App;

pub type Body = Full<Bytes>;

pub(super) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(super) fn ok_json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    json_response(
        status,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

/// Reads a JSON body within the size limit into a buffer that is wiped afterwards (it may
/// hold secrets), and parses it. Parse errors name the problem without quoting values.
pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
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
