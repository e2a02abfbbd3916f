//! `tunnelfleet-coordinator --config coordinator.toml` (all of it lives in
//! [`tunnelfleet_coordinator::cli`]).

fn main() -> std::process::ExitCode {
    tunnelfleet_coordinator::cli::main()
}
