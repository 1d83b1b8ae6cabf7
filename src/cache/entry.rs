//! A cached credential in its compact form: what the read path decides on (where it lives, its
//! token's state, how long it may be served) and its rendered body, and the interner that lets
//! every credential of one workspace, environment and secrets manager share one copy of those
//! names.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::view::Rendered;
use super::Loaded;

/// One cached credential. Built from a [`Loaded`] when it enters the cache; the secret values
/// live only in the rendered body, which is wiped when the entry is dropped.
pub struct Entry {
    place: Arc<Place>,
    /// `expires_at_ms` when `expires` (an `Option<i64>` would take eight bytes more here, and
    /// every entry pays them).
    expires_at_ms: i64,
    expires: bool,
    /// When the token was stored, in Unix ms (its lifetime counts from it).
    token_issued_ms: i64,
    row_version: i64,
    needs_reauth: bool,
    has_oauth: bool,
    /// When a read last used it, in the map's millisecond ticks (for eviction).
    pub(super) last_used: AtomicU32,
    pub(super) fresh_until: Instant,
    pub(super) stale_until: Instant,
    pub(super) body: Rendered,
}

/// Where a credential belongs and which secrets manager holds it: the same for most
/// credentials of a deployment, so shared.
#[derive(PartialEq, Eq, Hash)]
struct Place {
    workspace: Box<str>,
    environment: Box<str>,
    integration_type: Box<str>,
    manager_id: Box<str>,
    pinned_manager: Option<Box<str>>,
}

impl Entry {
    /// Freshness: the cache's TTL, never past the token's own expiry; stale-if-error for
    /// `grace` after that, never past the expiry either.
    pub(super) fn new(loaded: &Loaded, places: &Places, ttl: Duration, grace: Duration) -> Self {
        let now = Instant::now();
        let validity = loaded.valid_until.map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        let fresh_for = validity.map_or(ttl, |v| v.min(ttl));
        let stale_for = validity.map_or(ttl + grace, |v| v.min(ttl + grace));
        let record = &loaded.record;
        Entry {
            place: places.intern(Place {
                workspace: record.workspace.as_str().into(),
                environment: record.environment.as_str().into(),
                integration_type: record.integration_type.as_str().into(),
                manager_id: record.location.manager_id.as_str().into(),
                pinned_manager: record.pinned_manager.as_deref().map(Into::into),
            }),
            expires_at_ms: record.expires_at_ms.unwrap_or_default(),
            expires: record.expires_at_ms.is_some(),
            token_issued_ms: crate::oauth::token_issued_ms(record),
            row_version: record.row_version,
            needs_reauth: record.needs_reauth,
            has_oauth: record.oauth.is_some(),
            last_used: AtomicU32::new(0),
            fresh_until: now + fresh_for,
            stale_until: now + stale_for,
            body: Rendered::new(record, &loaded.secrets),
        }
    }

    pub fn workspace(&self) -> &str {
        &self.place.workspace
    }

    pub fn environment(&self) -> &str {
        &self.place.environment
    }

    pub fn integration_type(&self) -> &str {
        &self.place.integration_type
    }

    /// The secrets manager holding the credential (its recorded location).
    pub fn manager_id(&self) -> &str {
        &self.place.manager_id
    }

    pub fn pinned_manager(&self) -> Option<&str> {
        self.place.pinned_manager.as_deref()
    }

    /// Unix milliseconds at which the access token expires, if it does.
    pub fn expires_at_ms(&self) -> Option<i64> {
        self.expires.then_some(self.expires_at_ms)
    }

    /// When the token was stored, in Unix milliseconds (its lifetime counts from it).
    pub fn token_issued_ms(&self) -> i64 {
        self.token_issued_ms
    }

    pub fn row_version(&self) -> i64 {
        self.row_version
    }

    pub fn needs_reauth(&self) -> bool {
        self.needs_reauth
    }

    /// Whether the credential is an OAuth one (its token can be refreshed).
    pub fn has_oauth(&self) -> bool {
        self.has_oauth
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("workspace", &self.workspace())
            .field("environment", &self.environment())
            .field("manager_id", &self.manager_id())
            .field("pinned_manager", &self.pinned_manager())
            .field("expires_at_ms", &self.expires_at_ms())
            .field("row_version", &self.row_version)
            .field("needs_reauth", &self.needs_reauth)
            .field("has_oauth", &self.has_oauth)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

/// The places cached entries share. Places no entry uses any more are dropped whenever the set
/// has doubled since the last sweep, so the set stays within twice the places in use.
#[derive(Default)]
pub(super) struct Places(Mutex<PlaceSet>);

#[derive(Default)]
struct PlaceSet {
    places: HashSet<Arc<Place>>,
    sweep_at: usize,
}

/// The fewest places kept before the first sweep: sweeping a handful costs more than it saves.
const FIRST_SWEEP: usize = 64;

impl Places {
    fn intern(&self, place: Place) -> Arc<Place> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = set.places.get(&place) {
            return Arc::clone(shared);
        }
        if set.places.len() >= set.sweep_at.max(FIRST_SWEEP) {
            set.places.retain(|p| Arc::strong_count(p) > 1);
            set.sweep_at = set.places.len() * 2;
        }
        let shared = Arc::new(place);
        set.places.insert(Arc::clone(&shared));
        shared
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().places.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretFields;

    fn loaded(workspace: &str) -> Loaded {
        Loaded {
            record: Arc::new(crate::cache::tests::record(workspace, "Production")),
            secrets: SecretFields::new(),
            valid_until: None,
        }
    }

    fn entry(places: &Places, workspace: &str) -> Entry {
        Entry::new(
            &loaded(workspace),
            places,
            Duration::from_secs(1),
            Duration::ZERO,
        )
    }

    #[test]
    fn an_entry_keeps_what_the_read_path_decides_on() {
        let places = Places::default();
        let mut loaded = loaded("default");
        let record = Arc::make_mut(&mut loaded.record);
        record.expires_at_ms = Some(0);
        record.needs_reauth = true;
        record.row_version = 9;
        record.updated_at = -5;
        record.pinned_manager = Some("vault".into());
        let e = Entry::new(&loaded, &places, Duration::from_secs(1), Duration::ZERO);
        assert_eq!(e.expires_at_ms(), Some(0));
        assert!(e.needs_reauth() && !e.has_oauth());
        assert_eq!((e.row_version(), e.token_issued_ms()), (9, -5000));
        assert_eq!(
            (
                e.workspace(),
                e.environment(),
                e.manager_id(),
                e.pinned_manager()
            ),
            ("default", "Production", "local", Some("vault"))
        );
        let e = entry(&places, "default");
        assert_eq!((e.expires_at_ms(), e.pinned_manager()), (None, None));
    }

    #[test]
    fn credentials_of_one_place_share_its_names() {
        let places = Places::default();
        let a = entry(&places, "default");
        let b = entry(&places, "default");
        assert!(Arc::ptr_eq(&a.place, &b.place));
        assert_eq!(places.len(), 1);
        let other = entry(&places, "team-b");
        assert_eq!(other.workspace(), "team-b");
        assert_eq!(places.len(), 2);
    }

    #[test]
    fn places_no_entry_uses_are_swept() {
        let places = Places::default();
        let kept = entry(&places, "kept");
        for n in 0..1000 {
            drop(entry(&places, &format!("w{n}")));
        }
        assert!(places.len() <= FIRST_SWEEP * 2, "{}", places.len());
        assert!(Arc::ptr_eq(&kept.place, &entry(&places, "kept").place));
    }
}
