//! The credential as a caller reads it, and the one place secret values are serialised for a
//! caller: rendered once, when an entry enters the cache, into one buffer that is wiped when
//! the entry goes. A full read answers with those bytes as they are; `?fields=` and a pin that
//! became unavailable are assembled from recorded spans, never by parsing the body again.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use zeroize::Zeroizing;

use super::Entry;
use crate::metadata::CredentialRecord;
use crate::secret::SecretFields;

/// A credential's response body (the full read, `pin_unavailable` false) and where each secret
/// field sits in it, in one allocation (a cache holds many of these; the spans are a few bytes
/// each, and a second allocation per entry costs more than they do):
///
/// ```text
/// body | per field: start, colon, end | secrets start, secrets end | body length
/// ```
///
/// every number a little-endian `u32`. Never printed, never serialised: `Debug` says
/// `[REDACTED]`.
pub(super) struct Rendered(Zeroizing<Box<[u8]>>);

/// Offsets into a body. Bodies stay far below 4 GiB: request bodies and every secrets manager's
/// values are limited to kilobytes or a few megabytes.
#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

/// One secret field, `"name":"value"`.
#[derive(Clone, Copy)]
struct FieldSpan {
    /// The opening quote of the name.
    start: u32,
    /// The colon after the name.
    colon: u32,
    /// Just after the closing quote of the value.
    end: u32,
}

/// The `secrets` span and the body length at the end of the buffer.
const TRAILER: usize = 12;
const FIELD: usize = 12;

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

fn offset(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn push_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_le_bytes());
}

impl Rendered {
    /// Renders exactly what the full read of `record` answers, key for key in this order.
    pub(super) fn new(record: &CredentialRecord, secrets: &SecretFields) -> Self {
        #[derive(Serialize)]
        struct Reference<'a> {
            name: &'a str,
            version: Option<&'a str>,
        }
        let mut buffer = Zeroizing::new(Vec::with_capacity(
            320 + record.id.len()
                + record.location.name.len()
                + secrets.byte_size()
                + (FIELD + 8) * secrets.len(),
        ));
        let out: &mut Vec<u8> = &mut buffer;
        put(out, b"{\"id\":", &record.id);
        put(out, b",\"workspace\":", &record.workspace);
        put(out, b",\"environment\":", &record.environment);
        put(out, b",\"integration_type\":", &record.integration_type);
        put(
            out,
            b",\"secrets_manager_id\":",
            &record.location.manager_id,
        );
        put(
            out,
            b",\"pinned_secrets_manager_id\":",
            &record.pinned_manager,
        );
        out.extend_from_slice(PIN_AVAILABLE);
        put(out, b",\"metadata\":", &record.metadata);
        // Room for everything from here on, reserved while the buffer holds no secret: a Vec
        // that grows copies its bytes and frees the old block without wiping it. JSON escaping
        // makes a string at most six times longer.
        out.reserve(
            6 * (secrets.byte_size()
                + record.location.name.len()
                + record.location.version.as_deref().map_or(0, str::len))
                + (16 + FIELD) * secrets.len()
                + 160,
        );
        out.extend_from_slice(b",\"secrets\":");
        let secrets_start = out.len();
        out.push(b'{');
        let mut fields = Vec::with_capacity(secrets.len());
        for (i, (name, value)) in secrets.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let start = out.len();
            write(out, name);
            let colon = out.len();
            out.push(b':');
            // Exposed on purpose: this is the body of an authorised read.
            write(out, value.expose());
            fields.push(FieldSpan {
                start: offset(start),
                colon: offset(colon),
                end: offset(out.len()),
            });
        }
        out.push(b'}');
        let secrets_end = out.len();
        let expires_at = record.expires_at_ms.map(crate::time::rfc3339_ms);
        put(out, b",\"expires_at\":", &expires_at);
        put(out, b",\"needs_reauth\":", &record.needs_reauth);
        let reference = Reference {
            name: &record.location.name,
            version: record.location.version.as_deref(),
        };
        put(out, b",\"reference\":", &reference);
        out.push(b'}');
        let json_len = out.len();
        for field in &fields {
            push_u32(out, field.start);
            push_u32(out, field.colon);
            push_u32(out, field.end);
        }
        push_u32(out, offset(secrets_start));
        push_u32(out, offset(secrets_end));
        push_u32(out, offset(json_len));
        // A copy of exactly the right size; `buffer` (with its spare capacity) is wiped when
        // it goes out of scope.
        Self(Zeroizing::new(Box::from(&out[..])))
    }

    fn u32_at(&self, at: usize) -> u32 {
        let bytes = self.0.get(at..at + 4).and_then(|b| b.try_into().ok());
        u32::from_le_bytes(bytes.unwrap_or([0; 4]))
    }

    /// The body a full read answers with.
    fn json(&self) -> &[u8] {
        &self.0[..self.u32_at(self.0.len() - 4) as usize]
    }

    /// The `secrets` object, from its `{` to just after its `}`.
    fn secrets(&self) -> Span {
        let at = self.0.len() - TRAILER;
        Span {
            start: self.u32_at(at),
            end: self.u32_at(at + 4),
        }
    }

    /// Every field, in the order the body lists them.
    fn fields(&self) -> impl Iterator<Item = FieldSpan> + '_ {
        (self.json().len()..self.0.len() - TRAILER)
            .step_by(FIELD)
            .map(|at| FieldSpan {
                start: self.u32_at(at),
                colon: self.u32_at(at + 4),
                end: self.u32_at(at + 8),
            })
    }

    fn bytes(&self, span: Span) -> &[u8] {
        &self.json()[span.start as usize..span.end as usize]
    }

    fn field(&self, field: FieldSpan) -> &[u8] {
        self.bytes(Span {
            start: field.start,
            end: field.end,
        })
    }

    /// A field's name as the caller named it: the JSON string between `start` and `colon`,
    /// unescaped only when it holds an escape (a name with a quote, a backslash or a control
    /// character, which no real credential has).
    fn name(&self, field: FieldSpan) -> std::borrow::Cow<'_, str> {
        let quoted = self.bytes(Span {
            start: field.start,
            end: field.colon,
        });
        let inner = &quoted[1..quoted.len() - 1];
        if !inner.contains(&b'\\') {
            if let Ok(name) = std::str::from_utf8(inner) {
                return name.into();
            }
        }
        serde_json::from_slice::<String>(quoted)
            .unwrap_or_default()
            .into()
    }

    /// The fields `only` selects (all when `None`), in the body's order.
    fn selected<'a>(&'a self, only: Option<&'a [String]>) -> impl Iterator<Item = FieldSpan> + 'a {
        self.fields().filter(move |f| {
            only.is_none_or(|names| {
                let name = self.name(*f);
                names.iter().any(|n| *n == name)
            })
        })
    }
}

