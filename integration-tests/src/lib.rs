//! Test harness: real OpenSSH `sshd` instances and small real services, for the end-to-end
//! tests and the benchmarks.
//!
//! Everything binds 127.0.0.1 (or a test host's own address in a network namespace) on a port
//! the OS chose, keys are throwaway files in a temp dir, and every process is killed on drop
//! (and with the test process, [`children`]). Tests that need sshd call [`Sshd::available`]: it fails
//! the test when `CI` is set and sshd is missing, and elsewhere says why the test was skipped.
//! Every helper is re-exported here, so tests write `integration_tests::Sshd`.
//!
//! # Layout
//! - [`sshd`]: real OpenSSH servers and their faults.
//! - [`etcd`]: real etcd clusters on loopback, members killed and restarted.
//! - [`faults`]: signals to processes, groups and descendants.
//! - [`children`]: every process a test starts dies with the test process (`spawn_owned`).
//! - [`netns`]: test hosts in network namespaces on 198.18.0.0/15 (blackholes, cut links) and
//!   an HTTP server inside one.
//! - [`skip`]: a skipped test says so where the run's reader sees it.
//! - [`ports`]: free ports, never twice per process.
//! - [`services`]: echo, HTTP, SOCKS, SSH banners, secret files.
//! - [`wait`]: polling with a deadline.
//! - [`agent`]: an agent in this process.
//! - [`coordinator`]: coordinators in this process and as a process.
//! - [`sim`]: simulated agents (benchmarks).
//! - [`programs`]: the test binaries and the `dist` builds.
//! - [`smtp`]: an SMTP receiver for the email hook.
//! - [`browser`]: a real headless Chromium over WebDriver, for the fleet page.

#![forbid(unsafe_code)]

pub mod agent;
pub mod browser;
pub mod children;
pub mod coordinator;
pub mod etcd;
pub mod faults;
pub mod netns;
pub mod ports;
pub mod programs;
pub mod services;
pub mod sim;
pub mod skip;
pub mod smtp;
pub mod sshd;
pub mod wait;

pub use agent::*;
pub use browser::Browser;
pub use children::SpawnOwned;
pub use coordinator::*;
pub use etcd::EtcdCluster;
pub use faults::*;
pub use netns::*;
pub use ports::*;
pub use programs::*;
pub use services::*;
pub use sim::*;
pub use sshd::*;
pub use tunnelfleet_standins::services::{HttpService, Received, WebhookSink};
pub use wait::*;
