//! The configuration file: `Config::parse` (TOML, then validation) and the checks `setup` makes
//! on a parsed configuration that need no I/O (manager types and settings, routing targets).
//!
//! Input: the file's text.
#![no_main]

use credproxy::config::Config;
use credproxy::fuzzing as fz;
use libfuzzer_sys::fuzz_target;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !s.starts_with('.')
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = Config::parse(text);
    let checked = fz::config(text);
    let config = match (parsed, checked) {
        (Err(a), Err(b)) => {
            // The same file is refused for the same reason every time.
            assert_eq!(a.to_string(), b.to_string());
            return;
        }
        // `setup` refuses what the file alone cannot tell (types, settings, read-only
        // targets), never the other way round.
        (Ok(_), Err(e)) => {
            let _ = e.to_string();
            return;
        }
        (Err(e), Ok(_)) => panic!("setup accepted what the parser refused: {e}"),
        (Ok(c), Ok(_)) => c,
    };

    // What validation promises of an accepted file.
    let ids: Vec<&str> = config.managers.iter().map(|m| m.id.as_str()).collect();
    for (i, id) in ids.iter().enumerate() {
        assert!(valid_name(id) && *id != "local", "{id:?}");
        assert!(!ids[..i].contains(id), "manager id {id:?} twice");
    }
    for m in &config.managers {
        assert!(!m.kind.is_empty());
        assert!(m.prefix.len() <= 256 && !m.prefix.chars().any(char::is_control));
        assert!(fz::manager_kinds().contains(&m.kind.as_str()), "{}", m.kind);
    }
    let target_ok = |id: &str| id == "local" || ids.contains(&id);
    if let Some(d) = &config.routing.default {
        assert!(target_ok(d), "{d:?}");
    }
    for (env, id) in &config.routing.environments {
        assert!(valid_name(env) && target_ok(id), "{env:?} {id:?}");
    }
    for rule in &config.access {
        if let Some(envs) = &rule.environments {
            assert!(!envs.is_empty() && envs.iter().all(|e| valid_name(e)));
        }
        if let Some(ws) = &rule.workspaces {
            assert!(!ws.is_empty() && ws.iter().all(|w| valid_name(w)));
        }
    }
    assert!(!config.cache.ttl.is_zero() && config.cache.capacity > 0);
    assert!(!config.manager_timeout.is_zero());
    assert!((1..=256).contains(&config.migration.concurrency));
    assert!(
        !config.migration.retry_min.is_zero()
            && config.migration.retry_min <= config.migration.retry_max
    );
    assert!((1..=1024).contains(&config.oauth.max_concurrent));

    // Parsing is deterministic, and a reload of the same file changes nothing.
    let again = Config::parse(text).expect("parsed once, parses again");
    assert!(config.restart_only_changes(&again).is_empty());
    assert_eq!(config.managers, again.managers);
    assert_eq!(config.routing, again.routing);
    let kept = config.keep_restart_only(again);
    assert!(config.restart_only_changes(&kept).is_empty());
    let _ = format!("{config:?}");
});