const PIN_AVAILABLE: &[u8] = b",\"pin_unavailable\":false";
const PIN_UNAVAILABLE: &[u8] = b",\"pin_unavailable\":true";

/// The body of a read of `entry`: the cached bytes themselves for a full read (no copy; the
/// buffer is wiped when the entry and the last response holding it are gone), otherwise
/// assembled into a buffer that is wiped when the response is dropped.
pub fn body(entry: &Arc<Entry>, only: Option<&[String]>, pin_unavailable: bool) -> Bytes {
    if only.is_none() && !pin_unavailable {
        return Bytes::from_owner(FullBody(Arc::clone(entry)));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(max_body_len(entry)));
    write_body(entry, only, pin_unavailable, &mut out);
    Bytes::from_owner(out)
}

struct FullBody(Arc<Entry>);

impl AsRef<[u8]> for FullBody {
    fn as_ref(&self) -> &[u8] {
        self.0.body.json()
    }
}

/// The most bytes [`write_body`] appends for `entry`: a selection of fields or
/// `pin_unavailable` only ever makes the full body shorter.
pub fn max_body_len(entry: &Entry) -> usize {
    entry.body.json().len()
}

/// Appends the body of a read of `entry` to `out`, which the caller wipes (it holds secrets).
/// The caller reserves [`max_body_len`] first: growing the Vec here would leave a copy behind.
pub fn write_body(
    entry: &Entry,
    only: Option<&[String]>,
    pin_unavailable: bool,
    out: &mut Vec<u8>,
) {
    let rendered = &entry.body;
    let json = rendered.json();
    let secrets = rendered.secrets();
    let (secrets_start, secrets_end) = (secrets.start as usize, secrets.end as usize);
    let head = &json[..secrets_start];
    let pin_at = pin_unavailable
        .then(|| {
            head.windows(PIN_AVAILABLE.len())
                .position(|w| w == PIN_AVAILABLE)
        })
        .flatten();
    match pin_at {
        // The first match is the key itself: in the strings before it every quote is escaped.
        Some(at) => {
            out.extend_from_slice(&head[..at]);
            out.extend_from_slice(PIN_UNAVAILABLE);
            out.extend_from_slice(&head[at + PIN_AVAILABLE.len()..]);
        }
        None => out.extend_from_slice(head),
    }
    if only.is_none() {
        out.extend_from_slice(&json[secrets_start..secrets_end]);
    } else {
        out.push(b'{');
        for (i, field) in rendered.selected(only).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(rendered.field(field));
        }
        out.push(b'}');
    }
    out.extend_from_slice(&json[secrets_end..]);
}

