//! `tunnelfleet-coordinator --config coordinator.toml`: the coordinator's command line. The
//! binary is a one-line `main` over [`main`], so the tests build the same program into their own
//! binary (with the test build's features, no second compile of the workspace).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::server::{self, CoordinatorConfig};
use anyhow::Context;
use clap::Parser;
use tunnelfleet_runtime::telemetry::{self, LogFormat};

/// The tunnelfleet coordinator: fleet state, profile pushes, the admin API.
#[derive(Parser, Debug)]
#[command(name = "tunnelfleet-coordinator", version, about)]
struct Args {
    /// Configuration file.
    #[arg(
        short,
        long,
        env = "TUNNELFLEET_COORDINATOR_CONFIG",
        default_value = "/etc/tunnelfleet/coordinator.toml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
}

/// Runs the program from the process arguments: 0 after a clean shutdown, 1 on an error
/// (printed to stderr).
pub fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = telemetry::init(args.log_format, "info", "tunnelfleet-coordinator");
    let result = (|| {
        let cfg = CoordinatorConfig::load(&args.config)?;
        let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
        rt.block_on(async {
            let shutdown =
                tunnelfleet_runtime::shutdown::on_signals().context("signal handlers")?;
            server::bind(&cfg).await?.run(shutdown).await;
            anyhow::Ok(())
        })
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnelfleet-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}
