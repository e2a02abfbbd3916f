//! tunnelfleet coordinator: the fleet's CA and the QUIC control link the agents connect to.
//!
//! # Layout
//! - [`pki`]: the fleet CA; coordinator and agent certificates.
//! - [`tls`]: mutual-TLS QUIC settings; the agent id from a verified certificate.
//! - [`udp`]: the control link's UDP socket, buffers sized for thousands of agents.
//! - [`enroll`]: join tokens, enrollment of new agents, revocation.
//! - [`link`]: accepting agents: hello checked against the certificate, heartbeats.
//! - [`hooks`]: alert delivery to webhooks, Slack, Alertmanager, email and commands, through
//!   the durable outbox.
//! - [`email`]: the email hook: SMTP with STARTTLS or TLS by default.
//! - [`metrics`]: Prometheus `/metrics` through OpenTelemetry.
//! - [`plan`]: `profiles diff`: what applying a file would change, before it is applied.
//! - [`store`]: fleet state in sled; every acknowledged write flushed first.
//! - [`admin`]: the admin HTTP API (bearer token) the CLI drives.
//! - [`server`]: `run`, the whole coordinator as one call.
//! - [`cli`]: the `tunnelfleet-coordinator` command line (the binary is a one-line `main` over
//!   it).

pub mod admin;
pub mod cli;
pub mod enroll;
pub mod fleet;
pub mod gauges;
pub mod hooks;
pub mod link;
pub mod metrics;
pub mod monitor;
pub mod pki;
pub mod plan;
pub mod server;
pub mod store;
pub mod tls;
pub mod udp;
pub mod watch;
