//! The routing chain, per workspace, in one pure function: where a credential's secrets
//! belong.
//!
//! pinned manager → the workspace's environment manager → the workspace's default → the local
//! encrypted store. Reads never call this (they follow the recorded location); writes and the
//! migration planner do. [`Topology`] is what the chain is evaluated over: every manager in
//! force (from the config file or created through the API) and every workspace's routing.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Config, RoutingConfig, DEFAULT_WORKSPACE, LOCAL_MANAGER_ID};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
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
    /// The credential is pinned to a manager that is no longer in force; it fell back.
    pub pin_unavailable: bool,
}

/// Where a secrets manager's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Api,
}

/// A secrets manager as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerEntry {
    pub id: String,
    pub workspace: String,
    pub kind: String,
    pub prefix: String,
    pub source: Source,
    /// Composio: never a routing target, never a move's source or target.
    pub read_only: bool,
    /// Deleted (or removed from the file) but still holding credentials: readable, never a
    /// target, gone once empty.
    pub retiring: bool,
}

/// Every manager in force and every workspace's routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    managers: BTreeMap<String, ManagerEntry>,
    routing: BTreeMap<String, RoutingConfig>,
}

impl Topology {
    /// The file's managers and routing, all in the `default` workspace.
    pub fn from_config(config: &Config) -> Self {
        let mut t = Topology::default();
        for m in &config.managers {
            t.insert(ManagerEntry {
                id: m.id.clone(),
                workspace: DEFAULT_WORKSPACE.to_owned(),
                kind: m.kind.clone(),
                prefix: m.prefix.clone(),
                source: Source::File,
                read_only: crate::manager::descriptor::find(&m.kind).is_none_or(|d| d.read_only),
                retiring: false,
            });
        }
        if config.routing != RoutingConfig::default() {
            t.set_routing(DEFAULT_WORKSPACE, config.routing.clone());
        }
        t
    }

    pub fn insert(&mut self, entry: ManagerEntry) {
        self.managers.insert(entry.id.clone(), entry);
    }

