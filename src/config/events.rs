//! `[events]`: re-authorisation events and the webhooks they are delivered to. One webhook per
//! workspace at most: a webhook that names a workspace takes its events, one with `"*"` (or no
//! `workspaces`) the events of every workspace no other webhook names.

use std::time::Duration;

use serde::Deserialize;

use super::{invalid, is_valid_name, ConfigError, SecretRef};

pub const DEFAULT_EVENTS_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_EVENTS_POLL_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_WEBHOOK_GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_WEBHOOK_RETRY_MAX: Duration = Duration::from_secs(300);
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `events.retention`: ten years.
const MAX_RETENTION: Duration = Duration::from_secs(3650 * 24 * 3600);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    #[serde(default, with = "humantime_serde")]
    retention: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    give_up_after: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_max: Option<Duration>,
    #[serde(default)]
    webhooks: Vec<RawWebhook>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    secret: SecretRef,
    workspaces: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

/// `[events]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsConfig {
    /// How long events are kept (for `GET /v1/events`), whatever became of their delivery.
    pub retention: Duration,
    /// How often an instance looks for deliveries nobody is known to be waiting on (its own
    /// new events wake it at once, and a retry due sooner is looked for when it is due).
    pub poll_interval: Duration,
    /// A delivery still failing this long after its event is given up.
    pub give_up_after: Duration,
    /// The longest wait between two attempts at one delivery.
    pub retry_max: Duration,
    pub webhooks: Vec<Webhook>,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            retention: DEFAULT_EVENTS_RETENTION,
            poll_interval: DEFAULT_EVENTS_POLL_INTERVAL,
            give_up_after: DEFAULT_WEBHOOK_GIVE_UP_AFTER,
            retry_max: DEFAULT_WEBHOOK_RETRY_MAX,
            webhooks: Vec::new(),
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct Webhook {
    /// `events.webhooks[i]`, for logs.
    pub key: String,
    pub url: url::Url,
    /// The HMAC key; read again at each delivery, so a rotated file is used at once.
    pub secret: SecretRef,
    /// `None`: every workspace no other webhook names.
    pub workspaces: Option<Vec<String>>,
    pub timeout: Duration,
}

/// Without the URL's query, which may carry a token.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.url.clone();
        if shown.query().is_some() {
            shown.set_query(Some("[REDACTED]"));
        }
        f.debug_struct("Webhook")
            .field("key", &self.key)
            .field("url", &shown.as_str())
            .field("secret", &self.secret)
            .field("workspaces", &self.workspaces)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl EventsConfig {
    /// The webhook that takes `workspace`'s events, if any.
    pub fn webhook_for(&self, workspace: &str) -> Option<&Webhook> {
        self.webhooks
            .iter()
            .find(|w| {
                w.workspaces
                    .as_ref()
                    .is_some_and(|l| l.iter().any(|x| x == workspace))
            })
            .or_else(|| self.webhooks.iter().find(|w| w.workspaces.is_none()))
    }
}

pub(super) fn validate(raw: RawEvents) -> Result<EventsConfig, ConfigError> {
    let d = EventsConfig::default();
    let c = EventsConfig {
        retention: raw.retention.unwrap_or(d.retention),
        poll_interval: raw.poll_interval.unwrap_or(d.poll_interval),
        give_up_after: raw.give_up_after.unwrap_or(d.give_up_after),
        retry_max: raw.retry_max.unwrap_or(d.retry_max),
        webhooks: Vec::new(),
    };
    if !(Duration::from_secs(60)..=MAX_RETENTION).contains(&c.retention) {
        return Err(invalid("events.retention", "must be between 1m and 3650d"));
    }
    if !(Duration::from_millis(100)..=Duration::from_secs(600)).contains(&c.poll_interval) {
        return Err(invalid(
            "events.poll_interval",
            "must be between 100ms and 10m",
        ));
    }
    if c.give_up_after.is_zero() || c.give_up_after > c.retention {
        return Err(invalid(
            "events.give_up_after",
            "must be greater than zero and not above events.retention (an event is removed after that)",
        ));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(24 * 3600)).contains(&c.retry_max) {
        return Err(invalid("events.retry_max", "must be between 1s and 24h"));
    }
    let mut webhooks = Vec::with_capacity(raw.webhooks.len());
    let mut taken: Vec<(String, String)> = Vec::new();
    for (i, w) in raw.webhooks.into_iter().enumerate() {
        let key = format!("events.webhooks[{i}]");
        webhooks.push(validate_webhook(&key, w, &mut taken)?);
    }
    Ok(EventsConfig { webhooks, ..c })
}

