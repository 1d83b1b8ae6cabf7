//! `POST /v1/credentials:batchGet`: up to 100 credentials in one request, each answered with
//! the status, object or error a single read of it would get, in the order asked.

use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::body::{json_response, read_json, Body};
use super::credentials::pin_unavailable;
use super::{ApiError, Audit};
use crate::access::Caller;
use crate::cache::view;
use crate::server::App;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchGetRequest {
    ids: Vec<String>,
    /// The secret fields to hand out, as `?fields=` of a single read; all when absent.
    #[serde(default)]
    fields: Option<Vec<String>>,
}

/// What one item costs beyond its id and its credential's body or error: the keys, the status.
const ITEM_OVERHEAD: usize = 96;

/// A first guess at a credential's body, so most batches never move their buffer.
const TYPICAL_BODY: usize = 512;

pub(super) async fn get(
    app: &Arc<App>,
    caller: &Caller,
    request: Request<Incoming>,
    audit: &mut Audit<'_>,
) -> Result<Response<Body>, ApiError> {
    let request: BatchGetRequest = read_json(app, request).await?;
    let only = request.fields.as_deref();
    let results = app.service.get_many(caller, &request.ids).await?;
    // Holds secret values: wiped when hyper drops the body, and never grown in place (see
    // `reserve`).
    let mut out = Zeroizing::new(Vec::with_capacity(
        32 + request.ids.len() * (ITEM_OVERHEAD + TYPICAL_BODY),
    ));
    out.extend_from_slice(b"{\"credentials\":[");
    for (i, (id, result)) in request.ids.iter().zip(results).enumerate() {
        // An id is a valid name (checked by `get_many`): a plain JSON string.
        let mut head = Vec::with_capacity(ITEM_OVERHEAD + id.len());
        head.extend_from_slice(if i > 0 { b",{\"id\":" } else { b"{\"id\":" });
        write(&mut head, id);
        let (status, fields) = match result {
            Ok((entry, cache_status)) => {
                head.extend_from_slice(b",\"status\":200,\"cache_status\":");
                write(&mut head, cache_status.as_str());
                head.extend_from_slice(b",\"credential\":");
                reserve(&mut out, head.len() + view::max_body_len(&entry) + 1);
                out.extend_from_slice(&head);
                view::write_body(&entry, only, pin_unavailable(app, &entry), &mut out);
                let fields = app.audits().then(|| view::field_names(&entry, only));
                (StatusCode::OK, fields)
            }
            Err(e) => {
                let error = ApiError::from(e);
                head.extend_from_slice(b",\"status\":");
                write(&mut head, &error.status.as_u16());
                head.extend_from_slice(b",\"error\":");
                write(&mut head, &error.object());
                reserve(&mut out, head.len() + 1);
                out.extend_from_slice(&head);
                (error.status, None)
            }
        };
        out.push(b'}');
        if app.audits() {
            audit.batch.push((id.clone(), status.as_u16(), fields));
        }
    }
    reserve(&mut out, 2);
    out.extend_from_slice(b"]}");
    Ok(json_response(StatusCode::OK, Bytes::from_owner(out)))
}

/// Makes room for `additional` bytes without growing the Vec in place, which would copy the
/// secrets already written and free the old block unwiped: a bigger buffer takes the bytes,
/// and the old one is wiped as it is dropped.
fn reserve(out: &mut Zeroizing<Vec<u8>>, additional: usize) {
    if out.capacity() - out.len() >= additional {
        return;
    }
    let wanted = (out.len() + additional).max(out.capacity() * 2);
    let mut bigger = Zeroizing::new(Vec::with_capacity(wanted));
    bigger.extend_from_slice(out);
    *out = bigger;
}

fn write<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Into a Vec, of strings and numbers: cannot fail.
    let _ = serde_json::to_writer(out, value);
}

#[cfg(test)]
mod tests {
    use hyper::Method;

    use super::super::{classify, unknown_or_method, RouteId};

    #[test]
    fn a_reserve_moves_the_bytes_to_a_buffer_big_enough() {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(4));
        out.extend_from_slice(b"abc");
        super::reserve(&mut out, 1);
        assert_eq!(out.capacity(), 4, "room enough: nothing moves");
        super::reserve(&mut out, 100);
        assert!(out.capacity() >= 103);
        assert_eq!(&out[..], b"abc");
    }

    #[test]
    fn the_batch_route_is_a_post_of_its_own() {
        let t = classify(&Method::POST, "/v1/credentials:batchGet");
        assert_eq!((t.route, t.id), (RouteId::CredentialBatchGet, None));
        assert_eq!(
            classify(&Method::GET, "/v1/credentials:batchGet").route,
            RouteId::Unknown
        );
        assert_eq!(
            unknown_or_method("/v1/credentials:batchGet").code,
            "method_not_allowed"
        );
    }
}
