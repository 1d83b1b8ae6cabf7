//! What every entry point does with a configuration before using it (start, reload,
//! `check-config`, `plan`): the checks the file alone cannot make. A manager's type and its
//! settings are checked through the type descriptors, routing targets must be writable, and
//! the user and group names of access rules are resolved to ids. An access rule must name an
//! id the kernel can report for a caller: never the overflow id (`nobody`), and, in a user
//! namespace, only ids the namespace maps.

use std::path::Path;

use crate::config::{invalid, Config, ConfigError, GroupSpec, Principal};
use crate::manager::{self, descriptor};
use crate::sys::IdMap;

/// Reads, validates and checks a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    check(Config::load(path)?)
}

/// Checks a parsed configuration and resolves the names in it.
pub fn check(config: Config) -> Result<Config, ConfigError> {
    check_with(config, &Ids::current())
}

fn check_with(mut config: Config, ids: &Ids) -> Result<Config, ConfigError> {
    for m in &config.managers {
        manager::check(m)?;
    }
    let read_only = |id: &str| {
        config
            .manager(id)
            .and_then(|m| descriptor::find(&m.kind))
            .is_some_and(|d| d.read_only)
    };
    let targets = config
        .routing
        .default
        .iter()
        .map(|id| ("routing.default".to_owned(), id))
        .chain(
            config
                .routing
                .environments
                .iter()
                .map(|(env, id)| (format!("routing.environments.{env}"), id)),
        );
    for (key, id) in targets {
        if read_only(id) {
            return Err(ConfigError::ReadOnlyTarget {
                key,
                id: id.clone(),
            });
        }
    }
    for (i, rule) in config.access.iter_mut().enumerate() {
        let (key, what, resolved) = match &rule.principal {
            Principal::User(name) => {
                let key = format!("access[{i}].user");
                let uid = crate::sys::lookup_user(name)
                    .map_err(|e| invalid(&key, e.to_string()))?
                    .ok_or_else(|| invalid(&key, format!("no such user `{name}`")))?;
                (
                    key,
                    format!("user `{name}` (uid {uid})"),
                    Principal::Uid(uid),
                )
            }
            Principal::Group(name) => {
                let key = format!("access[{i}].group");
                let gid = crate::sys::lookup_group(name)
                    .map_err(|e| invalid(&key, e.to_string()))?
                    .ok_or_else(|| invalid(&key, format!("no such group `{name}`")))?;
                (
                    key,
                    format!("group `{name}` (gid {gid})"),
                    Principal::Gid(gid),
                )
            }
            Principal::Uid(uid) => (
                format!("access[{i}].uid"),
                format!("uid {uid}"),
                Principal::Uid(*uid),
            ),
            Principal::Gid(gid) => (
                format!("access[{i}].gid"),
                format!("gid {gid}"),
                Principal::Gid(*gid),
            ),
            Principal::Tcp => continue,
        };
        ids.check_rule(&key, &what, &resolved)?;
        rule.principal = resolved;
    }
    if let Some(group) = &config.server.socket_group {
        let gid = match group {
            GroupSpec::Id(gid) => Some(*gid),
            // An unknown name is reported where the socket is made.
            GroupSpec::Name(name) => crate::sys::lookup_group(name).ok().flatten(),
        };
        if let Some(gid) = gid {
            ids.check_socket_group(gid)?;
        }
    }
    Ok(config)
}

/// What the kernel can report as a caller's uid and gid: the overflow ids stand for every
/// caller outside this process's user namespace, and only mapped ids exist inside one.
#[derive(Debug, Clone)]
pub struct Ids {
    /// `None`: no user namespace but the host's (identity map), or `/proc` does not tell.
    pub uid_map: Option<IdMap>,
    pub gid_map: Option<IdMap>,
    pub overflow_uid: u32,
    pub overflow_gid: u32,
}

const REMEDY: &str = "run credproxy in the host's user namespace (in its systemd unit, remove \
                      PrivateUsers=), or map these ids into the namespace";

impl Ids {
    /// This process's namespace, from `/proc`.
    pub fn current() -> Self {
        let (uids, gids) = crate::sys::id_maps();
        let (overflow_uid, overflow_gid) = crate::sys::overflow_ids();
        Ids {
            uid_map: uids.filter(|m| !m.is_identity()),
            gid_map: gids.filter(|m| !m.is_identity()),
            overflow_uid,
            overflow_gid,
        }
    }

    fn check_rule(&self, key: &str, what: &str, principal: &Principal) -> Result<(), ConfigError> {
        let (id, overflow, map, kind, file) = match principal {
            Principal::Uid(u) => (*u, self.overflow_uid, &self.uid_map, "uid", "uid_map"),
            Principal::Gid(g) => (*g, self.overflow_gid, &self.gid_map, "gid", "gid_map"),
            _ => return Ok(()),
        };
        if id == overflow || id == crate::sys::OVERFLOW_ID {
            return Err(invalid(
                key,
                format!(
                    "{what} is the overflow {kind} ({overflow}, `nobody`), which the kernel \
                     reports for every caller it cannot map into credproxy's user namespace: \
                     a rule for it would match all of them. Name the workers' own users or groups"
                ),
            ));
        }
        match map {
            Some(map) if !map.contains(id) => Err(invalid(
                key,
                format!(
                    "{what} is not mapped into the user namespace credproxy runs in \
                     (/proc/self/{file} maps {map}); the kernel reports such callers as \
                     {kind} {overflow}, so this rule could never match them. To fix it, {REMEDY}"
                ),
            )),
            _ => Ok(()),
        }
    }

