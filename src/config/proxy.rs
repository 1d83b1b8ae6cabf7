//! `[proxy]`: the egress proxy's limits, and `[[proxy.upstreams]]`, where the credentials of an
//! integration type may be used and how their secret is applied to the call.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::proxy_url::base_url;
use super::{invalid, ConfigError};

pub const DEFAULT_PROXY_MAX_CONCURRENT: usize = 256;
pub const DEFAULT_PROXY_MAX_PER_CREDENTIAL: usize = 32;
pub const DEFAULT_PROXY_MAX_BODY_BYTES: u64 = 1 << 30;
pub const DEFAULT_PROXY_REPLAY_BUFFER_BYTES: usize = 64 * 1024;
pub const DEFAULT_PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(60);
/// A request body buffered for a retry is held in memory: a few megabytes at most.
const MAX_REPLAY_BUFFER: usize = 8 << 20;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    max_concurrent: Option<usize>,
    max_concurrent_per_credential: Option<usize>,
    max_concurrent_per_caller: Option<usize>,
    max_body_bytes: Option<u64>,
    replay_buffer_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    integration_type: String,
    base_url: String,
    auth: String,
    field: Option<String>,
    username_field: Option<String>,
    password_field: Option<String>,
    header: Option<String>,
    prefix: Option<String>,
    parameter: Option<String>,
    ca_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

/// `[proxy]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// Proxied calls in flight, all credentials together.
    pub max_concurrent: usize,
    pub max_concurrent_per_credential: usize,
    /// Calls in flight per caller (a uid on the socket; TCP token holders together): a worker
    /// that stops reading its answers holds its slots, and only its own.
    pub max_concurrent_per_caller: usize,
    /// The most bytes of a request or an answer body, each way.
    pub max_body_bytes: u64,
    /// A request body whose `Content-Length` is at most this is read before it is sent, so a
    /// call refused with `401` can be sent again after a refresh.
    pub replay_buffer_bytes: usize,
    pub upstreams: Vec<Upstream>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_concurrent: DEFAULT_PROXY_MAX_CONCURRENT,
            max_concurrent_per_credential: DEFAULT_PROXY_MAX_PER_CREDENTIAL,
            max_concurrent_per_caller: DEFAULT_PROXY_MAX_CONCURRENT,
            max_body_bytes: DEFAULT_PROXY_MAX_BODY_BYTES,
            replay_buffer_bytes: DEFAULT_PROXY_REPLAY_BUFFER_BYTES,
            upstreams: Vec::new(),
        }
    }
}

impl ProxyConfig {
    pub fn upstream(&self, integration_type: &str) -> Option<&Upstream> {
        self.upstreams
            .iter()
            .find(|u| u.integration_type == integration_type)
    }
}

/// Where the credentials of one integration type may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    /// `proxy.upstreams[i]`, for logs.
    pub key: String,
    pub integration_type: String,
    /// `https://host[:port][/prefix]`, without a trailing slash, query, fragment or userinfo.
    /// Labels of the host taken from the credential's metadata hold `credproxy-metadata-label` here.
    pub base_url: url::Url,
    /// The host's leading labels given by each credential's metadata (`{site}.atlassian.net`):
    /// the metadata keys, in label order.
    pub host_labels: Vec<String>,
    pub auth: ProxyAuth,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

/// How a credential's secret is added to a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyAuth {
    /// `Authorization: Bearer <field>`.
    Bearer { field: String },
    /// `Authorization: Basic base64(<username>:<password>)`.
    Basic { username: String, password: String },
    /// `<header>: <prefix><field>`.
    Header {
        header: String,
        prefix: String,
        field: String,
    },
    /// `?<parameter>=<field>`.
    Query { parameter: String, field: String },
}

impl ProxyAuth {
    /// The fields whose values are secret (a basic username is not): what an answer's
    /// headers are scrubbed of.
    pub fn secret_fields(&self) -> Vec<&str> {
        match self {
            ProxyAuth::Basic { password, .. } => vec![password],
            other => other.fields(),
        }
    }

    /// The secret fields it needs.
    pub fn fields(&self) -> Vec<&str> {
        match self {
            ProxyAuth::Bearer { field }
            | ProxyAuth::Header { field, .. }
            | ProxyAuth::Query { field, .. } => vec![field],
            ProxyAuth::Basic { username, password } => vec![username, password],
        }
    }
}

