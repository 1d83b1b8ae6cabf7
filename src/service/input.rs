//! What the API accepts: the request bodies of create and patch, and the checks their fields
//! must pass before anything is written.

use serde::Deserialize;

use super::ServiceError;
use crate::config::{is_valid_name, CredentialLimits, DEFAULT_WORKSPACE};
use crate::metadata::{ClientAuth, GrantType, OAuthDescription};
use crate::secret::SecretFields;

/// Deepest nesting of objects accepted in `metadata`.
const MAX_METADATA_DEPTH: usize = 16;

/// Largest metadata object accepted, serialised.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// `POST /v1/credentials`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The tenant the credential belongs to; `default` when absent.
    #[serde(default)]
    pub workspace: Option<String>,
    pub environment: String,
    #[serde(default)]
    pub integration_type: Option<String>,
    #[serde(default)]
    pub secrets_manager_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, deserialize_with = "crate::secret::strict_fields")]
    pub secrets: Option<SecretFields>,
    #[serde(default, deserialize_with = "object_only")]
    pub oauth: Option<OAuthInput>,
    /// For read-only managers: the id of the account there (e.g. a Composio connected account).
    #[serde(default)]
    pub external_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthInput {
    pub token_url: String,
    pub client_id: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 3339 or Unix seconds.
    #[serde(default)]
    pub expires_at: Option<serde_json::Value>,
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    #[serde(default)]
    pub grant: Option<GrantType>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
}

/// `PATCH /v1/credentials/{id}`. `secrets_manager_id: null` unpins.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    #[serde(default, deserialize_with = "crate::secret::strict_fields")]
    pub secrets: Option<SecretFields>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub secrets_manager_id: Option<Option<String>>,
    #[serde(default)]
    pub expires_at: Option<serde_json::Value>,
}

/// A nested struct from a JSON object only: serde would also fill it from an array, by
/// position, which is never what a caller meant.
fn object_only<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct ObjectOnly<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectOnly<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Some)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(ObjectOnly(std::marker::PhantomData))
}

fn explicit_null<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// The checks `create` makes before it asks whether the caller may write there: the
/// environment and the workspace (`default` when absent) must be valid names. Answers the
/// workspace.
pub(crate) fn check_scope(
    workspace: Option<String>,
    environment: &str,
) -> Result<String, ServiceError> {
    if !is_valid_name(environment) {
        return Err(ServiceError::Invalid(
            "`environment` must be 1-128 letters, digits, `-`, `_` or `.`".into(),
        ));
    }
    let workspace = workspace.unwrap_or_else(|| DEFAULT_WORKSPACE.to_owned());
    if !is_valid_name(&workspace) {
        return Err(ServiceError::Invalid(
            "`workspace` must be 1-128 letters, digits, `-`, `_` or `.`".into(),
        ));
    }
    Ok(workspace)
}

/// The fields of a create request that need no runtime to check, checked.
#[derive(Debug)]
pub(crate) struct CreateFields {
    pub integration_type: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub oauth: Option<OAuthDescription>,
    /// Unix milliseconds.
    pub expires_at_ms: Option<i64>,
}

/// The checks `create` makes once the caller may write: integration type, metadata, and the
/// OAuth description with its expiry.
pub(crate) fn check_fields(
    integration_type: Option<String>,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    oauth: Option<OAuthInput>,
    limits: &CredentialLimits,
) -> Result<CreateFields, ServiceError> {
    let integration_type = integration_type.unwrap_or_default();
    if integration_type.is_empty()
        || integration_type.len() > 128
        || integration_type.chars().any(char::is_control)
    {
        return Err(ServiceError::Invalid(
            "`integration_type` must be 1-128 printable characters".into(),
        ));
    }
    let metadata = metadata.unwrap_or_default();
    check_metadata(&metadata, limits)?;
    let (oauth, expires_at_ms) = match oauth {
        Some(o) => {
            let expires_at = o.expires_at.as_ref().map(parse_expiry).transpose()?;
            (Some(check_oauth(o)?), expires_at)
        }
        None => (None, None),
    };
    Ok(CreateFields {
        integration_type,
        metadata,
        oauth,
        expires_at_ms,
    })
}

/// The checks `patch` makes before it reads the credential: metadata, the size of the secret
/// fields it brings (the merged value is checked again), and the new expiry, which it answers.
pub(crate) fn check_patch(
    request: &PatchRequest,
    limits: &CredentialLimits,
) -> Result<Option<i64>, ServiceError> {
    if let Some(m) = &request.metadata {
        check_metadata(m, limits)?;
    }
    if let Some(s) = &request.secrets {
        check_secrets_size(s, limits)?;
    }
    request.expires_at.as_ref().map(parse_expiry).transpose()
}

/// Metadata is stored in plaintext, so a key that names sensitive material (an API key pasted
/// into the wrong object) is refused, at any depth, with the key's path.
pub(super) fn check_metadata(
    m: &serde_json::Map<String, serde_json::Value>,
    limits: &CredentialLimits,
) -> Result<(), ServiceError> {
    let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > MAX_METADATA_BYTES {
        return Err(ServiceError::Invalid(format!(
            "`metadata` is larger than {MAX_METADATA_BYTES} bytes"
        )));
    }
    sensitive_key(m, "metadata", limits, 0)
}

