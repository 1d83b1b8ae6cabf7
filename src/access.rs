//! Who is calling and what they may do: callers identified by the kernel (SO_PEERCRED) or by
//! the TCP token, and the `[[access]]` policy that maps them to environments.

use std::fmt;

use crate::config::{AccessRule, Principal};

/// A caller, as the kernel (Unix socket) or the token check (TCP) identified it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    Tcp,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Unix {
                uid,
                gid,
                pid: Some(pid),
            } => write!(f, "uid={uid} gid={gid} pid={pid}"),
            Caller::Unix {
                uid,
                gid,
                pid: None,
            } => write!(f, "uid={uid} gid={gid}"),
            Caller::Tcp => f.write_str("tcp-token"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Seeing that something exists and what it is, never a secret value (managers, routing,
    /// events, a credential's existence): every rule matching the scope grants it.
    View,
    /// Reading a credential's secret values.
    Read,
    /// Using a credential through the egress proxy: the secret is applied to a call to its
    /// upstream and never handed to the caller.
    Use,
    Write,
    /// Listing what a manager holds, reload, and other operator calls.
    Admin,
}

/// Never a workspace's name (names cannot hold `*`), so only a rule granting every workspace
/// matches it.
const ALL_WORKSPACES: &str = "*";

/// What a request touches, for the policy: `None` stands for "some": a rule that grants any
/// workspace (or environment) matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scope<'a> {
    pub workspace: Option<&'a str>,
    pub environment: Option<&'a str>,
}

impl<'a> Scope<'a> {
    /// Anything at all: the early check before the credential is known.
    pub const ANY: Scope<'static> = Scope {
        workspace: None,
        environment: None,
    };

    /// Every workspace at once: operator calls whose answers span workspaces (the global
    /// migration status, reloading the file) need a rule granting `workspaces = ["*"]`.
    pub const EVERY_WORKSPACE: Scope<'static> = Scope {
        workspace: Some(ALL_WORKSPACES),
        environment: None,
    };

    pub fn workspace(workspace: &'a str) -> Self {
        Scope {
            workspace: Some(workspace),
            environment: None,
        }
    }

    pub fn credential(workspace: &'a str, environment: &'a str) -> Self {
        Scope {
            workspace: Some(workspace),
            environment: Some(environment),
        }
    }
}

/// The access policy. With no `[[access]]` rules the socket's own owner and group (and a TCP
/// token holder) may do everything, and nobody else: the socket mode already keeps others out.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<AccessRule>,
    owner_uid: u32,
    owner_gid: u32,
}

impl Policy {
    pub fn new(rules: Vec<AccessRule>, owner_uid: u32, owner_gid: u32) -> Self {
        Self {
            rules,
            owner_uid,
            owner_gid,
        }
    }

    fn matches(rule: &AccessRule, caller: &Caller) -> bool {
        match (&rule.principal, caller) {
            (Principal::Uid(u), Caller::Unix { uid, .. }) => u == uid,
            (Principal::Gid(g), Caller::Unix { gid, .. }) => g == gid,
            (Principal::Tcp, Caller::Tcp) => true,
            _ => false,
        }
    }

    /// Whether `caller` may do `action` within `scope`.
    pub fn allows(&self, caller: &Caller, action: Action, scope: Scope<'_>) -> bool {
        self.grants(caller, scope, |rule| match action {
            Action::View => true,
            Action::Read => rule.read,
            Action::Use => rule.use_credentials,
            Action::Write => rule.write,
            Action::Admin => rule.admin,
        })
    }

