//! `tunnelfleet`, the operator CLI. The binary is a one-line `main` over [`main`], so that the
//! tests can build the same CLI into their own binary (same features as the test build, no
//! second compile of the workspace).
//!
//! # Layout
//! - this module: `main` (runtime, logging, exit codes) and the dispatch of each command.
//! - [`args`]: the argument tree, and nothing that runs it.
//! - one file per command group: [`tunnels`], [`agents`], [`profiles`] (with `assign`,
//!   `rollout`), [`oma`], [`alerts`], [`watch`], [`access`] (join and admin tokens,
//!   revocation, the audit log), [`coordinators`], [`pki`], [`net`], [`audit`], [`config`]
//!   (`config set`: a daemon's config file edited and checked).
//! - [`man`]: man pages of the three programs, generated from their clap definitions.
//! - [`oma_sync`]: `oma sync` and `oma sshd-config`: what an OMA's sshd reads of the fleet.
//! - [`output`]: printing for people and for `--json`.

pub mod access;
pub mod agents;
pub mod alerts;
pub mod args;
pub mod audit;
pub mod config;
pub mod coordinators;
pub mod man;
pub mod net;
pub mod oma;
pub mod oma_sync;
pub mod output;
pub mod pki;
pub mod profiles;
pub mod tunnels;
pub mod watch;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use tunnelfleet_agent::control::ControlError;
use tunnelfleet_runtime::telemetry::{self, LogFormat};

use crate::demo;
use args::{Cli, Command};

/// Exit code when the agent cannot be reached.
const EXIT_UNREACHABLE: u8 = 3;

/// Runs the `tunnelfleet` command line from the process arguments; the exit code says how it went
/// (see the `--help` text).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings only: the commands print their own results. The demo's screen is its story:
    // its components log to a file (plain text, info and up) unless --verbose.
    let demo_log = matches!(cli.command, Command::Demo { verbose: false })
        .then(|| std::env::temp_dir().join("tunnelfleet-demo.log"));
    let file = demo_log
        .as_ref()
        .and_then(|p| std::fs::File::create(p).ok());
    let demo_log = demo_log.filter(|_| file.is_some());
    let _telemetry = match file {
        Some(f) => telemetry::init_to_file(f, "info", "tunnelfleet"),
        None => telemetry::init(LogFormat::Human, "warn", "tunnelfleet"),
    };
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
    let result = rt.block_on(run(cli));
    if let Some(log) = &demo_log {
        println!(
            "logs of every component: {} (tunnelfleet demo --verbose shows them inline)",
            log.display()
        );
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tunnelfleet: {e:#}");
            if e.downcast_ref::<ControlError>().is_some()
                || matches!(
                    e.downcast_ref::<crate::api::ApiError>(),
                    Some(crate::api::ApiError::Unreachable { .. })
                )
            {
                ExitCode::from(EXIT_UNREACHABLE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo { .. } => {
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
            agent: Some(agent),
            api,
            action,
            ..
        } => {
            tunnels::remote_tunnels(
                &api.client()?,
                &agent,
                tunnels::remote_action(action)?,
                cli.json,
            )
            .await
        }
        Command::Tunnels {
            socket,
            config,
            action,
            ..
        } => tunnels::tunnels(&tunnels::control_socket(socket, &config)?, action, cli.json).await,
        Command::Net { action } => net::net(action, cli.json).await,
        Command::Pki { action } => pki::pki(action, cli.json),
        Command::Man { out, program } => {
            man::write_pages(&out, program.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            action: args::ConfigAction::Set { file, settings },
        } => {
            config::set(&file, &settings)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agents { api, action } => agents::fleet_agents(&api, action, cli.json).await,
        Command::Profiles { api, action } => profiles::fleet_profiles(&api, action, cli.json).await,
        Command::Assign {
            api,
            profile,
            agent,
            labels,
        } => profiles::assign(&api, profile, agent, labels, cli.json).await,
        Command::Oma { api, action } => oma::oma(&api.client()?, action, cli.json).await,
        Command::Watch {
            api,
            interval,
            count,
        } => watch::watch(&api.client()?, interval, count, cli.json).await,
        Command::Token { api, action } => access::token(&api.client()?, action, cli.json).await,
        Command::AdminToken { api, action } => {
            access::admin_token(&api.client()?, action, cli.json).await
        }
        Command::AuditLog { api, since, limit } => {
            access::audit_log(&api.client()?, since, limit, cli.json).await
        }
        Command::Alerts { api, action } => alerts::alerts(&api.client()?, action, cli.json).await,
        Command::Coordinators { api } => coordinators::coordinators(&api.client()?, cli.json).await,
        Command::Rollout { api, action } => profiles::rollout(&api, action, cli.json).await,
        Command::Audit {
            agent,
            all,
            api,
            fail_on,
            ..
        } if agent.is_some() || all => {
            audit::remote_audit(&api.client()?, agent, fail_on, cli.json).await
        }
        Command::Audit { opts, fail_on, .. } => audit::local(opts, fail_on, cli.json).await,
    }
}
