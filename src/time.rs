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
/// How long to wait for something due at `at_ms` (milliseconds since the epoch), kept between
/// `min` (a thing that stays due does not spin its loop) and `max`; `max` when nothing is due.
pub fn wait_until_ms(at_ms: Option<i64>, min: Duration, max: Duration) -> Duration {
    at_ms.map_or(max, |at| {
        let until = u64::try_from(at.saturating_sub(now_unix_ms())).unwrap_or(0);
        Duration::from_millis(until).clamp(min, max.max(min))
    })
}

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

/// 9999-12-31T23:59:59Z: the last second RFC 3339 can write, and so the latest time the API
/// accepts or stores.
pub const LATEST_UNIX: i64 = 253_402_300_799;

/// A stored time brought into the range the API can write (1970 to 9999). Rows written before
/// input was range-checked, or edited by hand, must not panic a read that formats them or a
/// refresh that does arithmetic on them.
pub fn clamp_unix(secs: i64) -> i64 {
    secs.clamp(0, LATEST_UNIX)
}

/// `d` from now, never overflowing: a lifetime a peer announced can be any number.
pub fn from_now(d: Duration) -> SystemTime {
    after(SystemTime::now(), d)
}

/// `d` after `t`, never overflowing and never past the latest time the API can write.
pub fn after(t: SystemTime, d: Duration) -> SystemTime {
    let latest = from_unix(LATEST_UNIX);
    t.checked_add(d).map_or(latest, |t| t.min(latest))
}

pub fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(clamp_unix(secs) as u64)
}

/// Never panics: humantime's formatter fails (and `to_string` then panics) past the year 9999,
/// so the time is clamped first.
pub fn rfc3339(secs: i64) -> String {
    humantime::format_rfc3339_seconds(from_unix(secs)).to_string()
}

pub fn parse_rfc3339(s: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(s).ok().map(to_unix)
}

/// The latest millisecond the API can write (the last one of 9999).
pub const LATEST_UNIX_MS: i64 = LATEST_UNIX * 1000 + 999;

/// Unix milliseconds of `t` (negative before 1970).
pub fn to_unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// As [`clamp_unix`], in milliseconds.
pub fn clamp_unix_ms(ms: i64) -> i64 {
    ms.clamp(0, LATEST_UNIX_MS)
}

pub fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(clamp_unix_ms(ms) as u64)
}

/// RFC 3339 with milliseconds when the time has any (`2026-11-30T05:00:00.250Z`), whole
/// seconds otherwise, so a time given in seconds reads back as it was written.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = from_unix_ms(ms);
    if clamp_unix_ms(ms) % 1000 == 0 {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        humantime::format_rfc3339_millis(t).to_string()
    }
}

/// An RFC 3339 time to Unix milliseconds (finer fractions are truncated).
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(s).ok().map(to_unix_ms)
}

pub fn serialize_opt_unix_ms_rfc3339<S: Serializer>(
    t: &Option<i64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(ms) => s.serialize_str(&rfc3339_ms(*ms)),
        None => s.serialize_none(),
    }
}

pub fn serialize_opt_rfc3339<S: Serializer>(
    t: &Option<SystemTime>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339(to_unix(*t))),
        None => s.serialize_none(),
    }
}

pub fn serialize_opt_unix_rfc3339<S: Serializer>(t: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    serialize_opt_rfc3339(&t.map(from_unix), s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_something_due_stays_between_its_bounds() {
        let (min, max) = (Duration::from_millis(50), Duration::from_secs(30));
        assert_eq!(wait_until_ms(None, min, max), max);
        assert_eq!(wait_until_ms(Some(0), min, max), min, "overdue");
        assert_eq!(
            wait_until_ms(Some(now_unix_ms() + 3_600_000), min, max),
            max
        );
        let soon = wait_until_ms(Some(now_unix_ms() + 2_000), min, max);
        assert!(soon > Duration::from_millis(1_500) && soon <= Duration::from_secs(2));
    }

    #[test]
    fn any_stored_or_announced_time_formats_without_panicking() {
        for secs in [i64::MIN, -1, 0, LATEST_UNIX, LATEST_UNIX + 1, i64::MAX] {
            let text = rfc3339(secs);
            assert!(text.ends_with('Z'), "{text}");
            assert_eq!(parse_rfc3339(&text), Some(clamp_unix(secs)));
        }
        assert_eq!(to_unix(from_now(Duration::MAX)), LATEST_UNIX);
        assert!(from_now(Duration::from_secs(5)) > SystemTime::now());
    }
}
