//! The API contract, checked on every answer the tests get: `openapi/credproxy.json` is loaded
//! once, each request's method and path are matched to an operation, and the answer's status,
//! headers and JSON body must be what the operation declares. A status the operation does not
//! list fails the test, and so does a schema keyword this validator does not implement (the
//! whole document is walked when it loads), so the document cannot drift from the code nor
//! quietly use a construct nobody checks.
//!
//! The validator is a compact JSON Schema subset: `type` (a name or an array of names),
//! `properties`, `required`, `additionalProperties` (a boolean or a schema), `items`, `enum`,
//! `const`, `oneOf`, `anyOf`, `allOf`, `$ref` (to `#/...` in the document), `minimum`,
//! `maximum`, `minItems`, `maxItems`, `minLength`, `maxLength`; annotations (`description`,
//! `title`, `format`, `default`, `examples`, ...) are ignored.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use credproxy::client::{Error, Reply};
use hyper::Method;
use serde_json::Value;

const DOCUMENT: &str = include_str!("../../openapi/credproxy.json");

/// Keywords the validator checks.
const CHECKED: &[&str] = &[
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "oneOf",
    "anyOf",
    "allOf",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
];

/// Keywords that say nothing about validity.
const ANNOTATIONS: &[&str] = &[
    "description",
    "title",
    "format",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
];

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One path template, split into segments: `Some(literal)` or `None` for a `{parameter}`.
struct Template {
    key: String,
    segments: Vec<Option<String>>,
}

pub struct Contract {
    doc: Value,
    templates: Vec<Template>,
}

/// The document, loaded and checked for unsupported keywords once per test binary.
pub fn contract() -> &'static Contract {
    static CONTRACT: OnceLock<Contract> = OnceLock::new();
    CONTRACT.get_or_init(|| {
        let doc: Value = serde_json::from_str(DOCUMENT).expect("openapi/credproxy.json is JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let contract = Contract {
            templates: doc["paths"]
                .as_object()
                .expect("`paths`")
                .keys()
                .map(|key| Template {
                    key: key.clone(),
                    segments: key
                        .trim_start_matches('/')
                        .split('/')
                        .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
                        .collect(),
                })
                .collect(),
            doc,
        };
        contract.check_document();
        self_test(&contract);
        contract
    })
}

/// `credproxy::client::send`, with the answer checked against the contract.
pub async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<Reply, Error> {
    let reply = credproxy::client::send(socket, method.clone(), path, headers, body).await?;
    contract().check(&method, path, &reply);
    Ok(reply)
}

