//! Why a metadata database call failed, in a small closed set: the `reason` label of
//! `credproxy_metadata_write_failures_total`, the key of the rate-limited failure log, and what
//! `/readyz` reports while writes cannot succeed.

/// The kind of a database failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// No space left (SQLite `SQLITE_FULL`, PostgreSQL `53100`).
    Full,
    /// The database or its file system refuses writes (SQLite `SQLITE_READONLY`, an I/O error
    /// on a file that is immutable or on a read-only mount; PostgreSQL `25006`, a standby).
    ReadOnly,
    /// Another writer held the database past the busy timeout, a deadlock, a lock timeout.
    Locked,
    /// The database cannot be reached or read (I/O error, cannot open, lost connection).
    Unavailable,
    /// Anything else (corruption, a malformed row, an unexpected error).
    Other,
}

impl Fault {
    pub const ALL: [Fault; 5] = [
        Fault::Full,
        Fault::ReadOnly,
        Fault::Locked,
        Fault::Unavailable,
        Fault::Other,
    ];

    /// The metric label and the word in logs.
    pub fn label(self) -> &'static str {
        match self {
            Fault::Full => "full",
            Fault::ReadOnly => "read_only",
            Fault::Locked => "locked",
            Fault::Unavailable => "unavailable",
            Fault::Other => "other",
        }
    }

    /// Whether a write that failed this way means the next one will fail too, until the cause
    /// is fixed: then the daemon is not ready. A lock is contention and passes by itself; an
    /// unclassified error is likely the request's own.
    pub fn persists(self) -> bool {
        matches!(self, Fault::Full | Fault::ReadOnly | Fault::Unavailable)
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_labels_are_the_metrics_closed_set() {
        let labels = super::Fault::ALL.map(super::Fault::label);
        assert_eq!(labels, crate::metrics::METADATA_WRITE_FAILURE_REASONS);
    }
}
