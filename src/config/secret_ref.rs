//! References to access details kept outside the file (`{ env = "VAR" }`, `{ file = "/path" }`),
//! and reading them when a manager is built.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use crate::secret::SecretString;

/// Where a manager's access detail comes from: never inline, so config files can be shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
    /// `{ sealed = true }`: in the manager's access details given through the API, which the
    /// metadata database holds sealed under the master key. Meaningless in the file.
    Sealed,
}

const SECRET_REF_SHAPE: &str =
    "expected { env = \"VAR\" } or { file = \"/path\" }; secrets are never written inline";

/// Hand-written so that a secret pasted inline is refused without being quoted back.
impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RefVisitor;
        impl<'de> serde::de::Visitor<'de> for RefVisitor {
            type Value = SecretRef;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(SECRET_REF_SHAPE)
            }
            fn visit_str<E: serde::de::Error>(self, _v: &str) -> Result<SecretRef, E> {
                Err(E::custom(SECRET_REF_SHAPE))
            }
            fn visit_i64<E: serde::de::Error>(self, _v: i64) -> Result<SecretRef, E> {
                Err(E::custom(SECRET_REF_SHAPE))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<SecretRef, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    let parsed = match key.as_str() {
                        "env" => SecretRef::Env(map.next_value()?),
                        "file" => SecretRef::File(PathBuf::from(map.next_value::<String>()?)),
                        "sealed" if map.next_value::<bool>()? => SecretRef::Sealed,
                        _ => return Err(serde::de::Error::custom(SECRET_REF_SHAPE)),
                    };
                    if found.replace(parsed).is_some() {
                        return Err(serde::de::Error::custom(SECRET_REF_SHAPE));
                    }
                }
                found.ok_or_else(|| serde::de::Error::custom(SECRET_REF_SHAPE))
            }
        }
        deserializer.deserialize_any(RefVisitor)
    }
}

impl SecretRef {
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(v) => format!("environment variable {v}"),
            SecretRef::File(p) => format!("file {}", p.display()),
            SecretRef::Sealed => "the sealed access details".to_owned(),
        }
    }

    /// Reads the value now; surrounding whitespace (a trailing newline in a file) is dropped.
    pub fn resolve(&self, key: &str) -> Result<SecretString, ConfigError> {
        let fail = |reason: String| ConfigError::SecretSource {
            key: key.to_owned(),
            source_desc: self.describe(),
            reason,
        };
        let raw = match self {
            SecretRef::Env(var) => std::env::var(var).map_err(|_| fail("not set".into()))?,
            SecretRef::File(path) => {
                std::fs::read_to_string(path).map_err(|e| fail(e.kind().to_string()))?
            }
            SecretRef::Sealed => {
                return Err(fail(
                    "only secrets managers created through the API have sealed access details"
                        .into(),
                ))
            }
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(fail("empty".into()));
        }
        Ok(SecretString::new(trimmed.to_owned()))
    }
}