/// The names of the fields a read with `only` hands out, in the body's order (for the audit
/// line).
pub fn field_names(entry: &Entry, only: Option<&[String]>) -> Vec<String> {
    entry
        .body
        .selected(only)
        .map(|f| entry.body.name(f).into_owned())
        .collect()
}

/// The string value of the metadata key `key`, for the egress proxy's host labels; `None` when
/// the credential's metadata has no such key or its value is not a string.
pub fn metadata_string(entry: &Entry, key: &str) -> Option<String> {
    const METADATA: &[u8] = b",\"metadata\":";
    let json = entry.body.json();
    let head = &json[..entry.body.secrets().start as usize];
    // The first match is the key itself: in the strings before it every quote is escaped.
    let at = head.windows(METADATA.len()).position(|w| w == METADATA)? + METADATA.len();
    // Only the metadata object is parsed: the bytes after it hold the secrets.
    let mut values =
        serde_json::Deserializer::from_slice(&head[at..]).into_iter::<serde_json::Value>();
    match values.next()?.ok()? {
        serde_json::Value::Object(mut map) => match map.remove(key)? {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// The value of the secret field `name`, for the egress proxy to apply to a call; `None` when
/// the credential has no such field or it is not a string.
pub fn secret(entry: &Entry, name: &str) -> Option<Zeroizing<String>> {
    let rendered = &entry.body;
    let field = rendered.fields().find(|f| rendered.name(*f) == name)?;
    let quoted = rendered.bytes(Span {
        start: field.colon + 1,
        end: field.end,
    });
    let inner = quoted.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if !inner.contains(&b'\\') {
        return std::str::from_utf8(inner)
            .ok()
            .map(|v| Zeroizing::new(v.to_owned()));
    }
    // An escaped value (a quote, a backslash or a control character in it) is rare; serde_json
    // unescapes it into the String that is then wiped.
    serde_json::from_slice::<String>(quoted)
        .ok()
        .map(Zeroizing::new)
}

/// `key` (with its comma and colon), then serde_json's compact output for `value`.
fn put<T: Serialize + ?Sized>(out: &mut Vec<u8>, key: &[u8], value: &T) {
    out.extend_from_slice(key);
    write(out, value);
}

fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing into a Vec cannot fail, and every value here is a string, a bool, an integer,
    // or a JSON object with string keys.
    let _ = serde_json::to_writer(out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Location, OAuthDescription};
    use crate::secret::SecretString;

    fn record() -> CredentialRecord {
        let mut metadata = serde_json::Map::new();
        metadata.insert("account".into(), "acme-1234".into());
        metadata.insert("n".into(), serde_json::json!({"b": [1, 2.5, null]}));
        CredentialRecord {
            id: "c-1".into(),
            workspace: "team-a".into(),
            environment: "Pro\"duction".into(),
            integration_type: "github".into(),
            metadata,
            oauth: Some(OAuthDescription {
                token_url: "https://t".into(),
                client_id: "c".into(),
                scopes: vec![],
                client_auth: Default::default(),
                grant: Default::default(),
                audience: None,
                resource: None,
            }),
            pinned_manager: Some("vault\\1".into()),
            location: Location {
                manager_id: "local".into(),
                name: "Production/c-1".into(),
                version: Some("3".into()),
            },
            expires_at_ms: Some(4_102_444_800_250),
            token_at_ms: None,
            needs_reauth: true,
            row_version: 7,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn secrets() -> SecretFields {
        let mut s = SecretFields::new();
        s.insert("access_token", SecretString::from("at-\"1\"\u{1}é"));
        s.insert("na\"me", SecretString::from("v"));
        s.insert("refresh_token", SecretString::from("rt-1"));
        s
    }

    /// What the response path serialised before bodies were rendered into the cache: the
    /// rendering must produce the same bytes.
    fn serde_rendering(
        record: &CredentialRecord,
        secrets: &SecretFields,
        only: Option<&[String]>,
        pin_unavailable: bool,
    ) -> Vec<u8> {
        struct Exposed<'a>(&'a SecretFields, Option<&'a [String]>);
        impl Serialize for Exposed<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize_exposed(s, self.1)
            }
        }
        #[derive(Serialize)]
        struct Reference<'a> {
            name: &'a str,
            version: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct View<'a> {
            id: &'a str,
            workspace: &'a str,
            environment: &'a str,
            integration_type: &'a str,
            secrets_manager_id: &'a str,
            pinned_secrets_manager_id: Option<&'a str>,
            pin_unavailable: bool,
            metadata: &'a serde_json::Map<String, serde_json::Value>,
            secrets: Exposed<'a>,
            #[serde(serialize_with = "crate::time::serialize_opt_unix_ms_rfc3339")]
            expires_at: Option<i64>,
            needs_reauth: bool,
            reference: Reference<'a>,
        }
        serde_json::to_vec(&View {
            id: &record.id,
            workspace: &record.workspace,
            environment: &record.environment,
            integration_type: &record.integration_type,
            secrets_manager_id: &record.location.manager_id,
            pinned_secrets_manager_id: record.pinned_manager.as_deref(),
            pin_unavailable,
            metadata: &record.metadata,
            secrets: Exposed(secrets, only),
            expires_at: record.expires_at_ms,
            needs_reauth: record.needs_reauth,
            reference: Reference {
                name: &record.location.name,
                version: record.location.version.as_deref(),
            },
        })
        .unwrap()
    }

    fn entry(record: &CredentialRecord, secrets: &SecretFields) -> Arc<Entry> {
        let places = super::super::entry::Places::default();
        let loaded = super::super::Loaded {
            record: Arc::new(record.clone()),
            secrets: secrets.clone(),
            valid_until: None,
        };
        Arc::new(Entry::new(
            &loaded,
            &places,
            std::time::Duration::from_secs(60),
            std::time::Duration::ZERO,
        ))
    }

    #[test]
    fn a_secret_is_taken_out_by_its_name_escaped_or_not() {
        let e = entry(&record(), &secrets());
        assert_eq!(secret(&e, "refresh_token").unwrap().as_str(), "rt-1");
        assert_eq!(
            secret(&e, "access_token").unwrap().as_str(),
            "at-\"1\"\u{1}é"
        );
        assert_eq!(secret(&e, "na\"me").unwrap().as_str(), "v");
        assert!(secret(&e, "absent").is_none());
        assert!(secret(&e, "access").is_none());
        assert_eq!(metadata_string(&e, "account").as_deref(), Some("acme-1234"));
        assert_eq!(metadata_string(&e, "n"), None, "not a string");
        assert_eq!(metadata_string(&e, "secrets"), None);
        assert_eq!(metadata_string(&e, "absent"), None);
    }

    #[test]
    fn every_read_renders_the_bytes_serde_wrote() {
        let mut plain = record();
        plain.oauth = None;
        plain.pinned_manager = None;
        plain.expires_at_ms = None;
        plain.location.version = None;
        plain.metadata.clear();
        let selections: [Option<Vec<String>>; 5] = [
            None,
            Some(vec![]),
            Some(vec!["refresh_token".into()]),
            Some(vec![
                "na\"me".into(),
                "access_token".into(),
                "absent".into(),
            ]),
            Some(vec!["na".into()]),
        ];
        for record in [record(), plain] {
            for secrets in [secrets(), SecretFields::new()] {
                let entry = entry(&record, &secrets);
                for only in &selections {
                    for pin in [false, true] {
                        let only = only.as_deref();
                        let want = serde_rendering(&record, &secrets, only, pin);
                        assert_eq!(
                            String::from_utf8_lossy(&body(&entry, only, pin)),
                            String::from_utf8_lossy(&want),
                            "only {only:?}, pin_unavailable {pin}"
                        );
                        let names = field_names(&entry, only);
                        assert_eq!(names, secrets.selected_names(only));
                    }
                }
            }
        }
    }

    #[test]
    fn a_full_read_shares_the_cached_buffer() {
        let entry = entry(&record(), &secrets());
        let first = body(&entry, None, false);
        let second = body(&entry, None, false);
        assert_eq!(first.as_ptr(), second.as_ptr());
        assert_eq!(first.as_ptr(), entry.body.json().as_ptr());
    }

    #[test]
    fn debug_never_shows_the_body() {
        let entry = entry(&record(), &secrets());
        let shown = format!("{entry:?}");
        assert!(shown.contains("[REDACTED]"), "{shown}");
        assert!(!shown.contains("rt-1") && !shown.contains("at-"), "{shown}");
    }
}