/// `api_slots`: `server.max_concurrent_requests`. A proxied call holds one of those until its
/// upstream answers, so the proxy may never take them all: by default it takes at most half.
pub(super) fn validate(raw: RawProxy, api_slots: usize) -> Result<ProxyConfig, ConfigError> {
    let d = ProxyConfig::default();
    let max_concurrent = raw
        .max_concurrent
        .unwrap_or(d.max_concurrent.min(api_slots / 2).max(1));
    let c = ProxyConfig {
        max_concurrent,
        max_concurrent_per_credential: raw
            .max_concurrent_per_credential
            .unwrap_or(d.max_concurrent_per_credential.min(max_concurrent)),
        max_concurrent_per_caller: raw.max_concurrent_per_caller.unwrap_or(max_concurrent),
        max_body_bytes: raw.max_body_bytes.unwrap_or(d.max_body_bytes),
        replay_buffer_bytes: raw.replay_buffer_bytes.unwrap_or(d.replay_buffer_bytes),
        upstreams: Vec::new(),
    };
    if !(1..=100_000).contains(&c.max_concurrent) {
        return Err(invalid(
            "proxy.max_concurrent",
            "must be between 1 and 100000",
        ));
    }
    if c.max_concurrent >= api_slots && api_slots > 1 {
        return Err(invalid(
            "proxy.max_concurrent",
            "must be below server.max_concurrent_requests: a proxied call holds one of those until its upstream answers, and reads need the rest",
        ));
    }
    if !(1..=c.max_concurrent).contains(&c.max_concurrent_per_credential) {
        return Err(invalid(
            "proxy.max_concurrent_per_credential",
            "must be between 1 and proxy.max_concurrent",
        ));
    }
    if !(1..=c.max_concurrent).contains(&c.max_concurrent_per_caller) {
        return Err(invalid(
            "proxy.max_concurrent_per_caller",
            "must be between 1 and proxy.max_concurrent",
        ));
    }
    if c.max_body_bytes == 0 {
        return Err(invalid("proxy.max_body_bytes", "must be greater than zero"));
    }
    if c.replay_buffer_bytes > MAX_REPLAY_BUFFER {
        return Err(invalid(
            "proxy.replay_buffer_bytes",
            format!("must be at most {MAX_REPLAY_BUFFER} (8 MiB)"),
        ));
    }
    let connect_timeout = raw.connect_timeout.unwrap_or(DEFAULT_PROXY_CONNECT_TIMEOUT);
    let timeout = raw.timeout.unwrap_or(DEFAULT_PROXY_TIMEOUT);
    check_timeouts("proxy", connect_timeout, timeout)?;
    let mut upstreams: Vec<Upstream> = Vec::with_capacity(raw.upstreams.len());
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        let key = format!("proxy.upstreams[{i}]");
        let upstream = validate_upstream(key, u, connect_timeout, timeout)?;
        if let Some(other) = upstreams
            .iter()
            .find(|o| o.integration_type == upstream.integration_type)
        {
            return Err(invalid(
                format!("{}.integration_type", upstream.key),
                format!("already has an upstream ({})", other.key),
            ));
        }
        upstreams.push(upstream);
    }
    Ok(ProxyConfig { upstreams, ..c })
}

fn check_timeouts(key: &str, connect: Duration, overall: Duration) -> Result<(), ConfigError> {
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&connect) {
        return Err(invalid(
            format!("{key}.connect_timeout"),
            "must be between 100ms and 60s",
        ));
    }
    if !(Duration::from_millis(100)..=Duration::from_secs(24 * 3600)).contains(&overall) {
        return Err(invalid(
            format!("{key}.timeout"),
            "must be between 100ms and 24h",
        ));
    }
    Ok(())
}

