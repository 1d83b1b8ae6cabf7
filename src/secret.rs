//! Secret values as types: they zeroize on drop, print `[REDACTED]`, and have no `Serialize`.
//!
//! The only ways to see the bytes are [`SecretString::expose`] and the explicit serialisation
//! helpers below, each used in one place that says why.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::Deserialize;
use zeroize::{Zeroize, Zeroizing};

const REDACTED: &str = "[REDACTED]";

/// One sensitive string: a token, a client secret, a key.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The bytes themselves. Callers must not log or format what they get.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether this is a placeholder a secrets manager handed out instead of the value:
    /// Composio and similar services mask values (`abcd...`, `REDACTED`, `ab****yz`) unless
    /// told not to, and a masked value must never be handed to a worker as if it were real.
    pub fn looks_masked(&self) -> bool {
        let v = self.expose();
        v.ends_with("...")
            || v.eq_ignore_ascii_case("redacted")
            || v.contains("****")
            || (!v.is_empty() && v.chars().all(|c| c == '*'))
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl From<&str> for SecretString {
    fn from(value: &str) -> Self {
        Self::new(value.to_owned())
    }
}

/// The sensitive fields of one credential, by field name. Field names are not secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretFields(BTreeMap<String, SecretString>);

impl SecretFields {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, value: SecretString) {
        self.0.insert(name.into(), value);
    }

    pub fn get(&self, name: &str) -> Option<&SecretString> {
        self.0.get(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<SecretString> {
        self.0.remove(name)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &SecretString)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Bytes of every field name and value: what one credential weighs, whatever its
    /// encoding in a store adds.
    pub fn byte_size(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.expose().len()).sum()
    }

    /// Overlays `other` on `self`: a PATCH changes only the fields it names.
    pub fn merge(&mut self, other: SecretFields) {
        self.0.extend(other.0);
    }

    /// The JSON object a store keeps (AWS SecretString, Vault data, the local store's plaintext).
    /// Exposed on purpose: this is what gets sealed or sent to the manager.
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(64 * self.0.len() + 2));
        let mut ser = serde_json::Serializer::new(&mut *out);
        // Writing into a Vec cannot fail, and the map has string keys only.
        let _ = self.serialize_exposed(&mut ser, None);
        out
    }

    /// Parses what [`SecretFields::to_json`] wrote. Errors never quote the input.
    pub fn from_json(bytes: &[u8]) -> Result<Self, SecretFormatError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let fields = SecretFields::deserialize(&mut de).map_err(|_| SecretFormatError)?;
        de.end().map_err(|_| SecretFormatError)?;
        Ok(fields)
    }

    /// Serialises the values themselves, optionally only the fields named in `only` (the
    /// `?fields=` filter). Used by the response path and [`Self::to_json`] only.
    pub fn serialize_exposed<S: Serializer>(
        &self,
        serializer: S,
        only: Option<&[String]>,
    ) -> Result<S::Ok, S::Error> {
        let wanted = |k: &String| only.is_none_or(|names| names.iter().any(|n| n == k));
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in self.0.iter().filter(|(k, _)| wanted(k)) {
            map.serialize_entry(k, v.expose())?;
        }
        map.end()
    }

    /// The names `serialize_exposed` with the same `only` would write (for the audit line).
    pub fn selected_names(&self, only: Option<&[String]>) -> Vec<String> {
        self.0
            .keys()
            .filter(|k| only.is_none_or(|names| names.iter().any(|n| n == *k)))
            .cloned()
            .collect()
    }
}

/// A stored secret payload that is not a JSON object of strings.
#[derive(Debug, thiserror::Error)]
#[error("stored secret is not a JSON object of string fields")]
pub struct SecretFormatError;

impl fmt::Debug for SecretFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, REDACTED)))
            .finish()
    }
}

/// The message every rejection of a `secrets` value carries: serde's own messages quote the
/// offending value, which here would be a secret.
const SECRETS_SHAPE: &str = "`secrets` must be an object whose values are strings";

/// The longest secret field name a caller may send.
pub const MAX_FIELD_NAME_BYTES: usize = 128;

