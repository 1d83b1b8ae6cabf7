//! Request bodies of every route that has one, through the handler's own decoder and the checks
//! their use case makes before it needs the runtime: credential create and PATCH, secrets
//! manager create and PATCH, routing PUT.
//!
//! Input: the route on the first line (`manager_patch` takes the manager's type after it), the
//! JSON body after it. A first line that names no route picks one by its first byte.
#![no_main]

use credproxy::fuzzing as fz;
use credproxy::secret::SecretFields;
use credproxy::server::api::ApiError;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

const ROUTES: &[&str] = &[
    "credential_create",
    "credential_patch",
    "manager_create",
    "manager_patch",
    "routing_put",
];

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let head = String::from_utf8_lossy(head);
    let mut words = head.split_whitespace();
    let route = match words.next().filter(|r| ROUTES.contains(r)) {
        Some(r) => r,
        None => ROUTES[data.first().copied().unwrap_or(0) as usize % ROUTES.len()],
    };
    let kinds = fz::manager_kinds();
    let kind = words
        .next()
        .map(str::to_owned)
        .unwrap_or_else(|| kinds[data.len() % kinds.len()].to_owned());
    match route {
        "credential_create" => credential_create(body),
        "credential_patch" => credential_patch(body),
        "manager_create" => manager_create(body),
        "manager_patch" => manager_patch(&kind, body),
        _ => routing_put(body),
    }
});

/// A refused body is the caller's fault: 400 with a request-shape code, or 413 when a PATCH's
/// secrets pass the `[credentials]` limits; never a 5xx.
fn refused(e: &ApiError) {
    assert!(
        matches!(
            (e.status.as_u16(), e.code),
            (400, "invalid_json" | "invalid_request") | (413, "credential_too_large")
        ),
        "{} {} {:?}",
        e.status,
        e.code,
        e.detail
    );
    assert!(e.detail.is_some(), "a refusal says what is wrong");
}

/// JSON equality, with floats equal to within rounding: serde_json parses floats to the
/// nearest value only with its `float_roundtrip` feature, which nothing here asks for.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || ((x - y) / x).abs() < 1e-12
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(x), Value::Object(y)) => same_map(x, y),
        _ => a == b,
    }
}

fn same_map(x: &Map<String, Value>, y: &Map<String, Value>) -> bool {
    x.len() == y.len()
        && x.iter()
            .zip(y)
            .all(|((k, a), (l, b))| k == l && same_json(a, b))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with('.')
}

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control)
}

/// The JSON object of `fields` (exposed: this is the fuzzer's own data).
fn exposed(fields: &SecretFields) -> Value {
    Value::Object(
        fields
            .iter()
            .map(|(k, v)| (k.to_owned(), Value::String(v.expose().to_owned())))
            .collect(),
    )
}

/// The store's own round trip of secret fields.
fn stores_back(fields: &SecretFields) {
    let back = SecretFields::from_json(&fields.to_json()).expect("to_json output parses");
    assert!(
        back == *fields,
        "secret fields changed in to_json/from_json"
    );
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a Value serialises")
}

fn credential_create(body: &[u8]) {
    let c = match fz::credential_create(body) {
        Ok(c) => c,
        Err(e) => return refused(&e),
    };
    assert!(valid_name(&c.workspace) && valid_name(&c.environment));
    assert!(printable(&c.integration_type, 128));
    assert!(serde_json::to_vec(&c.metadata).unwrap().len() <= 16 * 1024);
    if let Some(o) = &c.oauth {
        let url = url::Url::parse(&o.token_url).expect("an accepted token URL parses");
        assert!(url.username().is_empty() && url.password().is_none() && url.fragment().is_none());
        assert!(
            url.scheme() == "https" || url.scheme() == "http",
            "{}",
            url.scheme()
        );
        assert!(!o.client_id.is_empty() && o.client_id.len() <= 512);
    }
    if let Some(e) = c.expires_at_ms {
        assert!((0..=253_402_300_799_999).contains(&e), "{e}");
    }
    if let Some(s) = &c.secrets {
        stores_back(s);
    }
    // What was accepted, written out again, is accepted again as the same request.
    let mut again = json!({
        "workspace": c.workspace,
        "environment": c.environment,
        "integration_type": c.integration_type,
        "metadata": c.metadata,
        "secrets_manager_id": c.secrets_manager_id,
        "external_id": c.external_id,
    });
    if let Some(s) = &c.secrets {
        again["secrets"] = exposed(s);
    }
    if let Some(o) = &c.oauth {
        again["oauth"] = json!({
            "token_url": o.token_url,
            "client_id": o.client_id,
            "scopes": o.scopes,
            "client_auth": o.client_auth,
            "grant": o.grant,
            "audience": o.audience,
            "resource": o.resource,
            "expires_at": c.expires_at_ms.map(credproxy::time::rfc3339_ms),
        });
    }
    let d = match fz::credential_create(&bytes(&again)) {
        Ok(d) => d,
        Err(e) => panic!("accepted, then refused when re-serialised: {:?}", e.detail),
    };
    assert_eq!(
        (&d.workspace, &d.environment, &d.integration_type),
        (&c.workspace, &c.environment, &c.integration_type)
    );
    assert!(same_map(&d.metadata, &c.metadata));
    assert_eq!(d.oauth, c.oauth);
    assert_eq!(d.expires_at_ms, c.expires_at_ms);
    assert!(d.secrets == c.secrets);
    assert_eq!(d.secrets_manager_id, c.secrets_manager_id);
    assert_eq!(d.external_id, c.external_id);
}

