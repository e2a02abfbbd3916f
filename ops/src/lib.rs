//! tunnelfleet operator tooling: the `tunnelfleet` CLI's pieces, the self-contained demo and
//! what it embeds.
//!
//! # Layout
//! - [`api`]: the client of the coordinator's admin API.
//! - [`cli`]: the `tunnelfleet` command line, its argument tree apart from a file per command
//!   group (the binary is a one-line `main` over it).
//! - [`audit`]: `tunnelfleet audit`: keys, sshd settings, sockets, failed logins, own config.
//! - [`import`]: `tunnelfleet profiles import`: seed 004's profile lines, ssh command lines.
//! - [`demo`]: `tunnelfleet demo`, the seed's tunnel set with a failover, end to end.
//! - [`net`]: `tunnelfleet net check`: DNS, latency, ports, SSH banners; `net bandwidth`.
//! - [`sshd_sessions`]: the sessions an OMA's sshd holds per agent (its log and the kernel's TCP
//!   table agreeing), and ending a revoked agent's (`oma sync`).
//! - [`embedded_oma`]: an embedded OMA (russh SSH server) for the demo.
//! - [`services`]: small HTTP and echo services standing in for OMA/VMA APIs and NBD, and a
//!   webhook receiver.
//! - [`ports`]: free ports, never twice per process (the demo and the tests).
//! - [`wait`]: polling with a deadline (the demo and the tests).
//! - [`render`]: human tables (tunnels, agents, OMA endpoints, alerts, plans).

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod demo;
pub mod embedded_oma;
pub mod import;
pub mod ports;
pub mod render;
pub mod services;
pub mod sshd_sessions;
pub mod wait;

// The checks run on the agent too (`--agent ID`), so they live in the agent library.
pub use tunnelfleet_agent::{audit, net};