fn sensitive_key(
    m: &serde_json::Map<String, serde_json::Value>,
    path: &str,
    limits: &CredentialLimits,
    depth: usize,
) -> Result<(), ServiceError> {
    for (key, value) in m {
        let here = format!("{path}.{key}");
        if let Some(term) = limits.sensitive_match(key) {
            return Err(ServiceError::Invalid(format!(
                "`{here}` names sensitive material (`{term}` in credentials.sensitive_metadata_keys); metadata is stored in plaintext, put secret values in `secrets`"
            )));
        }
        let mut nested: Vec<&serde_json::Value> = vec![value];
        while let Some(v) = nested.pop() {
            match v {
                serde_json::Value::Object(inner) if depth < MAX_METADATA_DEPTH => {
                    sensitive_key(inner, &here, limits, depth + 1)?
                }
                // Not skipped unchecked: refused.
                serde_json::Value::Object(_) => {
                    return Err(ServiceError::Invalid(format!(
                        "`metadata` nests objects deeper than {MAX_METADATA_DEPTH} levels"
                    )))
                }
                serde_json::Value::Array(items) => nested.extend(items),
                _ => {}
            }
        }
    }
    Ok(())
}

/// A credential's secret fields after a create or a PATCH merged them: within
/// `[credentials]` limits, or `413`.
pub(super) fn check_secrets_size(
    secrets: &SecretFields,
    limits: &CredentialLimits,
) -> Result<(), ServiceError> {
    if secrets.len() > limits.max_secret_fields {
        return Err(ServiceError::TooLarge(format!(
            "the credential would hold {} secret fields; credentials.max_secret_fields is {}",
            secrets.len(),
            limits.max_secret_fields
        )));
    }
    let bytes = secrets.byte_size();
    if bytes > limits.max_secret_bytes {
        return Err(ServiceError::TooLarge(format!(
            "the credential's secret fields would total {bytes} bytes; credentials.max_secret_bytes is {}",
            limits.max_secret_bytes
        )));
    }
    Ok(())
}

fn check_oauth(o: OAuthInput) -> Result<OAuthDescription, ServiceError> {
    check_token_url(&o.token_url)?;
    if o.client_id.is_empty() || o.client_id.len() > 512 {
        return Err(ServiceError::Invalid(
            "`oauth.client_id` must be 1-512 characters".into(),
        ));
    }
    if o.audience
        .as_ref()
        .is_some_and(|a| a.is_empty() || a.len() > 2048 || a.chars().any(char::is_control))
    {
        return Err(ServiceError::Invalid(
            "`oauth.audience` must be 1-2048 printable characters".into(),
        ));
    }
    if let Some(resource) = &o.resource {
        // RFC 8707 §2: an absolute URI without a fragment.
        let valid = resource.len() <= 2048
            && url::Url::parse(resource).is_ok_and(|u| u.fragment().is_none());
        if !valid {
            return Err(ServiceError::Invalid(
                "`oauth.resource` must be an absolute URI without a fragment, at most 2048 characters"
                    .into(),
            ));
        }
    }
    Ok(OAuthDescription {
        token_url: o.token_url,
        client_id: o.client_id,
        scopes: o.scopes,
        client_auth: o.client_auth.unwrap_or_default(),
        grant: o.grant.unwrap_or_default(),
        audience: o.audience,
        resource: o.resource,
    })
}

/// The client secret and refresh token go to this URL: HTTPS only, except to this host itself
/// (a local token endpoint or a test server), and no credentials or fragment in the URL.
fn check_token_url(raw: &str) -> Result<(), ServiceError> {
    let invalid = |why: &str| ServiceError::Invalid(format!("`oauth.token_url` {why}"));
    if raw.len() > 2048 {
        return Err(invalid("is longer than 2048 characters"));
    }
    let url = url::Url::parse(raw).map_err(|_| invalid("is not a valid URL"))?;
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(invalid("must not carry credentials or a fragment"));
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(invalid(
            "must use https (plain http only to a loopback address)",
        )),
        _ => Err(invalid("must be an https URL")),
    }
}

/// An expiry as RFC 3339 (fractions of a second kept to the millisecond) or Unix seconds
/// (an integer, or a number with a fraction), in Unix milliseconds.
fn parse_expiry(v: &serde_json::Value) -> Result<i64, ServiceError> {
    match v {
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(secs) => secs.checked_mul(1000),
            None => n
                .as_f64()
                .filter(|f| f.is_finite() && (0.0..=LATEST_EXPIRY_MS as f64 / 1000.0).contains(f))
                .map(|f| (f * 1000.0) as i64),
        },
        serde_json::Value::String(s) => crate::time::parse_rfc3339_ms(s),
        _ => None,
    }
    // Refresh scheduling does arithmetic in milliseconds on this value: a year past 9999
    // would overflow it.
    .filter(|t| (0..=LATEST_EXPIRY_MS).contains(t))
    .ok_or_else(|| {
        ServiceError::Invalid(
            "`expires_at` must be RFC 3339 or Unix seconds, between 1970 and 9999".into(),
        )
    })
}

use crate::time::LATEST_UNIX_MS as LATEST_EXPIRY_MS;

/// A fresh idempotency token per logical write (AWS wants 32-64 characters). A token reused
/// for a different value is an error there, so it is never derived from the row version.
pub(super) fn write_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_refused_outside_the_years_refresh_arithmetic_can_hold() {
        use serde_json::json;
        assert_eq!(
            parse_expiry(&json!(1_700_000_000)).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_expiry(&json!(1_700_000_000.25)).unwrap(),
            1_700_000_000_250
        );
        assert_eq!(
            parse_expiry(&json!("2030-01-01T00:00:00Z")).unwrap(),
            1_893_456_000_000
        );
        assert_eq!(
            parse_expiry(&json!("2030-01-01T00:00:00.125Z")).unwrap(),
            1_893_456_000_125
        );
        for bad in [
            json!(i64::MAX),
            json!(-1),
            json!(LATEST_EXPIRY_MS / 1000 + 1),
            json!(1e300),
            json!(true),
        ] {
            let e = parse_expiry(&bad).unwrap_err().to_string();
            assert!(e.contains("between 1970 and 9999"), "{e}");
        }
    }
}
