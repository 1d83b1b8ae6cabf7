//! Which headers cross the proxy, and how a credential's secret becomes one.
//!
//! Dropped from the worker's request: its own credentials (`Authorization`, `Cookie`,
//! `Proxy-*`), what decides where and how the call travels (`Host`, hop-by-hop headers and
//! those `Connection` names, `Content-Length`, `Expect`), credproxy's TCP token, and the header
//! the upstream's `header` kind sets. Dropped from the answer: hop-by-hop headers.

use std::collections::HashSet;

use base64::Engine;
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION};
use zeroize::Zeroizing;

use crate::config::{is_reserved_header, ProxyAuth};

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded either way.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
];

/// Headers that make some servers route a request elsewhere than its path says (IIS,
/// Symfony, method overrides): a worker may choose a path under the base URL, not one beside it.
const REROUTING: [&str; 5] = [
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// At most this many names of a `Connection` header are honoured: hundreds of thousands of
/// them would otherwise cost a comparison against every header each.
const MAX_CONNECTION_NAMES: usize = 64;

/// Names listed in `Connection` headers: hop-by-hop for this message.
fn named_by_connection(headers: &HeaderMap) -> HashSet<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .take(MAX_CONNECTION_NAMES)
        .collect()
}

/// A header name as servers that map `-` and `_` alike (CGI, WSGI, nginx with
/// `underscores_in_headers`) read it: `X_Api_Key` is `x-api-key` to them.
fn loose(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// The worker's headers that go upstream.
pub fn request(worker: &HeaderMap, token_header: &HeaderName, auth: &ProxyAuth) -> HeaderMap {
    let extra = named_by_connection(worker);
    let set_by_auth = match auth {
        ProxyAuth::Header { header, .. } => loose(header),
        _ => AUTHORIZATION.as_str().to_owned(),
    };
    let mut out = HeaderMap::with_capacity(worker.len());
    for (name, value) in worker {
        let n = name.as_str();
        let l = loose(n);
        let dropped = name == AUTHORIZATION
            || name == token_header
            || is_reserved_header(name)
            || HOP_BY_HOP.contains(&n)
            || REROUTING.contains(&n)
            || l.starts_with("x-forwarded-")
            || l.starts_with("proxy-")
            || l == set_by_auth
            || l == "authorization"
            || extra.contains(n);
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// What stands in an answer's header for a secret value the upstream repeated.
const BLANKED: &str = "[REDACTED]";

/// Values shorter than this are not looked for in answers' headers.
const MIN_BLANKED: usize = 8;

/// The upstream's headers that go back to the worker, with every `secrets` value (as it was
/// sent, and percent-encoded as the `query` kind sends it) blanked out: a redirect's
/// `Location` or a pagination `Link` would otherwise hand the worker the query parameter.
pub fn answer(upstream: &HeaderMap, secrets: &[&str]) -> HeaderMap {
    let extra = named_by_connection(upstream);
    let forms: Vec<String> = secrets
        .iter()
        // A short value would blank unrelated text (an ETag, a request id); a real secret is
        // longer than this.
        .filter(|s| s.len() >= MIN_BLANKED)
        .flat_map(|s| [(*s).to_owned(), super::target::encode_value(s)])
        .collect();
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || extra.contains(n) {
            continue;
        }
        out.append(name.clone(), blank(value, &forms));
    }
    out
}

fn blank(value: &HeaderValue, forms: &[String]) -> HeaderValue {
    let bytes = value.as_bytes();
    if !forms.iter().any(|f| contains(bytes, f.as_bytes())) {
        return value.clone();
    }
    let mut text = Zeroizing::new(String::from_utf8_lossy(bytes).into_owned());
    for form in forms {
        if text.contains(form.as_str()) {
            *text = text.replace(form.as_str(), BLANKED);
        }
    }
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(BLANKED))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What the secret adds to a call: a header, or a query parameter (name, value).
pub enum Applied {
    Header(HeaderName, HeaderValue),
    Query(String, Zeroizing<String>),
}

/// Builds what `auth` adds from the credential's fields (`secret` looks one up by name).
/// `Err` names the missing field, never a value.
pub fn apply<'a>(
    auth: &'a ProxyAuth,
    secret: impl Fn(&str) -> Option<Zeroizing<String>>,
) -> Result<Applied, ApplyError<'a>> {
    let field = |name: &'a str| secret(name).ok_or(ApplyError::Missing(name));
    let header = |name: HeaderName, text: &[u8]| {
        let mut value = HeaderValue::from_bytes(text).map_err(|_| ApplyError::NotAHeader)?;
        // Kept out of HTTP/2's header compression tables, and out of `Debug` output.
        value.set_sensitive(true);
        Ok(Applied::Header(name, value))
    };
    match auth {
        ProxyAuth::Bearer { field: name } => {
            let value = field(name)?;
            let mut text = Zeroizing::new(Vec::with_capacity(7 + value.len()));
            text.extend_from_slice(b"Bearer ");
            text.extend_from_slice(value.as_bytes());
            header(AUTHORIZATION, &text)
        }
        ProxyAuth::Basic { username, password } => {
            let (user, pass) = (field(username)?, field(password)?);
            let mut pair = Zeroizing::new(Vec::with_capacity(user.len() + 1 + pass.len()));
            pair.extend_from_slice(user.as_bytes());
            pair.push(b':');
            pair.extend_from_slice(pass.as_bytes());
            let encoded = base64::engine::general_purpose::STANDARD.encode(&*pair);
            let mut text = Zeroizing::new(Vec::with_capacity(6 + encoded.len()));
            text.extend_from_slice(b"Basic ");
            text.extend_from_slice(encoded.as_bytes());
            drop(Zeroizing::new(encoded));
            header(AUTHORIZATION, &text)
        }
        ProxyAuth::Header {
            header: name,
            prefix,
            field: f,
        } => {
            let value = field(f)?;
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| ApplyError::NotAHeader)?;
            let mut text = Zeroizing::new(Vec::with_capacity(prefix.len() + value.len()));
            text.extend_from_slice(prefix.as_bytes());
            text.extend_from_slice(value.as_bytes());
            header(name, &text)
        }
        ProxyAuth::Query {
            parameter,
            field: f,
        } => Ok(Applied::Query(parameter.clone(), field(f)?)),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ApplyError<'a> {
    /// The credential has no such field (or it is not a string).
    Missing(&'a str),
    /// The value cannot be a header value (a line break in it).
    NotAHeader,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(name: &str) -> Option<Zeroizing<String>> {
        match name {
            "access_token" => Some(Zeroizing::new("at-1".into())),
            "user" => Some(Zeroizing::new("ann".into())),
            "pass" => Some(Zeroizing::new("pw:1".into())),
            "broken" => Some(Zeroizing::new("a\nb".into())),
            _ => None,
        }
    }

    fn header_of(applied: Applied) -> (String, String) {
        match applied {
            Applied::Header(n, v) => {
                assert!(v.is_sensitive());
                (n.to_string(), v.to_str().unwrap().to_owned())
            }
            Applied::Query(..) => panic!("a header was expected"),
        }
    }

    #[test]
    fn each_kind_applies_the_secret() {
        let bearer = ProxyAuth::Bearer {
            field: "access_token".into(),
        };
        assert_eq!(
            header_of(apply(&bearer, secrets).unwrap()),
            ("authorization".into(), "Bearer at-1".into())
        );
        let basic = ProxyAuth::Basic {
            username: "user".into(),
            password: "pass".into(),
        };
        assert_eq!(
            header_of(apply(&basic, secrets).unwrap()).1,
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("ann:pw:1")
            )
        );
        let custom = ProxyAuth::Header {
            header: "x-api-key".into(),
            prefix: "Token ".into(),
            field: "access_token".into(),
        };
        assert_eq!(
            header_of(apply(&custom, secrets).unwrap()),
            ("x-api-key".into(), "Token at-1".into())
        );
        let query = ProxyAuth::Query {
            parameter: "key".into(),
            field: "access_token".into(),
        };
        match apply(&query, secrets).unwrap() {
            Applied::Query(n, v) => assert_eq!((n.as_str(), v.as_str()), ("key", "at-1")),
            Applied::Header(..) => panic!("a query parameter was expected"),
        }
        let missing = ProxyAuth::Bearer {
            field: "api_key".into(),
        };
        assert_eq!(
            apply(&missing, secrets).err(),
            Some(ApplyError::Missing("api_key"))
        );
        let broken = ProxyAuth::Bearer {
            field: "broken".into(),
        };
        assert_eq!(apply(&broken, secrets).err(), Some(ApplyError::NotAHeader));
    }

    #[test]
    fn the_workers_credentials_and_hop_by_hop_headers_stay_behind() {
        let mut worker = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer mine"),
            ("proxy-authorization", "x"),
            ("cookie", "session=1"),
            ("host", "evil.example"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("expect", "100-continue"),
            ("x-credproxy-token", "t"),
            ("x-api-key", "mine"),
            ("x_api_key", "mine too"),
            ("proxy_authorization", "x"),
            ("x-original-url", "/admin"),
            ("x-http-method-override", "TRACE"),
            ("x-forwarded-host", "evil"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("x-request-id", "r-1"),
        ] {
            worker.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let auth = ProxyAuth::Header {
            header: "x-api-key".into(),
            prefix: String::new(),
            field: "access_token".into(),
        };
        let token = HeaderName::from_static("x-credproxy-token");
        let sent = request(&worker, &token, &auth);
        let mut names: Vec<&str> = sent.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "content-type", "x-request-id"]);

        let mut upstream = HeaderMap::new();
        for (n, v) in [
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("retry-after", "7"),
            ("content-type", "application/json"),
            ("set-cookie", "a=b"),
        ] {
            upstream.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        upstream.append(
            HeaderName::from_static("location"),
            HeaderValue::from_static("https://x.example/a/?q=1&key=s3cr%26t%3D%2Fx&b=s3cr&t=/x"),
        );
        let back = answer(&upstream, &["s3cr&t=/x", "short"]);
        assert_eq!(
            back["location"],
            "https://x.example/a/?q=1&key=[REDACTED]&b=[REDACTED]"
        );
        let mut names: Vec<&str> = back.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["content-type", "location", "retry-after", "set-cookie"]
        );
    }
}