/// Deserialises `secrets` from a request body, where (unlike a value read back from a store)
/// a field name must be 1 to `MAX_FIELD_NAME_BYTES` bytes of printable text and appear once.
pub fn strict_fields<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretFields>, D::Error> {
    d.deserialize_any(FieldsVisitor { strict: true }).map(Some)
}

struct FieldsVisitor {
    strict: bool,
}

macro_rules! reject_scalar {
    ($($name:ident: $ty:ty),*) => {
        $(fn $name<E: de::Error>(self, _v: $ty) -> Result<Self::Value, E> {
            Err(E::custom(SECRETS_SHAPE))
        })*
    };
}

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = SecretFields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SECRETS_SHAPE)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut fields = BTreeMap::new();
        while let Some(key) = access.next_key::<String>()? {
            if self.strict {
                check_field_name(&key).map_err(de::Error::custom)?;
                if fields.contains_key(&key) {
                    return Err(de::Error::custom(format_args!(
                        "`secrets` names the field `{key}` more than once"
                    )));
                }
            }
            let value = access.next_value::<SecretValueSeed>()?;
            fields.insert(key, value.0);
        }
        Ok(SecretFields(fields))
    }

    reject_scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64,
        visit_str: &str, visit_bytes: &[u8]);

    fn visit_string<E: de::Error>(self, mut v: String) -> Result<Self::Value, E> {
        v.zeroize();
        Err(E::custom(SECRETS_SHAPE))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(SECRETS_SHAPE))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(SECRETS_SHAPE))
    }
}

impl<'de> Deserialize<'de> for SecretFields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldsVisitor { strict: false })
    }
}

/// Why a field name is refused, without quoting it (it is malformed, so it may be anything).
fn check_field_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        Err("a field name in `secrets` is empty")
    } else if name.len() > MAX_FIELD_NAME_BYTES {
        Err("a field name in `secrets` is longer than 128 bytes")
    } else if name.chars().any(char::is_control) {
        Err("a field name in `secrets` contains a control character")
    } else {
        Ok(())
    }
}

struct SecretValueSeed(SecretString);

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = SecretValueSeed;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SECRETS_SHAPE)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(SecretValueSeed(SecretString::new(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(SecretValueSeed(SecretString::new(v)))
    }

    reject_scalar!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64,
        visit_bytes: &[u8]);

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(SECRETS_SHAPE))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _seq: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(SECRETS_SHAPE))
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(SECRETS_SHAPE))
    }
}

impl<'de> Deserialize<'de> for SecretValueSeed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

/// A deserialiser's error message with every value it quotes taken out, for error details and
/// logs. serde's messages quote what they were given (`invalid type: string "…"`, ``unknown
/// variant `…` ``), and what they were given may be a secret pasted into the wrong field. Kinds,
/// expectations and our own key names stay: `invalid type: string, expected u64`.
pub fn without_values(message: &str) -> String {
    // serde_json appends the position; callers give positions in their own words.
    let message = match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => &message[..i],
        _ => message,
    };
    // The last one: a quoted value may itself contain the words.
    let (head, expected) = match message.rsplit_once(", expected ") {
        Some((head, expected)) => (head, Some(expected)),
        None => (message, None),
    };
    let head = if let Some(unexpected) = head
        .strip_prefix("invalid type: ")
        .map(|u| ("invalid type: ", u))
        .or_else(|| {
            head.strip_prefix("invalid value: ")
                .map(|u| ("invalid value: ", u))
        }) {
        // `string "abc"` → `string`; the kinds serde names never contain a quote.
        let kind = unexpected
            .1
            .split([' '])
            .take_while(|w| !w.starts_with(['"', '`']))
            .collect::<Vec<_>>()
            .join(" ");
        format!("{}{kind}", unexpected.0)
    } else if head.starts_with("unknown variant ") {
        "unknown variant".to_owned()
    } else {
        unquote(head)
    };
    match expected {
        Some(e) => format!("{head}, expected {}", unquote(e)),
        None => head,
    }
}

