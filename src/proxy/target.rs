//! Where a proxied call goes: the worker's path and query joined to the upstream's base URL,
//! with every way out of that base refused before anything is sent.
//!
//! The path is taken as it arrived (still percent-encoded) and never normalised: a segment that
//! is `.` or `..` once decoded, an encoded separator, or an empty segment is refused, so the
//! upstream (which may decode once more, or normalise) sees exactly the path credproxy checked.
//! The URL is built by appending to the base's own path, never by resolving a reference
//! against it (`//host/x` would name another host), and checked again once built.

use std::borrow::Cow;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

/// Why a path was refused; the worker gets it as the error's detail (it names no value).
pub type Refusal = &'static str;

/// Characters a query parameter's value is encoded with: everything but unreserved ones.
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}')
    .add(b'/')
    .add(b':')
    .add(b';')
    .add(b',')
    .add(b'@')
    .add(b'$')
    .add(b'!')
    .add(b'\'')
    .add(b'(')
    .add(b')')
    .add(b'*');

/// Checks the path after `/v1/proxy/{id}` on its own (before the credential is known): empty,
/// or `/` followed by segments that stay where they are.
pub fn check_path(rest: &str) -> Result<(), Refusal> {
    if rest.is_empty() {
        return Ok(());
    }
    let Some(segments) = rest.strip_prefix('/') else {
        return Err("the path after the credential id must start with `/`");
    };
    let count = segments.split('/').count();
    for (i, raw) in segments.split('/').enumerate() {
        if raw.is_empty() {
            // A trailing slash is a path of its own (`/items/`); `//` anywhere else is refused:
            // some servers read it as the start of a host.
            if i + 1 == count {
                continue;
            }
            return Err("empty path segment (`//`)");
        }
        if raw.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
            return Err("backslash or control character in the path");
        }
        let decoded = percent_decode_str(raw).collect::<Vec<u8>>();
        // Overlong encodings (`%c0%ae` for `.`) are not UTF-8: some decoders still read them.
        let Ok(decoded_text) = std::str::from_utf8(&decoded) else {
            return Err("a path segment is not UTF-8 once percent-decoded");
        };
        if is_dot_segment(decoded_text) {
            return Err("`.` or `..` path segment (also when percent-encoded, with `;` parameters, spaces or full-width dots)");
        }
        if decoded
            .iter()
            .any(|b| matches!(b, b'/' | b'\\' | b'%') || b.is_ascii_control())
        {
            return Err("percent-encoded `/`, `\\`, `%` or control character in a path segment");
        }
    }
    Ok(())
}

/// Whether some server would read `segment` as `.` or `..`: servlet containers drop its
/// `;parameters` first (`..;x`), Windows servers trim trailing spaces and dots, servers that
/// normalise Unicode (NFKC) read full-width and other dot look-alikes as dots.
fn is_dot_segment(segment: &str) -> bool {
    let before_parameters = segment.split(';').next().unwrap_or_default();
    let dots: String = before_parameters
        .trim_matches(char::is_whitespace)
        .chars()
        .map(|c| match c {
            '\u{FF0E}' | '\u{2024}' | '\u{FE52}' => '.',
            c => c,
        })
        .collect();
    matches!(dots.as_str(), "." | "..")
}

/// The upstream URL of a call: `base`'s scheme, host, port and path, then `rest` (checked by
/// [`check_path`]), then the worker's `query` with `parameter` (the `query` kind's, if any)
/// removed and appended with its value.
pub fn build(
    base: &url::Url,
    rest: &str,
    query: Option<&str>,
    parameter: Option<(&str, &str)>,
) -> Result<url::Url, Refusal> {
    check_path(rest)?;
    let prefix = base.path().trim_end_matches('/');
    let mut url = base.clone();
    let path = match (prefix.is_empty(), rest.is_empty()) {
        (true, true) => Cow::Borrowed("/"),
        (_, true) => Cow::Borrowed(prefix),
        _ => Cow::Owned(format!("{prefix}{rest}")),
    };
    url.set_path(&path);
    // The URL parser drops tabs and line breaks: `key\t=` would become the credential's own
    // parameter name after the check below that removes the worker's.
    if query.is_some_and(|q| q.bytes().any(|b| b.is_ascii_control() || b == b' ')) {
        return Err("space or control character in the query");
    }
    let query = query_with(query, parameter);
    url.set_query(query.as_deref());
    // Built by appending, so this holds by construction; checked anyway, as the last word
    // before a secret goes out.
    let same_origin = url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default()
        && url.username().is_empty()
        && url.password().is_none();
    // `set_path` may percent-encode a character the worker sent raw (`{`), which only ever
    // lengthens the path; dropping a segment (normalising) would shorten it.
    let under_prefix = url.path().len() >= path.len()
        && url
            .path()
            .strip_prefix(prefix)
            .is_some_and(|after| after.is_empty() || after.starts_with('/'));
    if !(same_origin && under_prefix) {
        return Err("the path does not stay under the upstream's base URL");
    }
    Ok(url)
}

