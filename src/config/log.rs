//! `[log]`: the log's level and format, and the audit trail's sink and buffering.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::raw::RawLog;
use super::{invalid, ConfigError, DEFAULT_LOG_LEVEL};

/// Audit lines are written out at least this often.
pub const DEFAULT_AUDIT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes of audit lines held while the writer catches up (about 16,000 lines).
pub const DEFAULT_AUDIT_BUFFER: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub audit: bool,
    /// Audit lines go to this file (reopened on SIGUSR1) instead of stderr.
    pub audit_file: Option<PathBuf>,
    pub audit_flush_interval: Duration,
    pub audit_buffer: usize,
    /// A full audit buffer makes requests wait instead of dropping (and counting) lines.
    pub audit_blocking: bool,
}

pub(super) fn validate(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let log = LogConfig {
        level: raw.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.into()),
        format: raw.format.unwrap_or(LogFormat::Text),
        audit: raw.audit.unwrap_or(true),
        audit_file: raw.audit_file,
        audit_flush_interval: raw
            .audit_flush_interval
            .unwrap_or(DEFAULT_AUDIT_FLUSH_INTERVAL),
        audit_buffer: raw.audit_buffer.unwrap_or(DEFAULT_AUDIT_BUFFER),
        audit_blocking: raw.audit_blocking.unwrap_or(false),
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(invalid(
            "log.level",
            "not a valid level or filter directive",
        ));
    }
    if log.audit_flush_interval < Duration::from_millis(1)
        || log.audit_flush_interval > Duration::from_secs(10)
    {
        return Err(invalid(
            "log.audit_flush_interval",
            "must be between 1ms and 10s",
        ));
    }
    if !(64 * 1024..=1024 * 1024 * 1024).contains(&log.audit_buffer) {
        return Err(invalid(
            "log.audit_buffer",
            "must be between 65536 and 1073741824 bytes",
        ));
    }
    if log
        .audit_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty() || p.is_dir())
    {
        return Err(invalid("log.audit_file", "must name a file"));
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn audit_settings_have_defaults_and_bounds() {
        let c = Config::parse("").unwrap();
        assert!(c.log.audit && !c.log.audit_blocking && c.log.audit_file.is_none());
        assert_eq!(c.log.audit_flush_interval.as_millis(), 100);
        let c = Config::parse(
            "[log]\naudit_file = \"/tmp/a.log\"\naudit_flush_interval = \"5ms\"\naudit_buffer = 1048576\naudit_blocking = true\n",
        )
        .unwrap();
        assert!(c.log.audit_blocking);
        assert_eq!(c.log.audit_buffer, 1 << 20);
        for (bad, key) in [
            ("audit_flush_interval = \"0s\"", "log.audit_flush_interval"),
            ("audit_flush_interval = \"1m\"", "log.audit_flush_interval"),
            ("audit_buffer = 100", "log.audit_buffer"),
            ("audit_file = \"\"", "log.audit_file"),
            ("audit_file = \"/\"", "log.audit_file"),
        ] {
            let e = Config::parse(&format!("[log]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }
}
