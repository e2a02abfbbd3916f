//! tunnelfleet operator tooling: the `tunnelfleet` CLI's pieces, the self-contained demo and
//! what it embeds.
//!
//! # Layout
//! - [`api`]: the client of the coordinator's admin API.
//! - [`cli`]: the `tunnelfleet` command line, its argument tree apart from a file per command
//!   group (the binary is a one-line `main` over it).
//! - [`audit`]: `tunnelfleet audit`: keys, sshd settings, sockets, failed logins, own config.
//! - [`import`]: `tunnelfleet profiles import`: seed 004's profile lines, ssh command lines.
//! - [`demo`]: `tunnelfleet demo`, the seed's tunnel set with a failover, end to end, on the
//!   stand-ins of `tunnelfleet-standins` (an embedded OMA, services, ports, waiting).
//! - [`net`]: `tunnelfleet net check`: DNS, latency, ports, SSH banners; `net bandwidth`.
//! - [`sshd_sessions`]: the sessions an OMA's sshd holds per agent (its log and the kernel's TCP
//!   table agreeing), and ending a revoked agent's (`oma sync`).
//! - [`render`]: human tables (tunnels, agents, OMA endpoints, alerts, plans).

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod demo;
pub mod import;
pub mod render;
pub mod sshd_sessions;

// The checks run on the agent too (`--agent ID`), so they live in the agent library.
pub use tunnelfleet_agent::{audit, net};
