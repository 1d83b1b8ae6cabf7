//! `[credentials]`: what one credential may hold. Bounds on its secret fields (so repeated
//! PATCHes cannot grow one credential without limit) and the metadata keys refused because
//! they name sensitive material, which belongs in `secrets`.

use serde::Deserialize;

use super::{invalid, ConfigError};

/// Secret fields one credential may hold.
pub const DEFAULT_MAX_SECRET_FIELDS: usize = 64;
/// Total bytes of one credential's secret field names and values. The cloud secrets managers
/// cap one secret at 25 KiB (Azure) to 64 KiB (AWS, Google), and a credential is one secret.
pub const DEFAULT_MAX_SECRET_BYTES: usize = 64 * 1024;
/// Words that, found in a metadata key, mean the value is sensitive. Matched on the key's
/// words (split at `_`, `-`, `.`, spaces and camelCase, case-insensitive), so `api_key`,
/// `apiKey` and `X-Api-Key` all match `api_key`, while `monkey` does not match `key`.
pub const DEFAULT_SENSITIVE_METADATA_KEYS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "api_key",
    "apikey",
    "private_key",
    "privatekey",
    "client_secret",
    "authorization",
    "cookie",
    "session_key",
    "signing_key",
    "access_key",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredentials {
    max_secret_fields: Option<usize>,
    max_secret_bytes: Option<usize>,
    sensitive_metadata_keys: Option<Vec<String>>,
}

/// `[credentials]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialLimits {
    pub max_secret_fields: usize,
    pub max_secret_bytes: usize,
    /// Each entry already split into its lower-case words.
    pub sensitive_metadata_keys: Vec<Vec<String>>,
}

impl Default for CredentialLimits {
    fn default() -> Self {
        Self {
            max_secret_fields: DEFAULT_MAX_SECRET_FIELDS,
            max_secret_bytes: DEFAULT_MAX_SECRET_BYTES,
            sensitive_metadata_keys: DEFAULT_SENSITIVE_METADATA_KEYS
                .iter()
                .map(|k| key_words(k))
                .collect(),
        }
    }
}

impl CredentialLimits {
    /// The configured entry a metadata key matches, if any.
    pub fn sensitive_match(&self, key: &str) -> Option<String> {
        let words = key_words(key);
        self.sensitive_metadata_keys
            .iter()
            .find(|term| !term.is_empty() && words.windows(term.len()).any(|w| w == &term[..]))
            .map(|term| term.join("_"))
    }
}

pub(super) fn validate(raw: RawCredentials) -> Result<CredentialLimits, ConfigError> {
    let defaults = CredentialLimits::default();
    let max_secret_fields = raw.max_secret_fields.unwrap_or(defaults.max_secret_fields);
    if !(1..=10_000).contains(&max_secret_fields) {
        return Err(invalid(
            "credentials.max_secret_fields",
            "must be between 1 and 10000",
        ));
    }
    let max_secret_bytes = raw.max_secret_bytes.unwrap_or(defaults.max_secret_bytes);
    if !(1024..=16 * 1024 * 1024).contains(&max_secret_bytes) {
        return Err(invalid(
            "credentials.max_secret_bytes",
            "must be between 1024 and 16777216",
        ));
    }
    let sensitive_metadata_keys = match raw.sensitive_metadata_keys {
        None => defaults.sensitive_metadata_keys,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, entry) in list.iter().enumerate() {
                let words = key_words(entry);
                if words.is_empty() {
                    return Err(invalid(
                        format!("credentials.sensitive_metadata_keys[{i}]"),
                        "must contain at least one letter or digit",
                    ));
                }
                out.push(words);
            }
            out
        }
    };
    Ok(CredentialLimits {
        max_secret_fields,
        max_secret_bytes,
        sensitive_metadata_keys,
    })
}

/// A key's words, lower-case: split at anything but letters and digits, where a lower-case
/// letter or digit is followed by an upper-case one (`apiKey` → `api`, `key`), and before the
/// last capital of a run followed by a lower-case letter (`DBPassword` → `db`, `password`).
pub fn key_words(key: &str) -> Vec<String> {
    let chars: Vec<char> = key.chars().collect();
    let mut words = Vec::new();
    let mut current = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if !c.is_alphanumeric() {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            continue;
        }
        let previous = i.checked_sub(1).map(|p| chars[p]);
        let next = chars.get(i + 1).copied();
        let after_lower = previous.is_some_and(|p| p.is_lowercase() || p.is_ascii_digit());
        let ends_capitals =
            previous.is_some_and(char::is_uppercase) && next.is_some_and(char::is_lowercase);
        if c.is_uppercase() && (after_lower || ends_capitals) && !current.is_empty() {
            words.push(std::mem::take(&mut current));
        }
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_name_sensitive_material_are_matched_on_words() {
        let limits = CredentialLimits::default();
        for (key, term) in [
            ("api_key", "api_key"),
            ("apiKey", "api_key"),
            ("X-Api-Key", "api_key"),
            ("refresh_token", "token"),
            ("hubspotAccessToken", "token"),
            ("DB_PASSWORD", "password"),
            ("client.secret", "secret"),
            ("DBPassword", "password"),
            ("APIToken", "token"),
            ("APIKey", "api_key"),
        ] {
            assert_eq!(limits.sensitive_match(key).as_deref(), Some(term), "{key}");
        }
        for key in [
            "monkey",
            "portal_id",
            "tokenizer",
            "secretary",
            "account",
            "key_id",
        ] {
            assert_eq!(limits.sensitive_match(key), None, "{key}");
        }
    }

    #[test]
    fn the_list_and_bounds_are_validated() {
        let raw = RawCredentials {
            max_secret_fields: Some(0),
            ..Default::default()
        };
        assert!(validate(raw)
            .unwrap_err()
            .to_string()
            .contains("max_secret_fields"));
        let raw = RawCredentials {
            sensitive_metadata_keys: Some(vec!["ok".into(), "--".into()]),
            ..Default::default()
        };
        let e = validate(raw).unwrap_err().to_string();
        assert!(e.contains("sensitive_metadata_keys[1]"), "{e}");
        let raw = RawCredentials {
            sensitive_metadata_keys: Some(vec![]),
            ..Default::default()
        };
        let limits = validate(raw).unwrap();
        assert_eq!(limits.sensitive_match("token"), None);
    }
}
