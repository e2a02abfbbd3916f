//! Test harness: real OpenSSH `sshd` instances and small real services, for the end-to-end
//! tests and the benchmarks.
//!
//! Everything binds 127.0.0.1 on a port the OS chose, keys are throwaway files in a temp dir,
//! and every process is killed on drop. Tests that need sshd call [`Sshd::available`]: it fails
//! the test when `CI` is set and sshd is missing, and elsewhere says why the test was skipped.
//! Every helper is re-exported here, so tests write `integration_tests::Sshd`.
//!
//! # Layout
//! - [`sshd`]: real OpenSSH servers and their faults.
//! - [`faults`]: signals to processes, groups and descendants.
//! - [`ports`]: free ports, never twice per process.
//! - [`services`]: echo, HTTP, SOCKS, SSH banners, secret files.
//! - [`wait`]: polling with a deadline.
//! - [`agent`]: an agent in this process.
//! - [`coordinator`]: coordinators in this process and as a process.
//! - [`sim`]: simulated agents (benchmarks).
//! - [`programs`]: the test binaries and the `dist` builds.
//! - [`smtp`]: an SMTP receiver for the email hook.

pub mod agent;
pub mod coordinator;
pub mod faults;
pub mod ports;
pub mod programs;
pub mod services;
pub mod sim;
pub mod smtp;
pub mod sshd;
pub mod wait;

pub use agent::*;
pub use coordinator::*;
pub use faults::*;
pub use ports::*;
pub use programs::*;
pub use services::*;
pub use sim::*;
pub use sshd::*;
pub use tunnelfleet_ops::services::{HttpService, Received, WebhookSink};
pub use wait::*;
