//! `tunnelfleet-agent` as the tests run it: the same `main`, built by `cargo test` with the test build's
//! features, so that no test starts a second compile of the workspace (which once doubled the
//! target dir and filled CI's disk). See [`integration_tests::Program`].

fn main() -> std::process::ExitCode {
    tunnelfleet_agent::cli::main()
}