    /// Whether a rule for `caller` within `scope` grants what `action` asks of it.
    fn grants(
        &self,
        caller: &Caller,
        scope: Scope<'_>,
        action: impl Fn(&AccessRule) -> bool,
    ) -> bool {
        if self.rules.is_empty() {
            return match caller {
                Caller::Unix { uid, gid, .. } => *uid == self.owner_uid || *gid == self.owner_gid,
                Caller::Tcp => true,
            };
        }
        self.rules.iter().any(|rule| {
            Self::matches(rule, caller)
                && scope
                    .environment
                    .is_none_or(|env| rule.allows_environment(env))
                && scope.workspace.is_none_or(|w| rule.allows_workspace(w))
                && action(rule)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(uid: u32, gid: u32) -> Caller {
        Caller::Unix {
            uid,
            gid,
            pid: Some(1),
        }
    }

    #[test]
    fn without_rules_only_owner_and_group() {
        let p = Policy::new(vec![], 100, 200);
        assert!(p.allows(
            &unix(100, 1),
            Action::Write,
            Scope::credential("default", "Production")
        ));
        assert!(p.allows(&unix(5, 200), Action::Admin, Scope::ANY));
        assert!(!p.allows(
            &unix(5, 6),
            Action::Read,
            Scope::credential("default", "Production")
        ));
    }

    #[test]
    fn rules_scope_environments_and_actions() {
        let rules = vec![
            AccessRule {
                principal: Principal::Uid(1000),
                environments: Some(vec!["Sandbox".into()]),
                workspaces: Some(vec!["default".into()]),
                read: true,
                use_credentials: true,
                write: false,
                admin: false,
            },
            AccessRule {
                principal: Principal::Gid(50),
                environments: None,
                workspaces: None,
                read: true,
                use_credentials: true,
                write: true,
                admin: true,
            },
        ];
        let p = Policy::new(rules, 0, 0);
        let worker = unix(1000, 1000);
        assert!(p.allows(
            &worker,
            Action::Read,
            Scope::credential("default", "Sandbox")
        ));
        assert!(!p.allows(
            &worker,
            Action::Read,
            Scope::credential("default", "Production")
        ));
        assert!(!p.allows(
            &worker,
            Action::Write,
            Scope::credential("default", "Sandbox")
        ));
        assert!(!p.allows(&worker, Action::Admin, Scope::ANY));
        assert!(p.allows(&unix(7, 50), Action::Admin, Scope::ANY));
        assert!(
            !p.allows(&unix(0, 0), Action::Read, Scope::ANY),
            "owner has no implicit access once rules exist"
        );
        assert!(!p.allows(
            &Caller::Tcp,
            Action::Read,
            Scope::credential("default", "Sandbox")
        ));
    }
}

#[cfg(test)]
mod workspace_tests {
    use super::*;

    #[test]
    fn rules_scope_workspaces() {
        let rule = |workspaces: Option<Vec<String>>| AccessRule {
            principal: Principal::Uid(7),
            environments: None,
            workspaces,
            read: true,
            use_credentials: true,
            write: true,
            admin: true,
        };
        let caller = Caller::Unix {
            uid: 7,
            gid: 7,
            pid: None,
        };
        let p = Policy::new(vec![rule(Some(vec!["acme".into()]))], 0, 0);
        assert!(p.allows(
            &caller,
            Action::Write,
            Scope::credential("acme", "Production")
        ));
        assert!(!p.allows(
            &caller,
            Action::Read,
            Scope::credential("globex", "Production")
        ));
        assert!(!p.allows(&caller, Action::Admin, Scope::workspace("default")));
        assert!(p.allows(&caller, Action::Read, Scope::ANY));
        let all = Policy::new(vec![rule(None)], 0, 0);
        assert!(all.allows(&caller, Action::Admin, Scope::workspace("globex")));
        // Calls that span workspaces need a rule granting them all.
        assert!(!p.allows(&caller, Action::Admin, Scope::EVERY_WORKSPACE));
        assert!(all.allows(&caller, Action::Admin, Scope::EVERY_WORKSPACE));
        let owner = Caller::Unix {
            uid: 0,
            gid: 0,
            pid: None,
        };
        assert!(Policy::new(vec![], 0, 0).allows(&owner, Action::Admin, Scope::EVERY_WORKSPACE));
    }
}

#[cfg(test)]
mod use_tests {
    use super::*;

    #[test]
    fn a_worker_may_use_without_reading() {
        let worker = Caller::Unix {
            uid: 1000,
            gid: 1000,
            pid: None,
        };
        let p = Policy::new(
            vec![AccessRule {
                principal: Principal::Uid(1000),
                environments: Some(vec!["Production".into()]),
                workspaces: None,
                read: false,
                use_credentials: true,
                write: false,
                admin: false,
            }],
            0,
            0,
        );
        let production = Scope::credential("default", "Production");
        assert!(p.allows(&worker, Action::Use, production));
        assert!(!p.allows(&worker, Action::Read, production));
        assert!(p.allows(&worker, Action::View, production));
        let sandbox = Scope::credential("default", "Sandbox");
        assert!(!p.allows(&worker, Action::View, sandbox));
        assert!(!p.allows(&worker, Action::Use, sandbox));
    }
}
