//! The request router and query strings: `classify(method, path)` and the query parsing of
//! every route (`fields=`, `limit`, `offset`, `workspace`, the delete flags).
//!
//! Input: the method on the first line, then the request target (`/path?query`).
#![no_main]

use credproxy::fuzzing::{classify, query, query_get, unknown_or_method, RouteId};
use libfuzzer_sys::fuzz_target;

const WITH_ID: &[RouteId] = &[
    RouteId::CredentialGet,
    RouteId::CredentialPatch,
    RouteId::CredentialDelete,
    RouteId::CredentialRefresh,
    RouteId::ManagerGet,
    RouteId::ManagerPatch,
    RouteId::ManagerDelete,
    RouteId::Proxy,
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (method, target) = text.split_once('\n').unwrap_or(("GET", &text));
    let Ok(method) = http::Method::from_bytes(method.trim().as_bytes()) else {
        return;
    };
    let (path, raw_query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };

    // The router.
    let t = classify(&method, path);
    assert_eq!(t.id.is_some(), WITH_ID.contains(&t.route), "{t:?}");
    if let Some(id) = &t.id {
        assert!(!id.contains('/'), "{id:?}");
        assert!(path.contains(id.as_str()));
    }
    // Trailing slashes never change the route.
    let slashed = classify(&method, &format!("{path}/"));
    assert_eq!((slashed.route, &slashed.id), (t.route, &t.id));
    // The metric label is a closed set of snake_case names.
    let label = t.route.as_str();
    assert!(!label.is_empty() && label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    // A path some method serves answers 405 to the others, any other path 404.
    let unknown = unknown_or_method(path);
    if t.route != RouteId::Unknown {
        assert_eq!(unknown.status, 405, "{path:?}");
    } else {
        assert!(matches!(unknown.status.as_u16(), 404 | 405));
    }

    // The query string.
    let q = match query(raw_query) {
        Ok(q) => q,
        Err(e) => {
            // Only a parameter given twice is refused.
            assert_eq!((e.status.as_u16(), e.code), (400, "invalid_query"));
            return;
        }
    };
    let raw_pairs = raw_query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .count();
    assert_eq!(q.pairs.len(), raw_pairs);
    let first = |name: &str| {
        q.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    for name in ["fields", "workspace", "limit", "offset", "dry_run", ""] {
        assert_eq!(query_get(raw_query, name), first(name), "{name}");
    }
    assert_eq!(q.workspace, first("workspace"));
    assert_eq!(
        q.dry_run,
        matches!(first("dry_run").as_deref(), Some("true" | "1"))
    );
    assert_eq!(
        q.delete_credentials,
        matches!(first("credentials").as_deref(), Some("delete" | "1"))
    );
    match (&q.fields, first("fields")) {
        (None, None) => {}
        (Some(fields), Some(raw)) => {
            assert!(fields.iter().all(|f| !f.is_empty() && !f.contains(',')));
            assert_eq!(
                fields.join(","),
                raw.split(',')
                    .filter(|f| !f.is_empty())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        other => panic!("fields {other:?}"),
    }
    match &q.page {
        Ok((limit, offset)) => {
            assert!((1..=500).contains(limit), "{limit}");
            assert!(*offset <= 1_000_000, "{offset}");
        }
        Err(e) => {
            assert_eq!((e.status.as_u16(), e.code), (400, "invalid_request"));
            // Names the parameter, never quotes its value.
            assert!(
                matches!(
                    e.detail.as_deref(),
                    Some("`limit` must be a whole number up to 500")
                        | Some("`offset` must be a whole number up to 1000000")
                ),
                "{:?}",
                e.detail
            );
        }
    }

    // Round trip: the decoded pairs, form-encoded again, decode to themselves.
    let mut encoded = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in &q.pairs {
        encoded.append_pair(k, v);
    }
    let encoded = encoded.finish();
    let again = query(Some(&encoded))
        .ok()
        .expect("distinct names stay distinct");
    assert_eq!(again.pairs, q.pairs, "{encoded:?}");
});