    fn check_socket_group(&self, gid: u32) -> Result<(), ConfigError> {
        match &self.gid_map {
            Some(map) if !map.contains(gid) => Err(invalid(
                "server.socket_group",
                format!(
                    "gid {gid} is not mapped into the user namespace credproxy runs in \
                     (/proc/self/gid_map maps {map}), so the socket cannot be given that group \
                     and its members would be reported as gid {}. To fix it, {REMEDY}",
                    self.overflow_gid
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Whether callers outside some mapped range would be reported as the overflow ids.
    pub fn partial(&self) -> bool {
        self.uid_map.is_some() || self.gid_map.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        check(Config::parse(text).unwrap()).unwrap_err().to_string()
    }

    #[test]
    fn manager_types_are_checked() {
        let e = err("[[secrets_manager]]\nid = \"x\"\ntype = \"dropbox\"");
        assert!(e.contains("unknown type `dropbox`"), "{e}");
        let e = Config::parse("[[secrets_manager]]\nid = \"local\"\ntype = \"aws\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reserved"), "{e}");
    }

    #[cfg(feature = "composio")]
    #[test]
    fn read_only_managers_are_never_routing_targets() {
        let e = err("[[secrets_manager]]\nid = \"c\"\ntype = \"composio\"\napi_key = { env = \"K\" }\n[routing.environments]\nProduction = \"c\"");
        assert!(e.contains("routing.environments.Production"), "{e}");
        assert!(e.contains("read-only"), "{e}");
    }

    #[test]
    fn user_and_group_names_resolve_to_ids() {
        let c = check(
            Config::parse(
                "[[access]]\nuser = \"root\"\nenvironments = [\"*\"]\n[[access]]\ngroup = \"root\"\nenvironments = [\"*\"]",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(c.access[0].principal, Principal::Uid(0));
        assert_eq!(c.access[1].principal, Principal::Gid(0));
        let e = err("[[access]]\nuser = \"no-such-user-here\"\nenvironments = [\"*\"]");
        assert!(e.contains("access[0].user"), "{e}");
    }

    fn host() -> Ids {
        Ids {
            uid_map: None,
            gid_map: None,
            overflow_uid: 65534,
            overflow_gid: 65534,
        }
    }

    fn err_with(text: &str, ids: &Ids) -> String {
        check_with(Config::parse(text).unwrap(), ids)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn rules_for_the_overflow_ids_are_refused() {
        for (rule, key) in [
            ("uid = 65534", "access[0].uid"),
            ("gid = 65534", "access[0].gid"),
            ("uid = 70000", "access[0].uid"),
        ] {
            let ids = Ids {
                overflow_uid: 70000,
                ..host()
            };
            let e = err_with(&format!("[[access]]\n{rule}\nenvironments = [\"*\"]"), &ids);
            assert!(e.contains(key) && e.contains("overflow"), "{e}");
        }
        if crate::sys::lookup_user("nobody").unwrap() == Some(65534) {
            let e = err("[[access]]\nuser = \"nobody\"\nenvironments = [\"*\"]");
            assert!(
                e.contains("access[0].user") && e.contains("user `nobody` (uid 65534)"),
                "{e}"
            );
        }
    }

    #[test]
    fn in_a_user_namespace_rules_must_name_mapped_ids() {
        let map = |text: &str| Some(IdMap::parse(text).unwrap());
        // systemd's PrivateUsers=yes for a service user 990: root and the user only.
        let private = Ids {
            uid_map: map("0 0 1\n990 990 1"),
            gid_map: map("0 0 1\n990 990 1"),
            ..host()
        };
        let e = err_with("[[access]]\nuid = 1000\nenvironments = [\"*\"]", &private);
        assert!(
            e.contains("access[0].uid")
                && e.contains("uid 1000 is not mapped")
                && e.contains("/proc/self/uid_map maps 0-0 → 0-0, 990-990 → 990-990")
                && e.contains("PrivateUsers="),
            "{e}"
        );
        let e = err_with("[[access]]\ngid = 1000\nenvironments = [\"*\"]", &private);
        assert!(e.contains("access[0].gid") && e.contains("gid_map"), "{e}");
        let e = err_with("[server]\nsocket_group = 1000", &private);
        assert!(
            e.contains("server.socket_group") && e.contains("gid 1000"),
            "{e}"
        );
        // Mapped ids are what the kernel reports as they are: such rules work.
        let ok = "[server]\nsocket_group = 990\n[[access]]\nuid = 990\nenvironments = [\"*\"]\n[[access]]\ngid = 0\nenvironments = [\"*\"]";
        let c = check_with(Config::parse(ok).unwrap(), &private).unwrap();
        assert_eq!(c.access[0].principal, Principal::Uid(990));
        // Outside a user namespace every id is itself.
        check_with(
            Config::parse("[[access]]\nuid = 1000\nenvironments = [\"*\"]").unwrap(),
            &host(),
        )
        .unwrap();
    }
}
