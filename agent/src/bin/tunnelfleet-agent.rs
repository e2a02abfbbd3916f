//! `tunnelfleet-agent --config agent.toml` (all of it lives in [`tunnelfleet_agent::cli`]).

fn main() -> std::process::ExitCode {
    tunnelfleet_agent::cli::main()
}
