//! `tunnelfleet`: the operator CLI (all of it lives in [`tunnelfleet_ops::cli`]).

fn main() -> std::process::ExitCode {
    tunnelfleet_ops::cli::main()
}
