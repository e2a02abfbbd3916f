//! `tunnelfleet-coordinator --config coordinator.toml`: the coordinator's command line. The
//! binary is a one-line `main` over [`main`], so the tests build the same program into their own
//! binary (with the test build's features, no second compile of the workspace).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::server::{self, CoordinatorConfig};
use anyhow::Context;
use clap::{CommandFactory, Parser};
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
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Move a fleet's state into another store, every record as it is (versions, history,
    /// groups, tokens, revocations, alerts, the outbox, the audit log). Stop the coordinator
    /// that owns the source first; start the coordinators on the destination after.
    #[command(
        after_help = "Example:\n  tunnelfleet-coordinator migrate --from sled:/var/lib/tunnelfleet/coordinator --to etcd:https://etcd-1:2379,https://etcd-2:2379,https://etcd-3:2379 --etcd-ca /etc/tunnelfleet/etcd/ca.pem --etcd-cert /etc/tunnelfleet/etcd/coordinator.pem --etcd-key /etc/tunnelfleet/etcd/coordinator.key"
    )]
    Migrate {
        /// The source: `sled:DIR`.
        #[arg(long)]
        from: String,
        /// The destination: `etcd:URL[,URL…]` (an empty prefix).
        #[arg(long)]
        to: String,
        /// The destination's key prefix.
        #[arg(long, default_value = "/tunnelfleet/")]
        etcd_prefix: String,
        /// The CA etcd's certificates are checked against.
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        /// A client certificate for etcd.
        #[arg(long, requires = "etcd_key")]
        etcd_cert: Option<PathBuf>,
        /// Its key (0600).
        #[arg(long, requires = "etcd_cert")]
        etcd_key: Option<PathBuf>,
    },
}

/// The command line's definition, for what is generated from it (man pages, completions).
pub fn command() -> clap::Command {
    Args::command()
}

/// Runs the program from the process arguments: 0 after a clean shutdown, 1 on an error
/// (printed to stderr).
pub fn main() -> ExitCode {
    let args = Args::parse();
    let _telemetry = telemetry::init(args.log_format, "info", "tunnelfleet-coordinator");
    if let Some(Cmd::Migrate {
        from,
        to,
        etcd_prefix,
        etcd_ca,
        etcd_cert,
        etcd_key,
    }) = args.command
    {
        let dest = Destination {
            to,
            prefix: etcd_prefix,
            ca: etcd_ca,
            cert: etcd_cert,
            key: etcd_key,
        };
        return match migrate(&from, dest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tunnelfleet-coordinator migrate: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
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

/// Where `migrate` writes.
struct Destination {
    to: String,
    prefix: String,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn migrate(from: &str, dest: Destination) -> anyhow::Result<()> {
    let Some(dir) = from.strip_prefix("sled:") else {
        anyhow::bail!("--from {from:?}: expected sled:DIR");
    };
    let Some(urls) = dest.to.strip_prefix("etcd:") else {
        anyhow::bail!("--to {:?}: expected etcd:URL[,URL…]", dest.to);
    };
    let endpoints: Vec<String> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        anyhow::bail!("--to {:?}: names no etcd member", dest.to);
    }
    let mut etcd = crate::store::EtcdConfig::new(endpoints);
    etcd.prefix = dest.prefix;
    etcd.ca = dest.ca;
    etcd.cert = dest.cert;
    etcd.key = dest.key;
    let source = crate::store::Store::open(std::path::Path::new(dir))
        .with_context(|| format!("--from {from}: (is its coordinator still running?)"))?;
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async {
        let to = crate::store::Store::open_etcd(&etcd).await?;
        let copied = source.copy_into(&to).await?;
        let mut total = 0;
        for (family, n) in &copied.families {
            println!("{family:>15}  {n}");
            total += n;
        }
        println!(
            "moved {total} records (fleet version {}) from {from} to {}",
            source.fleet_version()?,
            dest.to
        );
        anyhow::Ok(())
    })
}
