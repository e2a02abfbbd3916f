//! `tunnelfleet man --out DIR`: man pages of the three programs (and of every subcommand),
//! rendered by clap_mangen from the same clap definitions as their `--help`, so the pages the
//! packages ship cannot drift from the binaries.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

use super::args::Cli;

/// Writes `PROGRAM.1` and `PROGRAM-SUBCOMMAND….1` for each program (or only `program`) into `out`.
pub fn write_pages(out: &Path, program: Option<&str>) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let programs = [
        ("tunnelfleet", Cli::command()),
        ("tunnelfleet-agent", tunnelfleet_agent::cli::command()),
        (
            "tunnelfleet-coordinator",
            tunnelfleet_coordinator::cli::command(),
        ),
    ];
    for (name, command) in programs {
        if program.is_some_and(|p| p != name) {
            continue;
        }
        clap_mangen::generate_to(command, out)
            .with_context(|| format!("{}: writing the man pages of {name}", out.display()))?;
    }
    Ok(())
}
