//! Wall-clock helpers: Unix seconds in storage, RFC 3339 on the wire.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serializer;

pub fn now_unix() -> i64 {
    to_unix(SystemTime::now())
}

/// Milliseconds, for leases (which outlive a process but not a second's rounding).
pub fn now_unix_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(_) => 0,
    }
}

/// The wait before retry number `attempt` (1-based): `min` doubling up to `max`, then a random
/// point between half and all of it, so many things failing together do not retry together.
pub fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let step = min
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(max);
    step.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

pub fn to_unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

pub fn rfc3339(secs: i64) -> String {
    humantime::format_rfc3339_seconds(from_unix(secs)).to_string()
}

pub fn parse_rfc3339(s: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(s).ok().map(to_unix)
}

pub fn serialize_opt_rfc3339<S: Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string()),
        None => s.serialize_none(),
    }
}

pub fn serialize_opt_unix_rfc3339<S: Serializer>(t: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    serialize_opt_rfc3339(&t.map(from_unix), s)
}
