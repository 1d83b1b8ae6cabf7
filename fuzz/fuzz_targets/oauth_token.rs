//! The OAuth token endpoint's answer: the grant request's response parsing and what a refresh
//! makes of it (a grant, a rejection, unavailable, or a protocol error).
//!
//! Input: line 1 is `STATUS [CONTENT-TYPE]`, line 2 a `Retry-After` value (empty for none),
//! the rest the body.
#![no_main]

use credproxy::fuzzing::token_answer;
use credproxy::oauth::OAuthError;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    }
}

/// Every object key in `v`: the parse error's path names keys, so a token that is also a key
/// may appear there.
fn keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let (first, rest) = line(data);
    let (retry_after, body) = line(rest);
    let first = String::from_utf8_lossy(first);
    let mut words = first.splitn(2, ' ');
    let status = words
        .next()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or_else(|| [200, 400, 401, 429, 500, 503][data.len() % 6]);
    let mut headers = Vec::new();
    if let Some(ct) = words.next() {
        headers.push((b"content-type".to_vec(), ct.as_bytes().to_vec()));
    }
    if !retry_after.is_empty() {
        headers.push((b"retry-after".to_vec(), retry_after.to_vec()));
    }

    let answer = token_answer(status, &headers, body);
    // The body's first JSON value: oauth2 parses that and ignores whatever follows it.
    let json: Option<Value> = serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok);
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let effective = http::StatusCode::from_u16(status).map_or(502, |s| s.as_u16());
    let unavailable = (500..600).contains(&effective) || effective == 429;
    match &answer {
        Ok(grant) => {
            assert_eq!(effective, 200);
            assert!(!grant.access_token.expose().is_empty());
            assert_eq!(
                Some(grant.access_token.expose()),
                field("access_token").as_deref()
            );
            let refresh = field("refresh_token").filter(|r| !r.is_empty());
            assert_eq!(
                grant.refresh_token.as_ref().map(|r| r.expose()),
                refresh.as_deref()
            );
            let expires = json
                .as_ref()
                .and_then(|j| j.get("expires_in"))
                .and_then(Value::as_u64);
            assert_eq!(grant.expires_in.map(|d| d.as_secs()), expires);
        }
        Err(OAuthError::Unavailable {
            retry_after: after, ..
        }) => {
            assert!(unavailable, "{effective} is not worth retrying");
            if after.is_some() {
                assert!(!retry_after.is_empty());
            }
        }
        Err(OAuthError::Rejected { code }) => {
            assert!(effective != 200 && !unavailable, "{effective}");
            assert!(
                !code.is_empty()
                    && code.len() <= 64
                    && code
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)),
                "{code:?}"
            );
        }
        Err(OAuthError::Protocol { .. }) => assert!(!unavailable, "{effective}"),
    }
    // Only the endpoint's own error object refuses (for good), never an array read
    // positionally. (A body serde_json cannot read as a value, a lone surrogate in a member
    // oauth2 skips, is not checked.)
    if let (Err(OAuthError::Rejected { .. }), Some(j)) = (&answer, &json) {
        assert!(j.get("error").is_some(), "refused without an error member");
    }
    // An error never carries a token from the body (it is logged and answered). What the error
    // says that the server chose is its code or detail. A detail naming where the body went
    // wrong holds a JSON path, which is made of the body's keys, indices and separators only;
    // any other detail is fixed wording around the server's words (a token may happen to spell
    // that wording, "unrecognised_error"), which is cut out first.
    if let Err(e) = &answer {
        let said = match e {
            OAuthError::Rejected { code } => code,
            OAuthError::Unavailable { detail, .. } | OAuthError::Protocol { detail } => detail,
        };
        let path = said
            .strip_prefix("unexpected content at `")
            .and_then(|p| p.strip_suffix('`'));
        let mut pieces = vec![if path.is_some() { "" } else { said.as_str() }];
        for fixed in FIXED {
            pieces = pieces.iter().flat_map(|p| p.split(fixed)).collect();
        }
        let mut known = Vec::new();
        if let Some(j) = &json {
            keys(j, &mut known);
        }
        for (_, v) in &headers {
            known.push(String::from_utf8_lossy(v).into_owned());
            if let Ok(v) = http::HeaderValue::from_bytes(v) {
                known.push(format!("{v:?}"));
            }
        }
        // The error code is the server's to choose, and is reported.
        known.extend(field("error"));
        for token in [field("access_token"), field("refresh_token")]
            .into_iter()
            .flatten()
        {
            if token.len() < 8 || known.iter().any(|k| k.contains(&token)) {
                continue;
            }
            assert!(
                !pieces.iter().any(|p| p.contains(&token)),
                "a token in the error: {e}"
            );
            // In a path, a token that is not within one key would span a separator.
            if let Some(path) = path.filter(|_| !token.contains(['.', '[', ']', '?'])) {
                assert!(!path.contains(&token), "a token in the error: {e}");
            }
        }
    }
});

/// The fixed wording of credproxy's and oauth2's details around the server's words.
const FIXED: &[&str] = &[
    "unrecognised_error",
    "unexpected response Content-Type: ",
    ", should be `application/json`",
    "server returned empty error response",
    "server returned empty response body",
    "empty access_token",
    "HTTP ",
];