fn credential_patch(body: &[u8]) {
    let p = match fz::credential_patch(body) {
        Ok(p) => p,
        Err(e) => return refused(&e),
    };
    if let Some(m) = &p.metadata {
        assert!(serde_json::to_vec(m).unwrap().len() <= 16 * 1024);
    }
    if let Some(e) = p.expires_at_ms {
        assert!((0..=253_402_300_799_999).contains(&e), "{e}");
    }
    if let Some(s) = &p.secrets {
        stores_back(s);
    }
    let mut again = Map::new();
    if let Some(s) = &p.secrets {
        again.insert("secrets".into(), exposed(s));
    }
    if let Some(m) = &p.metadata {
        again.insert("metadata".into(), Value::Object(m.clone()));
    }
    if let Some(pin) = &p.secrets_manager_id {
        again.insert("secrets_manager_id".into(), json!(pin));
    }
    if let Some(e) = p.expires_at_ms {
        again.insert("expires_at".into(), json!(credproxy::time::rfc3339_ms(e)));
    }
    let q = match fz::credential_patch(&bytes(&Value::Object(again))) {
        Ok(q) => q,
        Err(e) => panic!("accepted, then refused when re-serialised: {:?}", e.detail),
    };
    assert!(q.secrets == p.secrets);
    match (&q.metadata, &p.metadata) {
        (Some(a), Some(b)) => assert!(same_map(a, b)),
        (a, b) => assert_eq!(a, b),
    }
    assert_eq!(q.secrets_manager_id, p.secrets_manager_id);
    assert_eq!(q.expires_at_ms, p.expires_at_ms);
}

/// Accepted access details: dotted keys, non-blank values.
fn auth_ok(auth: &SecretFields) {
    for (k, v) in auth.iter() {
        assert!(!k.is_empty());
        assert!(!v.expose().trim().is_empty(), "blank access detail `{k}`");
    }
    stores_back(auth);
}

fn manager_create(body: &[u8]) {
    let m = match fz::manager_create(body) {
        Ok(m) => m,
        Err(e) => return refused(&e),
    };
    assert!(valid_name(&m.workspace) && valid_name(&m.id) && m.id != "local");
    assert!(printable(&m.name, 128) && !m.name.trim().is_empty());
    assert!(fz::manager_kinds().contains(&m.kind));
    assert!(m.prefix.len() <= 256 && !m.prefix.chars().any(char::is_control));
    auth_ok(&m.auth);
    let again = json!({
        "workspace": m.workspace,
        "id": m.id,
        "name": m.name,
        "type": m.kind,
        "prefix": m.prefix,
        "settings": m.settings,
        "auth": exposed(&m.auth),
    });
    let n = match fz::manager_create(&bytes(&again)) {
        Ok(n) => n,
        Err(e) => panic!("accepted, then refused when re-serialised: {:?}", e.detail),
    };
    assert_eq!(
        (&n.workspace, &n.id, &n.name, n.kind, &n.prefix),
        (&m.workspace, &m.id, &m.name, m.kind, &m.prefix)
    );
    assert!(same_map(&n.settings, &m.settings));
    assert!(n.auth == m.auth);
}

fn manager_patch(kind: &str, body: &[u8]) {
    let p = match fz::manager_patch(kind, body) {
        Ok(p) => p,
        Err(e) => return refused(&e),
    };
    if let Some(name) = &p.name {
        assert!(printable(name, 128) && !name.trim().is_empty());
    }
    if let Some(auth) = &p.auth {
        auth_ok(auth);
    }
    let mut again = Map::new();
    if let Some(name) = &p.name {
        again.insert("name".into(), json!(name));
    }
    if let Some(s) = &p.settings {
        again.insert("settings".into(), Value::Object(s.clone()));
    }
    if let Some(a) = &p.auth {
        again.insert("auth".into(), exposed(a));
    }
    let q = match fz::manager_patch(kind, &bytes(&Value::Object(again))) {
        Ok(q) => q,
        Err(e) => panic!("accepted, then refused when re-serialised: {:?}", e.detail),
    };
    assert_eq!(q.name, p.name);
    match (&q.settings, &p.settings) {
        (Some(a), Some(b)) => assert!(same_map(a, b)),
        (a, b) => assert_eq!(a, b),
    }
    assert!(q.auth == p.auth);
}

fn routing_put(body: &[u8]) {
    let r = match fz::routing_put(body) {
        Ok(r) => r,
        Err(e) => return refused(&e),
    };
    assert!(valid_name(&r.workspace));
    assert!(r.environments.keys().all(|e| valid_name(e)));
    let again = json!({
        "workspace": r.workspace,
        "default": r.default,
        "environments": r.environments,
    });
    let s = match fz::routing_put(&bytes(&again)) {
        Ok(s) => s,
        Err(e) => panic!("accepted, then refused when re-serialised: {:?}", e.detail),
    };
    assert_eq!(
        (&s.workspace, &s.default, &s.environments),
        (&r.workspace, &r.default, &r.environments)
    );
}
