//! `tunnelfleet`: the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::control::{self, ControlError, Request, Response};
use tunnelfleet_agent::telemetry::{self, LogFormat};
use tunnelfleet_ops::{demo, render};

/// Exit code when the agent cannot be reached.
const EXIT_UNREACHABLE: u8 = 3;

/// Operate tunnelfleet: the local agent's tunnels, and the demo.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Examples:\n  tunnelfleet demo\n  tunnelfleet tunnels status\n  tunnelfleet tunnels restart oma --socket /run/tunnelfleet/agent.sock\n  tunnelfleet tunnels list --json | jq '.profiles[].name'"
)]
struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The local agent's tunnels (through its control socket).
    Tunnels {
        /// Agent control socket.
        #[arg(long, env = "TUNNELFLEET_SOCKET", global = true)]
        socket: Option<PathBuf>,
        /// Read the socket path from this agent config instead.
        #[arg(long, global = true, default_value = "/etc/tunnelfleet/agent.toml")]
        config: PathBuf,
        #[command(subcommand)]
        action: TunnelAction,
    },
    /// Run the whole system on this machine with nothing set up: embedded OMA pair, one agent
    /// with the seed's tunnels, a failover.
    Demo,
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum TunnelAction {
    /// Profiles with their endpoints and state.
    List,
    /// Every profile and forward: state, endpoint, uptime, reconnects, health, bytes.
    Status,
    /// Start a stopped profile.
    Start {
        /// Profile name.
        name: String,
    },
    /// Stop a profile (drains open connections first).
    Stop {
        /// Profile name.
        name: String,
    },
    /// Re-establish a profile's session now.
    Restart {
        /// Profile name.
        name: String,
    },
    /// Run a profile's health check now (exit 1 when it fails).
    Health {
        /// Profile name.
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Command::Demo => "tunnelfleet_agent=info,warn",
        _ => "warn",
    };
    telemetry::init(LogFormat::Human, default_filter);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnelfleet: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tunnelfleet: {e:#}");
            if e.downcast_ref::<ControlError>().is_some() {
                ExitCode::from(EXIT_UNREACHABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo => {
            let mut out = std::io::stdout();
            let report = demo::run(&mut out).await?;
            if cli.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "tunnelfleet",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Tunnels {
            socket,
            config,
            action,
        } => {
            let socket = match socket {
                Some(s) => s,
                None => {
                    AgentConfig::load(&config)
                        .with_context(|| "finding the agent's control socket (or pass --socket)")?
                        .agent
                        .control_socket
                }
            };
            tunnels(&socket, action, cli.json).await
        }
    }
}

async fn tunnels(
    socket: &std::path::Path,
    action: TunnelAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let req = match &action {
        TunnelAction::List | TunnelAction::Status => Request::Status,
        TunnelAction::Start { name } => Request::Start { name: name.clone() },
        TunnelAction::Stop { name } => Request::Stop { name: name.clone() },
        TunnelAction::Restart { name } => Request::Restart { name: name.clone() },
        TunnelAction::Health { name } => Request::Health { name: name.clone() },
    };
    let resp = control::call(socket, &req).await?;
    if json {
        let value = match &resp {
            Response::Status(s) => serde_json::to_value(s)?,
            other => serde_json::to_value(other)?,
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    let code = match resp {
        Response::Status(s) => {
            if !json {
                match action {
                    TunnelAction::List => print!("{}", render::list(&s)),
                    _ => print!("{}", render::status(&s)),
                }
            }
            ExitCode::SUCCESS
        }
        Response::Ok { message } => {
            if !json {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
        Response::Health(r) => {
            if !json {
                println!("{}", render::health(&r));
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Response::Error { message } => {
            eprintln!("tunnelfleet: {message}");
            ExitCode::FAILURE
        }
    };
    Ok(code)
}