fn validate_upstream(
    key: String,
    raw: RawUpstream,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<Upstream, ConfigError> {
    let k = |field: &str| format!("{key}.{field}");
    if raw.integration_type.is_empty() || raw.integration_type.len() > 128 {
        return Err(invalid(
            k("integration_type"),
            "must be 1 to 128 characters",
        ));
    }
    let (base_url, host_labels) = base_url(&k("base_url"), &raw.base_url)?;
    let named = |value: Option<String>, name: &str, default: Option<&str>| match value
        .or_else(|| default.map(str::to_owned))
    {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(invalid(
            k(name),
            format!("is required for auth = {:?}", raw.auth),
        )),
    };
    // Options of another kind are refused rather than ignored: a `header` on a bearer upstream
    // is a mistake its author wants to hear about.
    let allowed: &[&str] = match raw.auth.as_str() {
        "bearer" => &["field"],
        "basic" => &["username_field", "password_field"],
        "header" => &["field", "header", "prefix"],
        "query" => &["field", "parameter"],
        _ => {
            return Err(invalid(
                k("auth"),
                "must be \"bearer\", \"basic\", \"header\" or \"query\"",
            ))
        }
    };
    for (name, given) in [
        ("field", raw.field.is_some()),
        ("username_field", raw.username_field.is_some()),
        ("password_field", raw.password_field.is_some()),
        ("header", raw.header.is_some()),
        ("prefix", raw.prefix.is_some()),
        ("parameter", raw.parameter.is_some()),
    ] {
        if given && !allowed.contains(&name) {
            return Err(invalid(
                k(name),
                format!("does not apply to auth = {:?}", raw.auth),
            ));
        }
    }
    let auth = match raw.auth.as_str() {
        "bearer" => ProxyAuth::Bearer {
            field: named(raw.field, "field", Some("access_token"))?,
        },
        "basic" => ProxyAuth::Basic {
            username: named(raw.username_field, "username_field", Some("username"))?,
            password: named(raw.password_field, "password_field", Some("password"))?,
        },
        "header" => {
            let header = named(raw.header, "header", None)?;
            let name = http::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| invalid(k("header"), "is not a valid header name"))?;
            if is_reserved_header(&name) {
                return Err(invalid(
                    k("header"),
                    "names a header credproxy manages itself (hop-by-hop, Host, Content-Length, Cookie or Proxy-*)",
                ));
            }
            let prefix = raw.prefix.unwrap_or_default();
            if http::HeaderValue::from_str(&prefix).is_err() {
                return Err(invalid(k("prefix"), "is not valid in a header value"));
            }
            ProxyAuth::Header {
                header: name.as_str().to_owned(),
                prefix,
                field: named(raw.field, "field", None)?,
            }
        }
        _ => {
            let parameter = named(raw.parameter, "parameter", None)?;
            if parameter.len() > 128 {
                return Err(invalid(k("parameter"), "must be at most 128 characters"));
            }
            ProxyAuth::Query {
                parameter,
                field: named(raw.field, "field", None)?,
            }
        }
    };
    let connect_timeout = raw.connect_timeout.unwrap_or(connect_timeout);
    let timeout = raw.timeout.unwrap_or(timeout);
    check_timeouts(&key, connect_timeout, timeout)?;
    if let Some(path) = &raw.ca_file {
        // Read now, so a missing or broken file fails the start or the reload, not a call.
        read_ca(path).map_err(|e| invalid(k("ca_file"), e))?;
    }
    Ok(Upstream {
        key,
        integration_type: raw.integration_type,
        base_url,
        host_labels,
        auth,
        ca_file: raw.ca_file,
        connect_timeout,
        timeout,
    })
}

/// The certificates of an upstream's `ca_file`.
pub fn read_ca(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|_| "is not PEM certificates".to_owned())?;
    if certs.is_empty() {
        return Err("holds no certificate".into());
    }
    Ok(certs)
}

