//! `tunnelfleet-agent --config agent.toml`: the agent's command line. The binary is a one-line
//! `main` over [`main`], so the tests build the same program into their own binary (with the test
//! build's features, no second compile of the workspace).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::AgentConfig;
use anyhow::Context;
use clap::{CommandFactory, Parser};
use tunnelfleet_runtime::telemetry::{self, LogFormat};

/// Holds this appliance's SSH tunnels: forwards, health checks, reconnects and failover.
#[derive(Parser, Debug)]
#[command(name = "tunnelfleet-agent", version, about)]
struct Args {
    /// Configuration file.
    #[arg(
        short,
        long,
        env = "TUNNELFLEET_AGENT_CONFIG",
        default_value = "/etc/tunnelfleet/agent.toml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "TUNNELFLEET_LOG_FORMAT")]
    log_format: LogFormat,
    /// Runtime worker threads. 0 (the default) runs everything on one thread: measured faster
    /// and smaller for an appliance's few sessions (BENCHMARKS.md); raise it for many busy
    /// profiles.
    #[arg(long, default_value_t = 0, env = "TUNNELFLEET_WORKER_THREADS")]
    worker_threads: usize,
    /// Check the configuration (and identity files) and exit.
    #[arg(long)]
    check: bool,
}

/// The command line's definition, for what is generated from it (man pages, completions).
pub fn command() -> clap::Command {
    Args::command()
}

/// Runs the program from the process arguments: 0 after a clean shutdown, 1 on an error
/// (printed to stderr).
pub fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = telemetry::init(args.log_format, "info,russh=warn", "tunnelfleet-agent");
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnelfleet-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(&args.config)?;
    if args.check {
        crate::supervisor::Supervisor::new(&cfg)?;
        println!(
            "{}: ok ({} profiles)",
            args.config.display(),
            cfg.profiles.len()
        );
        for p in &cfg.profiles {
            print!("{}", crate::placement::describe(p));
        }
        return Ok(());
    }
    let mut builder = if args.worker_threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.worker_threads);
        b
    };
    let rt = builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let shutdown =
            tunnelfleet_runtime::shutdown::on_signals().context("installing signal handlers")?;
        crate::agent::run(cfg, shutdown).await?;
        anyhow::Ok(())
    })
}