/// The worker's query with every `name=` pair of the credential's parameter dropped (the
/// worker may not choose the credential) and the parameter appended.
fn query_with(query: Option<&str>, parameter: Option<(&str, &str)>) -> Option<String> {
    let query = query.filter(|q| !q.is_empty());
    let Some((name, value)) = parameter else {
        return query.map(str::to_owned);
    };
    let mut out = String::new();
    let name_loosely = loose_key(name);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        // Some parsers also split on `;`, ignore case or `[]`: any part of the pair that one
        // of them would take for the parameter drops the pair.
        let names_it = pair.split(';').enumerate().any(|(i, part)| {
            // After a `;`, only a `name=value` part is a parameter to such a parser.
            let key = match part.split_once('=') {
                Some((k, _)) => k,
                None if i == 0 => part,
                None => return false,
            };
            let spaced = key.replace('+', " ");
            let key = percent_decode_str(&spaced).decode_utf8_lossy();
            key == name || loose_key(&key) == name_loosely
        });
        if names_it {
            continue;
        }
        out.push_str(pair);
        out.push('&');
    }
    out.extend(utf8_percent_encode(name, QUERY_VALUE));
    out.push('=');
    out.extend(utf8_percent_encode(value, QUERY_VALUE));
    Some(out)
}

/// A parameter name as the loosest parsers compare them: letters and digits, lowercased.
fn loose_key(key: &str) -> String {
    key.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// `value` percent-encoded as a query parameter's value is sent.
pub fn encode_value(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn paths_and_queries_are_appended_to_the_base() {
        let api = base("https://api.example.com/api");
        let root = base("https://api.example.com/");
        let cases = [
            (&api, "", None, "https://api.example.com/api"),
            (&api, "/", None, "https://api.example.com/api/"),
            (
                &api,
                "/v3/items/a%20b",
                Some("x=1&y=%2F"),
                "https://api.example.com/api/v3/items/a%20b?x=1&y=%2F",
            ),
            (&root, "", None, "https://api.example.com/"),
            (&root, "/@evil/x", None, "https://api.example.com/@evil/x"),
            (&root, "/items/", Some(""), "https://api.example.com/items/"),
            (
                &root,
                "/items/{id}",
                None,
                "https://api.example.com/items/%7Bid%7D",
            ),
            (
                &root,
                "/a;v=1/..x/...",
                None,
                "https://api.example.com/a;v=1/..x/...",
            ),
            (
                &root,
                "/a:b/http:",
                None,
                "https://api.example.com/a:b/http:",
            ),
        ];
        for (b, rest, query, want) in cases {
            assert_eq!(
                build(b, rest, query, None).unwrap().as_str(),
                want,
                "{rest}"
            );
        }
    }

    #[test]
    fn escapes_are_refused() {
        let b = base("https://api.example.com/api");
        for rest in [
            "/../x",
            "/a/../../x",
            "/..",
            "/.",
            "/%2e%2e/x",
            "/%2E%2E/%2E%2E/x",
            "/.%2e/x",
            "/%2e/x",
            "/..%2f..%2fx",
            "/a%2fb",
            "/a%5cb",
            "/%5c%5cevil/x",
            "//evil.example/x",
            "/x//y",
            "//",
            "/http://evil/x",
            "/a\\b",
            "/a%00b",
            "/a%252e%252e",
            "/..;/admin",
            "/%c0%ae%c0%ae/x",
            "/%e0%80%ae/x",
            "/%ef%bc%8e%ef%bc%8e/x",
            "/..%20/x",
            "/%20../x",
            "/..%3b/admin",
            "/.;x/y",
            "x",
            "evil.example/x",
        ] {
            assert!(build(&b, rest, None, None).is_err(), "{rest} was accepted");
        }
    }

    #[test]
    fn the_query_kind_replaces_what_the_worker_sent() {
        let b = base("https://maps.example.com");
        let url = build(
            &b,
            "/geocode",
            Some(
                "key=mine&address=a+b&Key=x&k%65y=also&KEY[]=y&a=1;key=z&key%00=w&keys=ok&s=n;key",
            ),
            Some(("key", "s3cr&t=/")),
        )
        .unwrap();
        assert_eq!(
            url.query(),
            Some("address=a+b&keys=ok&s=n;key&key=s3cr%26t%3D%2F"),
            "{url}"
        );
        let url = build(&b, "", None, Some(("api key", "v"))).unwrap();
        assert_eq!(url.query(), Some("api%20key=v"));
        // Found by the fuzzer: the URL parser would strip the tab and leave `key` twice.
        assert!(build(&b, "", Some("key\t\t=x"), Some(("key", "v"))).is_err());
        assert!(build(&b, "", Some("a=b c"), None).is_err());
    }
}