/// Headers a worker may not set and an upstream's `header` kind may not name: hop-by-hop
/// headers, and those that decide where and how the call goes.
pub fn is_reserved_header(name: &http::HeaderName) -> bool {
    const RESERVED: [&str; 13] = [
        "host",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "cookie",
        "forwarded",
        "x-forwarded-for",
        "via",
    ];
    let n = name.as_str();
    RESERVED.contains(&n) || n.starts_with("proxy-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ProxyConfig, String> {
        let raw: RawProxy = toml::from_str(text).map_err(|e| e.to_string())?;
        validate(raw, 1024).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_the_four_kinds() {
        let c = parse(
            r#"
            [[upstreams]]
            integration_type = "hubspot"
            base_url = "https://api.hubapi.com/"
            auth = "bearer"
            [[upstreams]]
            integration_type = "jira"
            base_url = "https://example.atlassian.net/rest/api/3"
            auth = "basic"
            username_field = "email"
            password_field = "api_token"
            [[upstreams]]
            integration_type = "notion"
            base_url = "http://127.0.0.1:8080"
            auth = "header"
            header = "X-Api-Key"
            prefix = "Token "
            field = "api_key"
            timeout = "5m"
            [[upstreams]]
            integration_type = "maps"
            base_url = "http://localhost"
            auth = "query"
            parameter = "key"
            field = "api_key"
            "#,
        )
        .unwrap();
        assert_eq!(c.max_concurrent, DEFAULT_PROXY_MAX_CONCURRENT);
        let hubspot = c.upstream("hubspot").unwrap();
        assert_eq!(hubspot.base_url.as_str(), "https://api.hubapi.com/");
        assert_eq!(
            hubspot.auth,
            ProxyAuth::Bearer {
                field: "access_token".into()
            }
        );
        assert_eq!(hubspot.timeout, DEFAULT_PROXY_TIMEOUT);
        let jira = c.upstream("jira").unwrap();
        assert_eq!(jira.base_url.path(), "/rest/api/3");
        assert_eq!(jira.auth.fields(), vec!["email", "api_token"]);
        let notion = c.upstream("notion").unwrap();
        assert_eq!(notion.timeout, Duration::from_secs(300));
        assert!(matches!(&notion.auth, ProxyAuth::Header { header, .. } if header == "x-api-key"));
        assert!(c.upstream("slack").is_none());
        // A small API gets a proxy share that leaves it room.
        let small = validate(RawProxy::default(), 10).unwrap();
        assert_eq!(
            (
                small.max_concurrent,
                small.max_concurrent_per_credential,
                small.max_concurrent_per_caller
            ),
            (5, 5, 5)
        );
    }

    #[test]
    fn host_labels_come_from_metadata_under_the_operators_domain() {
        let c = parse(
            r#"
            [[upstreams]]
            integration_type = "zendesk"
            base_url = "https://{subdomain}.zendesk.com/api/v2"
            auth = "bearer"
            [[upstreams]]
            integration_type = "local"
            base_url = "http://{site}.localhost:8080"
            auth = "bearer"
            "#,
        )
        .unwrap();
        let z = c.upstream("zendesk").unwrap();
        assert_eq!(z.host_labels, ["subdomain"]);
        let meta = |v: &'static str| move |k: &str| (k == "subdomain").then(|| v.to_owned());
        assert_eq!(
            z.base_for(meta("Acme-1")).unwrap().as_str(),
            "https://acme-1.zendesk.com/api/v2"
        );
        for bad in [
            "",
            "-a",
            "a.evil.com",
            "a/b",
            "a@b",
            "é",
            "a b",
            &"a".repeat(64),
        ] {
            let bad = bad.to_owned();
            assert_eq!(
                z.base_for(move |_| Some(bad.clone())).unwrap_err(),
                "subdomain"
            );
        }
        assert_eq!(z.base_for(|_| None).unwrap_err(), "subdomain");
        let local = c.upstream("local").unwrap();
        let site = |_: &str| Some("t1".to_owned());
        assert_eq!(
            local.base_for(site).unwrap().as_str(),
            "http://t1.localhost:8080/"
        );
        for refused in [
            "https://{host}/x",
            "https://{a}.com",
            "https://api.{site}.example.com",
            "https://x{site}.example.com",
            "https://{Site}.example.com",
            "https://{site}.{site}.example.com",
            "https://example.com/{path}",
            "https://{site}.example.com:{port}",
            "https://{site}@example.com",
            "http://{site}.example.com",
        ] {
            let text = format!(
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"{refused}\"\nauth = \"bearer\""
            );
            let e = parse(&text).unwrap_err();
            assert!(e.contains("proxy.upstreams[0].base_url"), "{refused}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key_and_never_the_url() {
        let cases = [
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"http://api.example.com\"\nauth = \"bearer\"",
                "proxy.upstreams[0].base_url",
            ),
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://u:hunter2@api.example.com\"\nauth = \"bearer\"",
                "proxy.upstreams[0].base_url",
            ),
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://api.example.com/?k=hunter2\"\nauth = \"bearer\"",
                "proxy.upstreams[0].base_url",
            ),
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://x\"\nauth = \"digest\"",
                "proxy.upstreams[0].auth",
            ),
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://x\"\nauth = \"header\"\nfield = \"k\"",
                "proxy.upstreams[0].header",
            ),
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://x\"\nauth = \"header\"\nheader = \"Host\"\nfield = \"k\"",
                "proxy.upstreams[0].header",
            ),
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://x\"\nauth = \"bearer\"\nparameter = \"k\"",
                "proxy.upstreams[0].parameter",
            ),
            (
                "[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://x\"\nauth = \"bearer\"\n[[upstreams]]\nintegration_type = \"a\"\nbase_url = \"https://y\"\nauth = \"bearer\"",
                "proxy.upstreams[1].integration_type",
            ),
            ("max_body_bytes = 0", "proxy.max_body_bytes"),
            ("max_concurrent = 1024", "proxy.max_concurrent"),
            ("timeout = \"1ms\"", "proxy.timeout"),
            (
                "max_concurrent = 4\nmax_concurrent_per_credential = 5",
                "proxy.max_concurrent_per_credential",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
