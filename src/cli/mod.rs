//! The command line: `serve`, `check-config`, `plan`, `keygen`, `get`, the control plane's
//! `managers` and `routing` (`control`), which talk to the running daemon over its socket, and
//! what packagers install beside the binary: shell completions and the man page.

mod control;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{Config, LogFormat, DEFAULT_CONFIG_PATH};

#[derive(Debug, Parser)]
#[command(
    name = "credproxy",
    version,
    about = "Serves third-party credentials from your secrets manager over a local Unix socket"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Configuration file.
        #[arg(long, short, env = "CREDPROXY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a configuration file without starting anything.
    CheckConfig {
        #[arg(long, short, env = "CREDPROXY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Show which credentials a configuration would move, and where, without touching
    /// anything (the metadata database is opened read-only; no manager is contacted).
    Plan {
        /// The configuration to plan for (its `store` settings name the database).
        #[arg(long, short)]
        config: PathBuf,
        /// The configuration in force now, to recognise read-only managers the new one no
        /// longer lists.
        #[arg(long)]
        current: Option<PathBuf>,
        /// List every credential id, not only the counts.
        #[arg(long)]
        ids: bool,
    },
    /// Write a new random master key (base64, mode 0600). Never overwrites a file.
    Keygen {
        /// Where to write the key.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Secrets managers through the running daemon's API.
    Managers {
        #[command(subcommand)]
        command: control::ManagersCommand,
        #[command(flatten)]
        target: control::SocketArgs,
    },
    /// A workspace's routing through the running daemon's API.
    Routing {
        #[command(subcommand)]
        command: control::RoutingCommand,
        #[command(flatten)]
        target: control::SocketArgs,
    },
    /// Resolve a credential through the running daemon's socket and print it as JSON.
    Get {
        /// The credential id.
        id: String,
        /// Only these secret fields (comma-separated).
        #[arg(long)]
        fields: Option<String>,
        /// The daemon's socket; defaults to the one in the configuration file.
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long, short, env = "CREDPROXY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout (`credproxy man > credproxy.1`), or write it and one
    /// page per subcommand into a directory.
    Man {
        /// Write credproxy.1 and credproxy-SUBCOMMAND.1 here instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    // reqwest (Vault) is built without a default crypto provider: use ring, the one TLS stack.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => match crate::setup::load(&config) {
            Ok(c) => {
                println!(
                    "{}: valid ({} secrets manager(s), {} access rule(s), socket {})",
                    config.display(),
                    c.managers.len(),
                    c.access.len(),
                    c.server.socket.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Plan {
            config,
            current,
            ids,
        } => plan(config, current, ids),
        Command::Keygen { out } => {
            let key = crate::manager::local::MasterKey::generate();
            match key.write_new(&out) {
                Ok(()) => {
                    println!("wrote master key {} to {}", key.id(), out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Managers { command, target } => match target.socket() {
            Ok(socket) => runtime().block_on(control::managers(&socket, command)),
            Err(code) => code,
        },
        Command::Routing { command, target } => match target.socket() {
            Ok(socket) => runtime().block_on(control::routing(&socket, command)),
            Err(code) => code,
        },
        Command::Get {
            id,
            fields,
            socket,
            config,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => match Config::load(&config) {
                    Ok(c) => c.server.socket,
                    Err(e) => {
                        eprintln!("{}: {e}", config.display());
                        return ExitCode::from(2);
                    }
                },
            };
            if !crate::config::is_valid_name(&id) {
                eprintln!("credproxy: `{id}` is not a valid credential id");
                return ExitCode::from(2);
            }
            let mut path = format!("/v1/credentials/{id}");
            if let Some(f) = fields {
                path.push_str("?fields=");
                path.push_str(
                    &percent_encoding::utf8_percent_encode(&f, percent_encoding::NON_ALPHANUMERIC)
                        .to_string(),
                );
            }
            runtime().block_on(control::call(&socket, hyper::Method::GET, &path, None))
        }
        Command::Completions { shell } => {
            // Into memory first: writing straight to a closed pipe (`| head`) would panic.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "credproxy", &mut script);
            use std::io::Write;
            match std::io::stdout().write_all(&script) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Command::Man { out_dir } => {
            let command = Cli::command();
            let written = match out_dir {
                // credproxy.1 and one page per subcommand (credproxy-serve.1, ...).
                Some(dir) => clap_mangen::generate_to(command, &dir),
                None => clap_mangen::Man::new(command).render(&mut std::io::stdout()),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("credproxy: cannot write the man page: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

pub(super) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

const THIRD_PARTY_CAP: &str =
    "rustify=warn,vaultrs=warn,reqwest=warn,hyper=warn,hyper_util=warn,h2=warn,\
     rustls=warn,aws_smithy_runtime=warn,aws_smithy_http_client=warn,aws_smithy_runtime_api=warn,\
     aws_sdk_secretsmanager=warn,aws_sdk_sts=warn,aws_config=warn,aws_sigv4=warn,aws_runtime=warn";

fn init_logging(config: &Config) {
    let level = std::env::var("CREDPROXY_LOG").unwrap_or_else(|_| config.log.level.clone());
    // SDKs and HTTP stacks may log request and response bodies at debug and trace level,
    // and those bodies carry secrets: they are capped whatever level is asked for.
    let filter = tracing_subscriber::EnvFilter::try_new(format!("{level},{THIRD_PARTY_CAP}"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{THIRD_PARTY_CAP}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Panics are logged through the log (with where they happened) instead of the default hook's
/// stderr line, and a formatted panic message is withheld: it is built from runtime values,
/// which may be secrets. A fixed message (`panic!("literal")`) is shown.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&'static str>()
            .copied()
            .unwrap_or("(message withheld: it may quote runtime values)");
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            location,
            message,
            "panic"
        );
    }));
}

fn serve(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("credproxy: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    quiet_panics();
    // Everything the daemon creates (database, WAL, generated key) is private to it; the
    // socket's mode is set explicitly.
    crate::sys::set_umask(0o077);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.server.worker_threads > 0 {
        runtime.worker_threads(config.server.worker_threads);
    }
    let runtime = runtime.enable_all().build().expect("tokio runtime");
    let shutdown = {
        let _context = runtime.enter();
        crate::lifecycle::shutdown_signal()
    };
    match runtime.block_on(crate::daemon::serve(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "credproxy could not start");
            eprintln!("credproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn plan(path: PathBuf, current: Option<PathBuf>, ids: bool) -> ExitCode {
    let load = |p: &PathBuf| {
        crate::setup::load(p).map_err(|e| {
            eprintln!("{}: {e}", p.display());
            ExitCode::from(2)
        })
    };
    let next = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let current = match current.as_ref().map(load).transpose() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let crate::config::DatabaseUrl::Sqlite(db) = &next.storage.database else {
        eprintln!("credproxy: plan reads SQLite databases; with PostgreSQL use GET /v1/migrations after a reload");
        return ExitCode::FAILURE;
    };
    let store = match crate::metadata::sqlite::SqliteMetadata::open_read_only(db) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("credproxy: {}: {e}", db.display());
            return ExitCode::FAILURE;
        }
    };
    let read_only = |id: &str| {
        [Some(&next), current.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|c| c.manager(id))
            .and_then(|m| crate::manager::descriptor::find(&m.kind))
            .is_some_and(|d| d.read_only)
    };
    let topology = crate::routing::Topology::from_config(&next);
    let moves = match runtime().block_on(crate::migrate::plan(&store, &topology, &read_only)) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("credproxy: {e}");
            return ExitCode::FAILURE;
        }
    };
    if moves.is_empty() {
        println!("every credential is where {} puts it", path.display());
        return ExitCode::SUCCESS;
    }
    println!("{} credential(s) would move:", moves.len());
    for ((source, target), n) in crate::migrate::summarize(&moves) {
        println!("  {source} -> {target}: {n}");
    }
    let fallbacks = moves.iter().filter(|m| m.pin_unavailable).count();
    if fallbacks > 0 {
        println!("  ({fallbacks} pinned to a manager that is no longer configured; they fall back along the chain)");
    }
    if ids {
        for m in &moves {
            println!("{} {} -> {}", m.id, m.source, m.target);
        }
    }
    ExitCode::SUCCESS
}
