//! The routing chain, in one pure function: where a credential's secrets belong.
//!
//! pinned manager → environment's manager → workspace default → local encrypted store.
//! Reads never call this (they follow the recorded location); writes and the migration
//! planner do.

use serde::Serialize;

use crate::config::{ManagerConfig, RoutingConfig, LOCAL_MANAGER_ID};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteReason {
    Pinned,
    Environment,
    Default,
    Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub manager_id: String,
    pub reason: RouteReason,
    /// The credential is pinned to a manager that is no longer configured; it fell back.
    pub pin_unavailable: bool,
}

/// Decides the store for a credential in `environment`, optionally pinned to `pin`.
///
/// Read-only managers (Composio) are honoured as a pin, since that is how a user registers a
/// token Composio manages, but never as an environment or default target: config validation
/// refuses that, and this function skips them too so that a bug there cannot route a write
/// into a store that refuses writes.
pub fn route(
    routing: &RoutingConfig,
    managers: &[ManagerConfig],
    environment: &str,
    pin: Option<&str>,
) -> Route {
    let known = |id: &str| id == LOCAL_MANAGER_ID || managers.iter().any(|m| m.id == id);
    let writable = |id: &str| {
        id == LOCAL_MANAGER_ID
            || managers.iter().any(|m| {
                m.id == id
                    && crate::manager::descriptor::find(&m.kind).is_some_and(|d| !d.read_only)
            })
    };
    let mut pin_unavailable = false;
    if let Some(pin) = pin {
        if known(pin) {
            return Route {
                manager_id: pin.to_owned(),
                reason: RouteReason::Pinned,
                pin_unavailable: false,
            };
        }
        pin_unavailable = true;
    }
    let chain = [
        (
            routing.environments.get(environment),
            RouteReason::Environment,
        ),
        (routing.default.as_ref(), RouteReason::Default),
    ];
    for (candidate, reason) in chain {
        if let Some(id) = candidate {
            if writable(id) {
                let reason = if id == LOCAL_MANAGER_ID {
                    RouteReason::Local
                } else {
                    reason
                };
                return Route {
                    manager_id: id.clone(),
                    reason,
                    pin_unavailable,
                };
            }
        }
    }
    Route {
        manager_id: LOCAL_MANAGER_ID.to_owned(),
        reason: RouteReason::Local,
        pin_unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(id: &str, kind: &str) -> ManagerConfig {
        ManagerConfig {
            id: id.into(),
            kind: kind.into(),
            prefix: String::new(),
            settings: Default::default(),
        }
    }

    fn setup() -> (RoutingConfig, Vec<ManagerConfig>) {
        let managers = vec![
            manager("vault", "hashicorp"),
            manager("aws", "aws"),
            manager("composio", "composio"),
        ];
        let mut routing = RoutingConfig {
            default: Some("aws".into()),
            ..Default::default()
        };
        routing
            .environments
            .insert("Production".into(), "vault".into());
        (routing, managers)
    }

    #[test]
    fn pin_wins_over_everything() {
        let (r, m) = setup();
        let route = route(&r, &m, "Production", Some("aws"));
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("aws", RouteReason::Pinned)
        );
    }

    #[test]
    fn environment_manager_applies_without_pin() {
        let (r, m) = setup();
        let route = route(&r, &m, "Production", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("vault", RouteReason::Environment)
        );
    }

    #[test]
    fn default_applies_to_other_environments() {
        let (r, m) = setup();
        let route = route(&r, &m, "Sandbox", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("aws", RouteReason::Default)
        );
    }

    #[test]
    fn local_store_is_the_last_resort() {
        let (mut r, m) = setup();
        r.default = None;
        let route = route(&r, &m, "Sandbox", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Local)
        );
        let route = super::route(&RoutingConfig::default(), &[], "Production", None);
        assert_eq!(route.manager_id, "local");
    }

    #[test]
    fn composio_can_be_pinned_but_is_never_a_default_or_environment_target() {
        let (mut r, m) = setup();
        let pinned = route(&r, &m, "Sandbox", Some("composio"));
        assert_eq!(
            (pinned.manager_id.as_str(), pinned.reason),
            ("composio", RouteReason::Pinned)
        );

        r.default = Some("composio".into());
        r.environments.insert("Staging".into(), "composio".into());
        let route = route(&r, &m, "Staging", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Local)
        );
    }

    #[test]
    fn pin_to_a_removed_manager_falls_back_and_says_so() {
        let (r, m) = setup();
        let route = route(&r, &m, "Production", Some("gone"));
        assert_eq!(route.manager_id, "vault");
        assert!(route.pin_unavailable);
    }

    #[test]
    fn explicit_local_target_is_reported_as_local() {
        let (mut r, m) = setup();
        r.environments.insert("Dev".into(), "local".into());
        let route = route(&r, &m, "Dev", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Local)
        );
    }

    #[test]
    fn pin_to_local_is_honoured() {
        let (r, m) = setup();
        let route = route(&r, &m, "Production", Some("local"));
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Pinned)
        );
    }
}
