//! What every entry point does with a configuration before using it (start, reload,
//! `check-config`, `plan`): the checks the file alone cannot make. A manager's type and its
//! settings are checked through the type descriptors, routing targets must be writable, and
//! the user and group names of access rules are resolved to ids.

use std::path::Path;

use crate::config::{invalid, Config, ConfigError, Principal};
use crate::manager::{self, descriptor};

/// Reads, validates and checks a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    check(Config::load(path)?)
}

/// Checks a parsed configuration and resolves the names in it.
pub fn check(mut config: Config) -> Result<Config, ConfigError> {
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
        let resolved = match &rule.principal {
            Principal::User(name) => {
                let key = format!("access[{i}].user");
                let uid = crate::sys::lookup_user(name)
                    .map_err(|e| invalid(&key, e.to_string()))?
                    .ok_or_else(|| invalid(&key, format!("no such user `{name}`")))?;
                Principal::Uid(uid)
            }
            Principal::Group(name) => {
                let key = format!("access[{i}].group");
                let gid = crate::sys::lookup_group(name)
                    .map_err(|e| invalid(&key, e.to_string()))?
                    .ok_or_else(|| invalid(&key, format!("no such group `{name}`")))?;
                Principal::Gid(gid)
            }
            _ => continue,
        };
        rule.principal = resolved;
    }
    Ok(config)
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
}
