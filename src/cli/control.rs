//! `credproxy managers …` and `credproxy routing …`: the control-plane API from a shell, over
//! the running daemon's socket. Access details are never taken from the command line (where
//! `ps` and shell history would keep them): `managers add` reads the whole body from a file or
//! standard input.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;

use crate::config::DEFAULT_CONFIG_PATH;

/// Where the daemon listens: `--socket`, or the socket named in the config file.
#[derive(Debug, Args)]
pub struct SocketArgs {
    /// The daemon's socket; defaults to the one in the configuration file.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[arg(long, short, global = true, env = "CREDPROXY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

impl SocketArgs {
    pub fn socket(&self) -> Result<PathBuf, ExitCode> {
        match &self.socket {
            Some(s) => Ok(s.clone()),
            None => crate::config::Config::load(&self.config)
                .map(|c| c.server.socket)
                .map_err(|e| {
                    eprintln!("{}: {e}", self.config.display());
                    ExitCode::from(2)
                }),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ManagersCommand {
    /// List the secrets managers (no access details).
    List {
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Show one secrets manager.
    Get { id: String },
    /// Create a secrets manager from the JSON body of `POST /v1/secretsmanagers`
    /// (`{workspace?, id?, name, type, settings, auth}`), read from FILE or `-` (stdin).
    Add {
        #[arg(long)]
        body: PathBuf,
    },
    /// Delete a secrets manager; with --dry-run, only say where its credentials would go.
    Delete {
        id: String,
        #[arg(long)]
        dry_run: bool,
        /// Delete the credentials that cannot move (a read-only manager's).
        #[arg(long)]
        delete_credentials: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoutingCommand {
    /// Show a workspace's routing.
    Get {
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Replace a workspace's routing; credentials it puts elsewhere move in the background.
    Set {
        #[arg(long)]
        workspace: Option<String>,
        /// The default manager id.
        #[arg(long)]
        default: Option<String>,
        /// `Environment=manager-id`, repeatable.
        #[arg(long = "env", value_name = "ENV=ID")]
        environments: Vec<String>,
    },
}

pub async fn managers(socket: &Path, command: ManagersCommand) -> ExitCode {
    match command {
        ManagersCommand::List { workspace } => {
            let path = match workspace {
                Some(w) => format!("/v1/secretsmanagers?workspace={}", encode(&w)),
                None => "/v1/secretsmanagers".to_owned(),
            };
            call(socket, Method::GET, &path, None).await
        }
        ManagersCommand::Get { id } => {
            let Some(id) = checked_id(&id) else {
                return ExitCode::from(2);
            };
            call(
                socket,
                Method::GET,
                &format!("/v1/secretsmanagers/{id}"),
                None,
            )
            .await
        }
        ManagersCommand::Add { body } => {
            let mut bytes = Vec::new();
            let read = if body.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut bytes)
            } else {
                std::fs::File::open(&body).and_then(|mut f| f.read_to_end(&mut bytes))
            };
            if let Err(e) = read {
                eprintln!("credproxy: {}: {e}", body.display());
                return ExitCode::from(2);
            }
            let bytes = zeroize::Zeroizing::new(bytes);
            call(
                socket,
                Method::POST,
                "/v1/secretsmanagers",
                Some(bytes.to_vec()),
            )
            .await
        }
        ManagersCommand::Delete {
            id,
            dry_run,
            delete_credentials,
        } => {
            let Some(id) = checked_id(&id) else {
                return ExitCode::from(2);
            };
            let mut path = format!("/v1/secretsmanagers/{id}");
            let mut query = Vec::new();
            if dry_run {
                query.push("dry_run=true");
            }
            if delete_credentials {
                query.push("credentials=delete");
            }
            if !query.is_empty() {
                path = format!("{path}?{}", query.join("&"));
            }
            call(socket, Method::DELETE, &path, None).await
        }
    }
}

pub async fn routing(socket: &Path, command: RoutingCommand) -> ExitCode {
    match command {
        RoutingCommand::Get { workspace } => {
            let path = match workspace {
                Some(w) => format!("/v1/routing?workspace={}", encode(&w)),
                None => "/v1/routing".to_owned(),
            };
            call(socket, Method::GET, &path, None).await
        }
        RoutingCommand::Set {
            workspace,
            default,
            environments,
        } => {
            let mut envs = serde_json::Map::new();
            for pair in environments {
                let Some((env, id)) = pair.split_once('=') else {
                    eprintln!("credproxy: --env takes ENV=ID");
                    return ExitCode::from(2);
                };
                envs.insert(env.to_owned(), serde_json::Value::String(id.to_owned()));
            }
            let body = serde_json::json!({
                "workspace": workspace,
                "default": default,
                "environments": envs,
            });
            call(
                socket,
                Method::PUT,
                "/v1/routing",
                Some(body.to_string().into_bytes()),
            )
            .await
        }
    }
}

/// A manager id goes into the path as it is: ids are letters, digits, `-`, `_` and `.`, which
/// need no escaping (the server does not decode path segments).
fn checked_id(id: &str) -> Option<&str> {
    if crate::config::is_valid_name(id) {
        Some(id)
    } else {
        eprintln!("credproxy: `{id}` is not a valid secrets manager id");
        None
    }
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Sends one request and prints the answer: the body on success, the status and body on
/// failure (exit 1), or why the daemon could not be reached (exit 1).
pub(super) async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> ExitCode {
    match crate::client::request(socket, method, path, body).await {
        Ok((status, body)) if status.is_success() => {
            println!("{}", String::from_utf8_lossy(&body));
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("credproxy: {status}: {}", String::from_utf8_lossy(&body));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "credproxy: cannot reach the daemon at {}: {e}",
                socket.display()
            );
            ExitCode::FAILURE
        }
    }
}