    pub fn set_routing(&mut self, workspace: &str, routing: RoutingConfig) {
        if routing == RoutingConfig::default() {
            self.routing.remove(workspace);
        } else {
            self.routing.insert(workspace.to_owned(), routing);
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<ManagerEntry> {
        self.managers.remove(id)
    }

    /// The label a manager's metrics carry. Managers created through the API (thousands, one
    /// per customer vault) share one label per type, `api:aws`, so a metric's label set stays
    /// bounded by the file's managers plus the types; the file's managers and `local` keep
    /// their ids.
    /// A manager no longer in the topology (an API manager retired while a move or a read
    /// still names it) is `removed`: its id, which may be any customer's, never becomes a label.
    pub fn metric_label(&self, id: &str) -> String {
        match self.managers.get(id) {
            Some(m) if m.source == Source::Api => format!("api:{}", m.kind),
            Some(_) => id.to_owned(),
            None if id == LOCAL_MANAGER_ID => id.to_owned(),
            None => "removed".to_owned(),
        }
    }

    pub fn manager(&self, id: &str) -> Option<&ManagerEntry> {
        self.managers.get(id)
    }

    pub fn managers(&self) -> impl Iterator<Item = &ManagerEntry> {
        self.managers.values()
    }

    /// The workspace's routing (empty when it has none).
    pub fn routing(&self, workspace: &str) -> RoutingConfig {
        self.routing.get(workspace).cloned().unwrap_or_default()
    }

    pub fn routed_workspaces(&self) -> impl Iterator<Item = (&str, &RoutingConfig)> {
        self.routing.iter().map(|(w, r)| (w.as_str(), r))
    }

    /// Whether `id` may be written to as a route of `workspace`.
    fn writable_in(&self, id: &str, workspace: &str) -> bool {
        id == LOCAL_MANAGER_ID
            || self
                .managers
                .get(id)
                .is_some_and(|m| m.workspace == workspace && !m.read_only && !m.retiring)
    }

    /// Decides the manager for a credential of `workspace` in `environment`, optionally
    /// pinned to `pin`.
    ///
    /// Read-only managers (Composio) are honoured as a pin, since that is how a user registers
    /// a token Composio manages, but never as an environment or default target: validation
    /// refuses that, and this function skips them too so that a bug there cannot route a write
    /// into a manager that refuses writes. A pin to a manager of another workspace, or one
    /// that is retiring, is unavailable and falls back along the chain.
    pub fn route(&self, workspace: &str, environment: &str, pin: Option<&str>) -> Route {
        let mut pin_unavailable = false;
        if let Some(pin) = pin {
            let usable = pin == LOCAL_MANAGER_ID
                || self
                    .managers
                    .get(pin)
                    .is_some_and(|m| m.workspace == workspace && !m.retiring);
            if usable {
                return Route {
                    manager_id: pin.to_owned(),
                    reason: RouteReason::Pinned,
                    pin_unavailable: false,
                };
            }
            pin_unavailable = true;
        }
        let routing = self.routing.get(workspace);
        let chain = [
            (
                routing.and_then(|r| r.environments.get(environment)),
                RouteReason::Environment,
            ),
            (
                routing.and_then(|r| r.default.as_ref()),
                RouteReason::Default,
            ),
        ];
        for (candidate, reason) in chain {
            if let Some(id) = candidate {
                if self.writable_in(id, workspace) {
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

    /// A digest of what decides where credentials belong (managers' ids, workspaces, types,
    /// prefixes and states, and every routing): instances sharing a database move credentials
    /// only while they all agree on it.
    pub fn hash(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for m in self.managers.values() {
            h.update(format!(
                "m\0{}\0{}\0{}\0{}\0{}\0",
                m.id, m.workspace, m.kind, m.prefix, m.retiring
            ));
        }
        for (workspace, r) in &self.routing {
            h.update(format!("w\0{workspace}\0d\0{:?}\0", r.default));
            for (env, id) in &r.environments {
                h.update(format!("e\0{env}\0{id}\0"));
            }
        }
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(id: &str, kind: &str, workspace: &str) -> ManagerEntry {
        ManagerEntry {
            id: id.into(),
            workspace: workspace.into(),
            kind: kind.into(),
            prefix: String::new(),
            source: Source::File,
            read_only: kind == "composio",
            retiring: false,
        }
    }

    fn setup() -> (RoutingConfig, Topology) {
        let mut t = Topology::default();
        for (id, kind) in [
            ("vault", "hashicorp"),
            ("aws", "aws"),
            ("composio", "composio"),
        ] {
            t.insert(manager(id, kind, DEFAULT_WORKSPACE));
        }
        let mut routing = RoutingConfig {
            default: Some("aws".into()),
            ..Default::default()
        };
        routing
            .environments
            .insert("Production".into(), "vault".into());
        (routing, t)
    }

    /// The chain of the `default` workspace under `routing`.
    fn route_in(routing: &RoutingConfig, t: &Topology, env: &str, pin: Option<&str>) -> Route {
        let mut t = t.clone();
        t.set_routing(DEFAULT_WORKSPACE, routing.clone());
        t.route(DEFAULT_WORKSPACE, env, pin)
    }

    #[test]
    fn pin_wins_over_everything() {
        let (r, m) = setup();
        let route = route_in(&r, &m, "Production", Some("aws"));
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("aws", RouteReason::Pinned)
        );
    }

    #[test]
    fn environment_manager_applies_without_pin() {
        let (r, m) = setup();
        let route = route_in(&r, &m, "Production", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("vault", RouteReason::Environment)
        );
    }

    #[test]
    fn default_applies_to_other_environments() {
        let (r, m) = setup();
        let route = route_in(&r, &m, "Sandbox", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("aws", RouteReason::Default)
        );
    }

    #[test]
    fn local_store_is_the_last_resort() {
        let (mut r, m) = setup();
        r.default = None;
        let route = route_in(&r, &m, "Sandbox", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Local)
        );
        let route = route_in(
            &RoutingConfig::default(),
            &Topology::default(),
            "Production",
            None,
        );
        assert_eq!(route.manager_id, "local");
    }

    #[test]
    fn composio_can_be_pinned_but_is_never_a_default_or_environment_target() {
        let (mut r, m) = setup();
        let pinned = route_in(&r, &m, "Sandbox", Some("composio"));
        assert_eq!(
            (pinned.manager_id.as_str(), pinned.reason),
            ("composio", RouteReason::Pinned)
        );

        r.default = Some("composio".into());
        r.environments.insert("Staging".into(), "composio".into());
        let route = route_in(&r, &m, "Staging", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Local)
        );
    }

    #[test]
    fn pin_to_a_removed_manager_falls_back_and_says_so() {
        let (r, m) = setup();
        let route = route_in(&r, &m, "Production", Some("gone"));
        assert_eq!(route.manager_id, "vault");
        assert!(route.pin_unavailable);
    }

    #[test]
    fn explicit_local_target_is_reported_as_local() {
        let (mut r, m) = setup();
        r.environments.insert("Dev".into(), "local".into());
        let route = route_in(&r, &m, "Dev", None);
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Local)
        );
    }

    #[test]
    fn pin_to_local_is_honoured() {
        let (r, m) = setup();
        let route = route_in(&r, &m, "Production", Some("local"));
        assert_eq!(
            (route.manager_id.as_str(), route.reason),
            ("local", RouteReason::Pinned)
        );
    }
}

#[cfg(test)]
mod workspace_tests {
    use super::*;

    #[test]
    fn each_workspace_routes_to_its_own_managers_only() {
        let mut t = Topology::default();
        for (id, ws) in [("a-vault", "acme"), ("b-aws", "globex")] {
            t.insert(ManagerEntry {
                id: id.into(),
                workspace: ws.into(),
                kind: "hashicorp".into(),
                prefix: String::new(),
                source: Source::Api,
                read_only: false,
                retiring: false,
            });
        }
        t.set_routing(
            "acme",
            RoutingConfig {
                default: Some("a-vault".into()),
                ..Default::default()
            },
        );
        // A routing entry naming another workspace's manager is never followed.
        t.set_routing(
            "globex",
            RoutingConfig {
                default: Some("a-vault".into()),
                ..Default::default()
            },
        );
        assert_eq!(t.route("acme", "Production", None).manager_id, "a-vault");
        assert_eq!(t.route("globex", "Production", None).manager_id, "local");
        // Nor is a pin to another workspace's manager.
        let r = t.route("globex", "Production", Some("a-vault"));
        assert_eq!(r.manager_id, "local");
        assert!(r.pin_unavailable);
        assert_eq!(
            t.route("globex", "Production", Some("b-aws")).reason,
            RouteReason::Pinned
        );
    }

    #[test]
    fn a_retiring_manager_is_never_a_target() {
        let mut t = Topology::default();
        t.insert(ManagerEntry {
            id: "old".into(),
            workspace: "acme".into(),
            kind: "aws".into(),
            prefix: String::new(),
            source: Source::Api,
            read_only: false,
            retiring: true,
        });
        t.set_routing(
            "acme",
            RoutingConfig {
                default: Some("old".into()),
                ..Default::default()
            },
        );
        assert_eq!(t.route("acme", "P", None).manager_id, "local");
        assert!(t.route("acme", "P", Some("old")).pin_unavailable);
    }
}
