//! Re-authorisation events on the wire: the JSON document a webhook receives (and
//! `GET /v1/events` lists), its signature, and the deliverer that takes queued events from the
//! metadata database to their webhooks ([`webhook::Deliverer`]). Recording them, with the
//! change they report, is the service's (`service::events`).

pub mod webhook;

use serde::Serialize;

use crate::metadata::EventRecord;

/// The header carrying the signature: `t=<Unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "credproxy-signature";
/// The header carrying the event id (also in the body), for receivers that deduplicate before
/// parsing.
pub const EVENT_ID_HEADER: &str = "credproxy-event-id";

/// An event as a webhook receives it. Never a secret: ids, scope, type, time and reason.
#[derive(Debug, Serialize)]
pub struct Document<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub credential_id: &'a str,
    pub workspace: &'a str,
    pub environment: &'a str,
    pub integration_type: &'a str,
    /// RFC 3339 with milliseconds.
    pub at: String,
    pub reason: &'a str,
}

impl<'a> Document<'a> {
    pub fn of(e: &'a EventRecord) -> Self {
        Self {
            id: &e.id,
            kind: e.kind.as_str(),
            credential_id: &e.credential_id,
            workspace: &e.workspace,
            environment: &e.environment,
            integration_type: &e.integration_type,
            at: crate::time::rfc3339_ms(e.at_ms),
            reason: &e.reason,
        }
    }
}

/// An event as `GET /v1/events` lists it: the document, its place in the order, and how far
/// its delivery has come.
#[derive(Debug, Serialize)]
pub struct Listed<'a> {
    pub seq: i64,
    #[serde(flatten)]
    pub event: Document<'a>,
    /// `pending`, `delivered`, `failed` or `none` (no webhook takes its workspace).
    pub delivery: &'static str,
}

impl<'a> Listed<'a> {
    pub fn of(e: &'a EventRecord) -> Self {
        Self {
            seq: e.seq,
            event: Document::of(e),
            delivery: e.delivery.as_str(),
        }
    }
}

/// The signature header's value for `body` sent at `timestamp` (Unix seconds): HMAC-SHA256
/// under `key` over `"<timestamp>.<body>"`, so a captured delivery cannot be replayed later
/// with a new timestamp.
pub fn signature(key: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Delivery, EventKind};

    #[test]
    fn the_signature_is_rfc_4231_hmac_sha256_over_timestamp_dot_body() {
        // The streamed MAC must equal one over the joined bytes a receiver computes.
        let s = signature(b"Jefe", 1700000000, b"{\"a\":1}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let tag = ring::hmac::sign(&key, b"1700000000.{\"a\":1}");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("t=1700000000,v1={hex}"));
        assert_ne!(s, signature(b"Jefe", 1700000001, b"{\"a\":1}"));
    }

    #[test]
    fn the_document_has_the_documented_fields_only() {
        let e = EventRecord {
            seq: 7,
            id: "evt_1".into(),
            kind: EventKind::NeedsReauth,
            credential_id: "c1".into(),
            workspace: "acme".into(),
            environment: "Production".into(),
            integration_type: "github".into(),
            reason: "r".into(),
            at_ms: 1_700_000_000_123,
            delivery: Delivery::Pending,
            attempts: 2,
            next_at_ms: 0,
            last_outcome: Some("HTTP 500".into()),
        };
        let doc = serde_json::to_value(Document::of(&e)).unwrap();
        let keys: Vec<_> = doc.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            [
                "at",
                "credential_id",
                "environment",
                "id",
                "integration_type",
                "reason",
                "type",
                "workspace"
            ]
        );
        assert_eq!(doc["at"], "2023-11-14T22:13:20.123Z");
        let listed = serde_json::to_value(Listed::of(&e)).unwrap();
        assert_eq!(listed["seq"], 7);
        assert_eq!(listed["delivery"], "pending");
        assert_eq!(listed["type"], "needs_reauth");
    }
}