/// `taken`: each workspace (or `*`) already given a webhook, and that webhook's key.
fn validate_webhook(
    key: &str,
    w: RawWebhook,
    taken: &mut Vec<(String, String)>,
) -> Result<Webhook, ConfigError> {
    // The URL is not quoted back: it may carry a token in its query.
    let url = url::Url::parse(&w.url)
        .map_err(|e| invalid(format!("{key}.url"), format!("is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid(
            format!("{key}.url"),
            "must be an http:// or https:// URL with a host",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            format!("{key}.url"),
            "must not carry a user or password; deliveries are signed with `secret`",
        ));
    }
    if matches!(w.secret, SecretRef::Sealed) {
        return Err(invalid(
            format!("{key}.secret"),
            "expected { env = \"VAR\" } or { file = \"/path\" }",
        ));
    }
    // Checked now, so a missing variable or file fails the start or the reload, not the first
    // delivery hours later.
    w.secret.resolve(&format!("{key}.secret"))?;
    let timeout = w.timeout.unwrap_or(DEFAULT_WEBHOOK_TIMEOUT);
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timeout) {
        return Err(invalid(
            format!("{key}.timeout"),
            "must be between 100ms and 60s",
        ));
    }
    let workspaces = match w.workspaces {
        None => None,
        Some(list) if list.iter().any(|x| x == "*") => {
            if list.len() > 1 {
                return Err(invalid(
                    format!("{key}.workspaces"),
                    "\"*\" stands for every other workspace and cannot be listed with names",
                ));
            }
            None
        }
        Some(list) if list.is_empty() => {
            return Err(invalid(
                format!("{key}.workspaces"),
                "must name at least one workspace, or be [\"*\"]",
            ))
        }
        Some(list) => {
            for (j, ws) in list.iter().enumerate() {
                if !is_valid_name(ws) {
                    return Err(invalid(
                        format!("{key}.workspaces[{j}]"),
                        "is not a valid workspace name",
                    ));
                }
                if list[..j].contains(ws) {
                    return Err(invalid(format!("{key}.workspaces[{j}]"), "is listed twice"));
                }
            }
            Some(list)
        }
    };
    let names: Vec<String> = workspaces.clone().unwrap_or_else(|| vec!["*".into()]);
    for ws in names {
        if let Some((_, other)) = taken.iter().find(|(t, _)| *t == ws) {
            return Err(invalid(
                format!("{key}.workspaces"),
                format!("workspace {ws:?} already has a webhook ({other}); one per workspace"),
            ));
        }
        taken.push((ws, key.to_owned()));
    }
    Ok(Webhook {
        key: key.to_owned(),
        url,
        secret: w.secret,
        workspaces,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A webhook secret in a file, and the `secret = ...` line naming it.
    fn secret_file() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hook.key");
        std::fs::write(&path, "k").unwrap();
        let line = format!("secret = {{ file = {:?} }}", path.display().to_string());
        (dir, line)
    }

    /// Through the whole file's parser, as the daemon reads it.
    /// `{secret}` in `text` stands for the `secret = ...` line.
    fn parse(text: &str, secret: &str) -> Result<EventsConfig, ConfigError> {
        super::super::Config::parse(&text.replace("{secret}", secret)).map(|c| c.events)
    }

    #[test]
    fn a_workspace_webhook_wins_over_the_catch_all() {
        let (_dir, secret) = secret_file();
        let c = parse(
            r#"
            [[events.webhooks]]
            url = "https://hooks.example/all"
            {secret}
            [[events.webhooks]]
            url = "https://hooks.example/acme"
            {secret}
            workspaces = ["acme"]
            "#,
            &secret,
        )
        .unwrap();
        assert_eq!(c.webhook_for("acme").unwrap().url.path(), "/acme");
        assert_eq!(c.webhook_for("globex").unwrap().url.path(), "/all");
        assert_eq!(
            c.webhook_for("acme").unwrap().timeout,
            DEFAULT_WEBHOOK_TIMEOUT
        );
    }

    #[test]
    fn bad_webhooks_are_refused_by_key_without_their_values() {
        let (_dir, secret) = secret_file();
        let cases = [
            (
                r#"url = "ftp://x/"
                {secret}"#,
                "events.webhooks[0].url",
            ),
            (
                r#"url = "https://user:hunter2@x/"
                {secret}"#,
                "events.webhooks[0].url",
            ),
            (
                r#"url = "https://x/"
                secret = { env = "CREDPROXY_TEST_EVENTS_UNSET" }"#,
                "events.webhooks[0].secret",
            ),
            (
                r#"url = "https://x/"
                {secret}
                workspaces = ["*", "acme"]"#,
                "events.webhooks[0].workspaces",
            ),
            (
                r#"url = "https://x/"
                {secret}
                timeout = "2m""#,
                "events.webhooks[0].timeout",
            ),
        ];
        for (body, key) in cases {
            let e = parse(&format!("[[events.webhooks]]\n{body}"), &secret)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let dbg = format!(
            "{:?}",
            parse(
                "[[events.webhooks]]\nurl = \"https://x/h?token=hunter2\"\n{secret}",
                &secret
            )
            .unwrap()
            .webhooks[0]
        );
        assert!(
            !dbg.contains("hunter2") && dbg.contains("https://x/h"),
            "{dbg}"
        );
        let e = parse(
            "[[events.webhooks]]\nurl = \"https://x/\"\n{secret}\nworkspaces = [\"a\", \"a\"]",
            &secret,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("events.webhooks[0].workspaces[1]") && e.contains("twice"),
            "{e}"
        );
        let e = parse("[events]\nretention = \"100000d\"", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("events.retention"), "{e}");
        let twice = parse(
            r#"
            [[events.webhooks]]
            url = "https://x/"
            {secret}
            workspaces = ["acme"]
            [[events.webhooks]]
            url = "https://y/"
            {secret}
            workspaces = ["globex", "acme"]
            "#,
            &secret,
        )
        .unwrap_err()
        .to_string();
        assert!(
            twice.contains("events.webhooks[1].workspaces") && twice.contains("events.webhooks[0]"),
            "{twice}"
        );
        let inline = parse(
            "[[events.webhooks]]\nurl = \"https://x/\"\nsecret = \"hunter2\"",
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(!inline.contains("hunter2"), "{inline}");
    }
}