impl Contract {
    /// Resolves a `$ref` such as `#/components/schemas/Credential`.
    fn resolve<'a>(&'a self, reference: &str) -> &'a Value {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("contract: only local references: {reference}"));
        self.doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("contract: dangling reference {reference}"))
    }

    /// An object that may be a `$ref` (a response, a header, a parameter).
    fn deref<'a>(&'a self, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(r) => self.deref(self.resolve(r)),
            None => value,
        }
    }

    /// Checks that `method path` got an answer the document allows; panics otherwise.
    pub fn check(&self, method: &Method, path: &str, reply: &Reply) {
        let status = reply.status.as_u16();
        let what = format!("{method} {path} answered {status}");
        let body = String::from_utf8_lossy(&reply.body);
        let responses = self.responses_for(method, path);
        let response = responses
            .get(&status.to_string())
            .or_else(|| responses.get("default"))
            .map(|r| self.deref(r))
            .unwrap_or_else(|| {
                panic!("contract: {what}, a status the document does not list for it: {body}")
            });
        if let Some(headers) = response.get("headers").and_then(Value::as_object) {
            for (name, header) in headers {
                let header = self.deref(header);
                match reply.headers.get(name.as_str()) {
                    None if header["required"] == true => {
                        panic!("contract: {what} without the required header {name}: {body}")
                    }
                    None => {}
                    Some(value) => {
                        let text = value.to_str().unwrap_or_else(|_| {
                            panic!("contract: {what}: header {name} is not text")
                        });
                        let schema = &header["schema"];
                        let value = if schema["type"] == "integer" {
                            text.parse::<i64>().map(Value::from).unwrap_or_else(|_| {
                                panic!(
                                    "contract: {what}: header {name}: {text:?} is not an integer"
                                )
                            })
                        } else {
                            Value::String(text.to_owned())
                        };
                        if let Err(e) = self.validate(schema, &value, name) {
                            panic!("contract: {what}: header {e}");
                        }
                    }
                }
            }
        }
        match response.get("content") {
            None => assert!(
                reply.body.is_empty(),
                "contract: {what} with a body the document does not declare: {body}"
            ),
            Some(content) => {
                let content_type = reply
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let essence = content_type.split(';').next().unwrap_or("").trim();
                if content.get(essence).is_none() && content.get("*/*").is_some() {
                    // Any media type (an upstream's answer through the proxy): nothing to check.
                    return;
                }
                let media = content.get(essence).unwrap_or_else(|| {
                    panic!(
                        "contract: {what} as {content_type:?}, not a declared media type: {body}"
                    )
                });
                let value: Value = serde_json::from_slice(&reply.body).unwrap_or_else(|e| {
                    panic!("contract: {what}: the body is not JSON ({e}): {body}")
                });
                if let Err(e) = self.validate(&media["schema"], &value, "body") {
                    panic!("contract: {what}: {e}\nbody: {body}");
                }
            }
        }
    }

    /// The `responses` of the operation `method path` names. A path the document does not
    /// have may only be refused (`route_not_found`, or the transport's refusals); a path it
    /// has, with a method it does not, only `method_not_allowed`.
    fn responses_for(&self, method: &Method, path: &str) -> serde_json::Map<String, Value> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let segments: Vec<&str> = path
            .trim_end_matches('/')
            .trim_start_matches('/')
            .split('/')
            .collect();
        let method = method.as_str().to_ascii_lowercase();
        // A call through the proxy: `{path}` stands for any number of segments.
        let proxied = path.starts_with("/v1/proxy/");
        let matching: Vec<&Template> = if proxied {
            self.templates
                .iter()
                .filter(|t| t.key == "/v1/proxy/{id}/{path}")
                .collect()
        } else if path.starts_with('/') {
            self.templates
                .iter()
                .filter(|t| {
                    t.segments.len() == segments.len()
                        && t.segments
                            .iter()
                            .zip(&segments)
                            .all(|(t, s)| t.as_deref().is_none_or(|t| t == *s))
                })
                .collect()
        } else {
            Vec::new()
        };
        // The most literal template with the method: `/v1/secretsmanagers/instructions` before
        // `/v1/secretsmanagers/{id}`.
        let operation = matching
            .iter()
            .filter(|t| self.doc["paths"][&t.key].get(&method).is_some())
            .max_by_key(|t| t.segments.iter().filter(|s| s.is_some()).count())
            .map(|t| &self.doc["paths"][&t.key][&method]);
        let transport = |refusal: &str| {
            let mut responses = serde_json::Map::new();
            for (status, name) in [
                ("400", "BadRequest"),
                ("401", "Unauthorized"),
                ("503", "Unavailable"),
                (
                    if refusal == "RouteNotFound" {
                        "404"
                    } else {
                        "405"
                    },
                    refusal,
                ),
            ] {
                responses.insert(
                    status.into(),
                    serde_json::json!({"$ref": format!("#/components/responses/{name}")}),
                );
            }
            responses
        };
        match operation {
            Some(op) => op["responses"]
                .as_object()
                .expect("an operation's responses")
                .clone(),
            None if matching.is_empty() => transport("RouteNotFound"),
            None => transport("MethodNotAllowed"),
        }
    }

    /// Validates `value` against `schema`; the error names where (`at`) and why.
    pub fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = match schema {
            Value::Bool(true) => return Ok(()),
            Value::Bool(false) => return Err(format!("{at}: nothing is allowed here")),
            Value::Object(o) => o,
            _ => panic!("contract: a schema at {at} is neither an object nor a boolean"),
        };
        if let Some(key) = unsupported_keyword(schema) {
            panic!("contract: the schema keyword `{key}` (at {at}) is not implemented");
        }
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            self.validate(self.resolve(r), value, at)?;
        }
        if let Some(types) = schema.get("type") {
            let names: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => panic!("contract: `type` at {at} is neither a name nor an array"),
            };
            if !names.iter().any(|t| is_type(t, value)) {
                return Err(format!("{at}: {} is not of type {types}", short(value)));
            }
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            if !options.contains(value) {
                return Err(format!(
                    "{at}: {} is not one of {}",
                    short(value),
                    Value::from(options.clone())
                ));
            }
        }
        if let Some(expected) = schema.get("const") {
            if expected != value {
                return Err(format!("{at}: {} is not {expected}", short(value)));
            }
        }
        let number = |k: &str| schema.get(k).and_then(Value::as_f64);
        if let Some(n) = value.as_f64() {
            if number("minimum").is_some_and(|m| n < m) || number("maximum").is_some_and(|m| n > m)
            {
                return Err(format!("{at}: {n} is out of range"));
            }
        }
        if let Some(s) = value.as_str() {
            let len = s.chars().count() as f64;
            if number("minLength").is_some_and(|m| len < m)
                || number("maxLength").is_some_and(|m| len > m)
            {
                return Err(format!(
                    "{at}: a string of {len} characters is out of range"
                ));
            }
        }
        if let Some(items) = value.as_array() {
            let len = items.len() as f64;
            if number("minItems").is_some_and(|m| len < m)
                || number("maxItems").is_some_and(|m| len > m)
            {
                return Err(format!("{at}: {len} items are out of range"));
            }
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    self.validate(item, v, &format!("{at}[{i}]"))?;
                }
            }
        }
        if let Some(object) = value.as_object() {
            let properties = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    if !object.contains_key(name) {
                        return Err(format!("{at}: the required `{name}` is missing"));
                    }
                }
            }
            for (k, v) in object {
                let here = format!("{at}.{k}");
                match properties.and_then(|p| p.get(k)) {
                    Some(s) => self.validate(s, v, &here)?,
                    None => match schema.get("additionalProperties") {
                        None => {}
                        Some(Value::Bool(false)) => {
                            return Err(format!("{at}: `{k}` is not a declared property"))
                        }
                        Some(s) => self.validate(s, v, &here)?,
                    },
                }
            }
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.validate(s, value, at)?;
            }
        }
        if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
            let errors: Vec<String> = any
                .iter()
                .filter_map(|s| self.validate(s, value, at).err())
                .collect();
            if errors.len() == any.len() {
                return Err(format!(
                    "{at}: matches none of anyOf: {}",
                    errors.join("; ")
                ));
            }
        }
        if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
            let results: Vec<Result<(), String>> =
                one.iter().map(|s| self.validate(s, value, at)).collect();
            let passed = results.iter().filter(|r| r.is_ok()).count();
            if passed != 1 {
                let errors: Vec<&str> = results
                    .iter()
                    .filter_map(|r| r.as_ref().err().map(String::as_str))
                    .collect();
                return Err(format!(
                    "{at}: matches {passed} of oneOf (exactly one wanted): {}",
                    errors.join("; ")
                ));
            }
        }
        Ok(())
    }

    /// Walks every schema in the document: a keyword the validator does not implement fails
    /// here, when the contract loads, not only when some answer reaches it.
    fn check_document(&self) {
        let mut schemas: Vec<(String, &Value)> = Vec::new();
        let components = &self.doc["components"];
        for (name, s) in components["schemas"].as_object().into_iter().flatten() {
            schemas.push((format!("components.schemas.{name}"), s));
        }
        for section in ["parameters", "headers"] {
            for (name, p) in components[section].as_object().into_iter().flatten() {
                schemas.push((format!("components.{section}.{name}"), &p["schema"]));
            }
        }
        let mut contents: Vec<(String, &Value)> = Vec::new();
        for (name, r) in components["responses"].as_object().into_iter().flatten() {
            contents.push((format!("components.responses.{name}"), r));
        }
        for (path, item) in self.doc["paths"].as_object().expect("`paths`") {
            for (key, op) in item.as_object().expect("a path item") {
                if key == "parameters" {
                    for p in op.as_array().into_iter().flatten() {
                        if let Some(s) = p.get("schema") {
                            schemas.push((format!("{path} parameters"), s));
                        }
                    }
                    continue;
                }
                if !METHODS.contains(&key.as_str()) {
                    continue;
                }
                let here = format!("{} {path}", key.to_ascii_uppercase());
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if let Some(s) = p.get("schema") {
                        schemas.push((format!("{here} parameters"), s));
                    }
                }
                if let Some(body) = op.get("requestBody") {
                    contents.push((format!("{here} requestBody"), body));
                }
                let responses = op["responses"]
                    .as_object()
                    .unwrap_or_else(|| panic!("{here} has no responses"));
                for (status, r) in responses {
                    contents.push((format!("{here} {status}"), r));
                }
            }
        }
        for (at, holder) in contents {
            let holder = self.deref(holder);
            for (media, m) in holder["content"].as_object().into_iter().flatten() {
                schemas.push((format!("{at} {media}"), &m["schema"]));
            }
            for (name, h) in holder["headers"].as_object().into_iter().flatten() {
                schemas.push((format!("{at} header {name}"), &self.deref(h)["schema"]));
            }
        }
        for (at, schema) in schemas {
            self.walk(schema, &at);
        }
    }

    fn walk(&self, schema: &Value, at: &str) {
        let object = match schema {
            Value::Bool(_) => return,
            Value::Object(o) => o,
            _ => panic!("contract: a schema at {at} is neither an object nor a boolean"),
        };
        for (key, value) in object {
            let here = format!("{at}.{key}");
            match key.as_str() {
                "$ref" => {
                    self.resolve(value.as_str().expect("`$ref` is a string"));
                }
                "properties" => {
                    for (name, s) in value.as_object().expect("`properties` is an object") {
                        self.walk(s, &format!("{here}.{name}"));
                    }
                }
                "items" | "additionalProperties" => self.walk(value, &here),
                "oneOf" | "anyOf" | "allOf" => {
                    for (i, s) in value
                        .as_array()
                        .expect("an array of schemas")
                        .iter()
                        .enumerate()
                    {
                        self.walk(s, &format!("{here}[{i}]"));
                    }
                }
                k if CHECKED.contains(&k) || ANNOTATIONS.contains(&k) => {}
                k => panic!("contract: the schema keyword `{k}` (at {at}) is not implemented"),
            }
        }
    }
}

