//! An upstream's `base_url`: which URLs are accepted (https, or http to loopback; no user,
//! query or fragment), and the leading host labels a credential's metadata may fill.

use super::proxy::Upstream;
use super::{invalid, ConfigError};

/// What a host label taken from metadata is while the URL is checked, and in `base_url`.
const PLACEHOLDER: &str = "credproxy-metadata-label";

/// Splits `{key}` labels off the front of the URL's host: `https://{site}.atlassian.net/x`
/// gives `https://credproxy-metadata-label.atlassian.net/x` and `["site"]`. Placeholders are
/// whole leading labels, and at least two literal labels follow them (or `localhost`), so a
/// credential's metadata chooses a tenant under the operator's domain, never the domain.
fn host_placeholders(key: &str, value: &str) -> Result<(String, Vec<String>), ConfigError> {
    if !value.contains(['{', '}']) {
        return Ok((value.to_owned(), Vec::new()));
    }
    let refused = || {
        invalid(
            key,
            "`{key}` may only stand for whole leading labels of the host, followed by at least two literal labels (`https://{site}.atlassian.net`)",
        )
    };
    let (scheme, rest) = value.split_once("://").ok_or_else(refused)?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if tail.contains(['{', '}']) || authority.contains('@') {
        return Err(refused());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') && !h.is_empty() => (h, Some(p)),
        _ => (authority, None),
    };
    let labels: Vec<&str> = host.split('.').collect();
    let mut keys = Vec::new();
    let mut out = Vec::with_capacity(labels.len());
    for label in &labels {
        match label.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
            Some(name) if out.len() == keys.len() => {
                let valid = !name.is_empty()
                    && name.len() <= 64
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !valid || keys.iter().any(|k| k == name) {
                    return Err(invalid(
                        key,
                        "a `{key}` label names a metadata key: lowercase letters, digits and `_`, each once",
                    ));
                }
                keys.push(name.to_owned());
                out.push(PLACEHOLDER);
            }
            _ if label.contains(['{', '}']) => return Err(refused()),
            _ => out.push(label),
        }
    }
    // `{site}.localhost` names the loopback interface (RFC 6761), like `localhost` itself.
    let literal = &labels[keys.len()..];
    let loopback = literal.len() == 1 && literal[0].eq_ignore_ascii_case("localhost");
    if literal.len() < 2 && !loopback {
        return Err(refused());
    }
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    Ok((format!("{scheme}://{}{port}{tail}", out.join(".")), keys))
}

/// `https://host[:port][/prefix]`; `http://` only to a loopback host, where nothing crosses a
/// network. The URL is not quoted back in errors: it is the operator's, but may carry a token.
pub(super) fn base_url(key: &str, value: &str) -> Result<(url::Url, Vec<String>), ConfigError> {
    let (value, keys) = host_placeholders(key, value)?;
    let mut url =
        url::Url::parse(&value).map_err(|e| invalid(key, format!("is not a URL ({e})")))?;
    let Some(host) = url.host() else {
        return Err(invalid(key, "must name a host"));
    };
    if !keys.is_empty() && !matches!(host, url::Host::Domain(_)) {
        return Err(invalid(key, "`{key}` labels need a host name"));
    }
    let loopback = match host {
        // RFC 6761: names under `localhost.` are the loopback interface.
        url::Host::Domain(d) => {
            let d = d.to_ascii_lowercase();
            d == "localhost" || d.ends_with(".localhost")
        }
        url::Host::Ipv4(a) => a.is_loopback(),
        url::Host::Ipv6(a) => a.is_loopback(),
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        "http" => {
            return Err(invalid(
                key,
                "must be https:// (http:// only to a loopback host: the secret would cross the network in clear)",
            ))
        }
        _ => return Err(invalid(key, "must be an https:// URL")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            key,
            "must not carry a user or password; the credential is applied by `auth`",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(key, "must not have a query or a fragment"));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    if path
        .split('/')
        .skip(1)
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(invalid(key, "has an empty, `.` or `..` path segment"));
    }
    url.set_path(&path);
    Ok((url, keys))
}

impl Upstream {
    /// The base URL for a credential whose metadata gives `label(key)` for each of
    /// `host_labels`: the URL itself when it has none. `Err` names the key that is missing or
    /// not a DNS label (one to 63 letters, digits and `-`, not starting or ending with `-`).
    pub fn base_for<'k>(
        &'k self,
        label: impl Fn(&str) -> Option<String>,
    ) -> Result<std::borrow::Cow<'k, url::Url>, &'k str> {
        if self.host_labels.is_empty() {
            return Ok(std::borrow::Cow::Borrowed(&self.base_url));
        }
        let host = self.base_url.host_str().unwrap_or_default();
        let mut given = Vec::with_capacity(self.host_labels.len());
        for key in &self.host_labels {
            let value = label(key).ok_or(key.as_str())?.to_ascii_lowercase();
            let valid = (1..=63).contains(&value.len())
                && value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !value.starts_with('-')
                && !value.ends_with('-');
            if !valid {
                return Err(key);
            }
            given.push(value);
        }
        let literal = host
            .split('.')
            .skip(self.host_labels.len())
            .collect::<Vec<_>>()
            .join(".");
        let mut url = self.base_url.clone();
        url.set_host(Some(&format!("{}.{literal}", given.join("."))))
            .map_err(|_| self.host_labels[0].as_str())?;
        Ok(std::borrow::Cow::Owned(url))
    }
}
