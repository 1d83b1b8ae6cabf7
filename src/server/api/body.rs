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

/// A response body: the API's own, whole, or an answer streamed through the egress proxy.
pub enum Body {
    Full(Full<Bytes>),
    Proxied(crate::proxy::Answer),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Body::Full(Full::new(bytes.into()))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = crate::proxy::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::pin::Pin;
        match self.get_mut() {
            Body::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(|never| match never {}))),
            Body::Proxied(answer) => Pin::new(answer).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Proxied(answer) => answer.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Proxied(answer) => answer.size_hint(),
        }
    }
}

pub(super) fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(super) fn ok_json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(status, Bytes::from(body)),
        Err(e) => serialisation_failed(e),
    }
}

/// A value that cannot be serialised is a bug on our side. Answering with the status the
/// handler chose would hand the caller an empty or cut-off body as a success.
fn serialisation_failed(e: serde_json::Error) -> Response<Body> {
    // serde_json's messages never quote the value, and our Serialize impls fail only with
    // fixed messages, so the error is safe to log.
    tracing::error!(error = %e, "cannot serialise a response");
    ApiError::internal().into_response()
}

/// Reads a JSON body within the size limit and the body-read timeout into a buffer that is
/// wiped afterwards (it may hold secrets), and parses it. Parse errors name the key path and the
/// position, never a value.
pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
    app: &App,
    request: Request<Incoming>,
) -> Result<T, ApiError> {
    check_content_type(request.headers())?;
    let buffer = tokio::time::timeout(app.body_read_timeout, collect(app, request.into_body()))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive within the body-read timeout",
            )
        })??;
    parse_json(&buffer)
}

/// One `Content-Type`, and it is JSON: `application/json`, with parameters at most (a
/// `charset` must be UTF-8). Absent is taken as JSON, as curl and most clients omit it.
fn check_content_type(headers: &hyper::HeaderMap) -> Result<(), ApiError> {
    let unsupported = || {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be application/json",
        )
    };
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    if values.next().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_header",
            "the request has more than one Content-Type header",
        ));
    }
    let value = value.to_str().map_err(|_| unsupported())?;
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(unsupported());
    }
    for parameter in parts {
        let (name, value) = parameter.split_once('=').ok_or_else(unsupported)?;
        if name.trim().eq_ignore_ascii_case("charset")
            && !value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        {
            return Err(unsupported());
        }
    }
    Ok(())
}

async fn collect(app: &App, body: Incoming) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let mut body = Limited::new(body, app.max_body_bytes);
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
    Ok(buffer)
}

/// Every body is a JSON object: serde would also fill a struct from an array, by position.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(buffer: &[u8]) -> Result<T, ApiError> {
    let invalid = |detail: String| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body is not valid JSON for this call",
        )
        .with_detail(detail)
    };
    let first = buffer.iter().position(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|i| buffer[i] != b'{') {
        return Err(invalid("the body must be a JSON object".into()));
    }
    let describe = |path: &str, e: serde_json::Error| {
        let at = format!("line {} column {}", e.line(), e.column());
        invalid(match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                format!("malformed JSON at {at}")
            }
            _ => {
                let message = crate::secret::without_values(&e.to_string());
                match path {
                    "" | "." => format!("{message} (at {at})"),
                    _ => format!("`{path}`: {message} (at {at})"),
                }
            }
        })
    };
    let mut deserializer = serde_json::Deserializer::from_slice(buffer);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        describe(&path, e.into_inner())
    })?;
    deserializer.end().map_err(|e| describe("", e))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::ser::{Error as _, SerializeMap};

    /// Fails before writing anything.
    struct Refuses;
    impl Serialize for Refuses {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(S::Error::custom("refuses"))
        }
    }

    /// Writes one entry, then fails: what a half-written body would look like.
    struct FailsHalfway;
    impl Serialize for FailsHalfway {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut map = s.serialize_map(None)?;
            map.serialize_entry("token", "half-written")?;
            Err(S::Error::custom("fails halfway"))
        }
    }

    async fn parts(response: Response<Body>) -> (StatusCode, Option<HeaderValue>, Bytes) {
        let status = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, body)
    }

    #[tokio::test]
    async fn a_value_that_fails_to_serialise_answers_500_with_the_error_shape() {
        let responses = [
            ok_json(StatusCode::OK, &Refuses),
            ok_json(StatusCode::CREATED, &FailsHalfway),
        ];
        for response in responses {
            let (status, content_type, body) = parts(response).await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(content_type.unwrap(), "application/json");
            assert_eq!(
                &body[..],
                br#"{"error":{"code":"internal","message":"internal error"}}"#
            );
        }
    }

    #[tokio::test]
    async fn a_value_that_serialises_keeps_its_status_and_bytes() {
        let value = serde_json::json!({"a": 1});
        let (status, _, body) = parts(ok_json(StatusCode::CREATED, &value)).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(&body[..], br#"{"a":1}"#);
    }
}