/// Drops every `"…"` segment, and every `` `…` `` one that is not a short identifier (a key or
/// variant name of ours) or one or two punctuation characters (a token a parser expected).
fn unquote(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[start] as char;
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(len) = after.find(quote) else {
            // An unterminated quote: everything after it may be the value.
            out.push_str("(value withheld)");
            return out;
        };
        let inner = &after[..len];
        // Kept: names (`environment`) and the parser's expected tokens (`=`, `#`).
        let identifier = quote == '`'
            && !inner.is_empty()
            && ((inner.len() <= 64
                && inner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
                || (inner.len() <= 2 && inner.chars().all(|c| c.is_ascii_punctuation())));
        if identifier {
            out.push('`');
            out.push_str(inner);
            out.push('`');
        } else {
            out.push_str("(value withheld)");
        }
        rest = &after[len + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = SecretString::from("hunter2-canary");
        assert_eq!(format!("{s:?}"), "[REDACTED]");
        assert_eq!(format!("{s}"), "[REDACTED]");
        let mut f = SecretFields::new();
        f.insert("api_key", s);
        let shown = format!("{f:?}");
        assert!(
            shown.contains("api_key") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let f = SecretFields::from_json(br#"{"a":"1","b":"two"}"#).unwrap();
        assert_eq!(f.get("b").unwrap().expose(), "two");
        let back = SecretFields::from_json(&f.to_json()).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn rejections_never_quote_the_offending_value() {
        for body in [
            r#""canary-in-a-string""#,
            r#"{"a": ["canary-in-a-list"]}"#,
            r#"{"a": {"b": "canary-nested"}}"#,
            r#"["canary-top-list"]"#,
        ] {
            let err = serde_json::from_str::<SecretFields>(body)
                .unwrap_err()
                .to_string();
            assert!(!err.contains("canary"), "{err}");
            assert!(err.contains("must be an object"), "{err}");
        }
        let err = serde_json::from_str::<SecretFields>(r#"{"a": 12345}"#)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("12345"), "{err}");
    }

    #[test]
    fn masked_values_are_recognised() {
        assert!(SecretString::from("REDACTED").looks_masked());
        assert!(SecretString::from("abcd...").looks_masked());
        assert!(SecretString::from("redacted").looks_masked());
        assert!(SecretString::from("ab****yz").looks_masked());
        assert!(SecretString::from("***").looks_masked());
        assert!(!SecretString::from("gho_realtoken").looks_masked());
    }

    #[test]
    fn deserialiser_messages_lose_their_values_and_keep_their_shape() {
        for (message, shown) in [
            (
                "invalid type: string \"sk_live_canary\", expected u64 at line 1 column 20",
                "invalid type: string, expected u64",
            ),
            (
                "invalid value: integer `-5`, expected a positive number",
                "invalid value: integer, expected a positive number",
            ),
            (
                "unknown variant `sk_live_canary`, expected `basic` or `body`",
                "unknown variant, expected `basic` or `body`",
            ),
            (
                "unknown field `colour`, expected one of `environment`, `secrets`",
                "unknown field `colour`, expected one of `environment`, `secrets`",
            ),
            (
                "unknown field `sk live canary`, expected `a`",
                "unknown field (value withheld), expected `a`",
            ),
            ("missing field `environment`", "missing field `environment`"),
            (
                "invalid length 3, expected 2 elements",
                "invalid length 3, expected 2 elements",
            ),
            (
                "unknown time unit \"sk_live_canary\", supported units: ns",
                "unknown time unit (value withheld), supported units: ns",
            ),
            ("bad \"sk_live_canary", "bad (value withheld)"),
            (
                "unknown variant `x, expected canary`, expected `basic` or `body`",
                "unknown variant, expected `basic` or `body`",
            ),
            (
                "invalid type: string \"a, expected canary\", expected a sequence",
                "invalid type: string, expected a sequence",
            ),
        ] {
            let got = without_values(message);
            assert_eq!(got, shown, "{message}");
            assert!(!got.contains("canary"), "{got}");
        }
    }
}