fn is_type(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        other => panic!("contract: unknown type `{other}`"),
    }
}

/// A value in an error message, cut short (bodies may be long; these are test answers).
fn short(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 120 {
        let mut end = 120;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The validator's own check, run once when the contract loads: it refuses what it claims
/// to refuse.
fn self_test(c: &Contract) {
    let schema = serde_json::json!({"$ref": "#/components/schemas/Error"});
    let good = serde_json::json!({"error": {"code": "not_found", "message": "m"}});
    assert!(c.validate(&schema, &good, "body").is_ok());
    for bad in [
        serde_json::json!({"error": {"code": "no_such_code", "message": "m"}}),
        serde_json::json!({"error": {"code": "not_found"}}),
        serde_json::json!({"error": {"code": "not_found", "message": "m", "extra": 1}}),
        serde_json::json!({"error": {"code": "not_found", "message": 1}}),
        serde_json::json!([]),
    ] {
        assert!(c.validate(&schema, &bad, "body").is_err(), "{bad}");
    }
    let nullable = serde_json::json!({"type": ["string", "null"]});
    assert!(c.validate(&nullable, &Value::Null, "x").is_ok());
    assert!(c.validate(&nullable, &serde_json::json!(1), "x").is_err());
    let pattern = serde_json::json!({"type": "string", "pattern": "^a"});
    assert_eq!(
        unsupported_keyword(pattern.as_object().unwrap()),
        Some("pattern")
    );
}

/// A keyword of `schema` the validator neither checks nor may ignore.
fn unsupported_keyword(schema: &serde_json::Map<String, Value>) -> Option<&str> {
    schema
        .keys()
        .map(String::as_str)
        .find(|k| !CHECKED.contains(k) && !ANNOTATIONS.contains(k))
}
