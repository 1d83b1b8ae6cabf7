//! OAuth refresh: deciding that a token is due, serialising refreshers (the credential's lock
//! in this process, then a lease in the metadata database that every process sharing it
//! honours), the token request, and the write-back of the new tokens before anyone is handed
//! them.
//!
//! `due.rs` decides when (on a read, on request, in the background pass), `lease.rs`
//! serialises refreshers, `exchange.rs` asks the token endpoint, and `write_back.rs` stores the
//! answer and finishes interrupted write-backs.

mod due;
mod exchange;
mod lease;
mod rejected;
mod write_back;

use crate::cache::Entry;
use crate::config::OAuthConfig;
use crate::metadata::CredentialRecord;
use crate::oauth::{due_at_ms, token_due_at_ms, Backoff, TokenClient};

use super::Service;

/// Field names of the sensitive half of an OAuth credential.
pub const ACCESS_TOKEN: &str = "access_token";
pub const REFRESH_TOKEN: &str = "refresh_token";
pub const CLIENT_SECRET: &str = "client_secret";

/// Why a refresh was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A read found the token inside its refresh window.
    Read,
    /// The background refresher found it due.
    Background,
    /// `POST /v1/credentials/{id}/refresh`: refresh even if not due.
    Forced,
    /// An upstream refused the token with `401` (the egress proxy): refresh even if not due,
    /// unless another refresh has replaced that token already.
    Rejected,
}

/// What a refresh did.
#[derive(Debug, Clone)]
pub enum Refreshed {
    /// New tokens were obtained (or a saved answer applied) and written back.
    Done(CredentialRecord),
    /// Nothing to do: another refresher got there first, or the token is not due.
    Skipped(CredentialRecord),
}

impl Refreshed {
    pub fn record(&self) -> &CredentialRecord {
        match self {
            Refreshed::Done(r) | Refreshed::Skipped(r) => r,
        }
    }
}

pub(crate) struct OAuthState {
    client: TokenClient,
    backoff: Backoff,
    /// Background passes only: credentials whose last background refresh failed for another
    /// reason than the token endpoint (their store, a missing field, a lease held elsewhere).
    /// Kept apart from `backoff`, which reads also obey: a read still refreshes them inline.
    deferred: Backoff,
    limiter: tokio::sync::Semaphore,
    /// This process's name in lease rows.
    holder: String,
    /// Credentials already warned about refreshing faster than their secrets manager advises.
    warned_write_rate: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Refreshes after upstream `401`s, so an upstream that refuses every token does not turn
    /// each call into a token request and a new secret version.
    rejected: rejected::Rejections,
}

impl OAuthState {
    pub(crate) fn new(config: &OAuthConfig) -> Self {
        Self {
            client: TokenClient::new(),
            backoff: Backoff::new(),
            deferred: Backoff::new(),
            limiter: tokio::sync::Semaphore::new(config.max_concurrent),
            holder: format!("{}:{}", std::process::id(), uuid::Uuid::new_v4()),
            warned_write_rate: Default::default(),
            rejected: rejected::Rejections::default(),
        }
    }
}

impl Service {
    fn oauth_config(&self) -> OAuthConfig {
        self.runtime.load().config.oauth.clone()
    }

    /// Whether `record`'s token is inside its refresh window now.
    fn is_due(&self, config: &OAuthConfig, record: &CredentialRecord) -> bool {
        record.oauth.is_some()
            && !record.needs_reauth
            && due_at_ms(config, record).is_some_and(|due| crate::time::now_unix_ms() >= due)
    }

    /// `is_due` for a cached credential.
    fn is_entry_due(&self, config: &OAuthConfig, id: &str, entry: &Entry) -> bool {
        entry.has_oauth()
            && !entry.needs_reauth()
            && token_due_at_ms(config, id, entry.expires_at_ms(), entry.token_issued_ms())
                .is_some_and(|due| crate::time::now_unix_ms() >= due)
    }

    fn is_read_only(&self, manager_id: &str) -> bool {
        self.runtime
            .load()
            .registry
            .get(manager_id)
            .is_some_and(|m| m.describe().capabilities.read_only)
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .oauth_refreshes
            .with_label_values(&[outcome])
            .inc();
    }
}
