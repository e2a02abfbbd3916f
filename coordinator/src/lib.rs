//! tunnelfleet coordinator: the fleet's CA and the QUIC control link the agents connect to.
//!
//! # Layout
//! - [`pki`]: the fleet CA; coordinator and agent certificates.
//! - [`sshca`]: the SSH user CA: agents' own SSH keys certified for the OMAs' sshd.
//! - [`sshd_access`]: an OMA's principals lines (each agent's ports) and revoked keys, no IO.
//! - [`tls`]: mutual-TLS QUIC settings; the agent id from a verified certificate.
//! - [`udp`]: the control link's UDP socket, buffers sized for thousands of agents.
//! - [`store`]: fleet state (sled or etcd, behind `store::engine`), one file per record family;
//!   the coordinators sharing it and their leader; every acknowledged write
//!   flushed first.
//! - [`fleet`]: the registry of connected agents: pushes, the offline sweep, commands, revocation.
//! - [`evidence`]: which agents pass health checks through which endpoint, told to agents whose
//!   checks fail there (their health rule stays when others pass).
//! - [`handshakes`]: handshakes per source address (a token bucket each), so a relinking crowd
//!   or one wild host cannot crowd out the rest.
//! - [`rate`]: token buckets per key (a burst, then a rate; keys tracked bounded), the one
//!   rate limiter: handshakes per address, hellos per agent.
//! - [`balance`]: agents spread over the coordinators of an HA set (one holding more than
//!   its share asks a few to link to another; the rule without IO).
//! - [`link`]: one control-link connection: hello checked against the certificate, heartbeats.
//! - [`enroll`]: join tokens traded for certificates on the enrollment ALPN.
//! - [`monitor`]: the alert and failover rules, no IO: endpoints, agents, checks.
//! - [`watch`]: the task that feeds the rules (probes, fleet events, operator commands) and
//!   carries out their decisions (at most `MAX_ALERTS_PER_AGENT` alerts about one agent firing).
//! - [`hooks`]: alert delivery (webhook, Slack, Alertmanager, email, command) through the
//!   durable outbox.
//! - [`metrics`]: the Prometheus registry and the instruments counted where things happen.
//! - [`gauges`]: the gauges read from the fleet and the watcher at scrape time.
//! - [`lead`]: the leader's work (watcher, outbox, rollout driver) run while this coordinator
//!   leads; pushes of versions another coordinator made.
//! - [`rollout`]: staged rollouts: canaries, waves, halt and rollback; the driver.
//! - [`plan`]: `profiles diff`: what applying a file would change, before it is applied.
//! - [`admin`]: the admin HTTP API the CLI drives (bearer token), a file per resource.
//! - [`web`]: the fleet page in a browser (its own listener, signed in with an admin token).
//! - [`admin_tls`]: the admin API over TLS with the coordinator's certificate (`admin_tls`).
//! - [`server`]: `run`, the whole coordinator as one call, wiring the rest together.
//! - [`cli`]: the `tunnelfleet-coordinator` command line (the binary is a one-line `main`).
//!
//! Dependencies point one way: `store` and `monitor` use nothing above them; `fleet` uses the
//! store; `link`, `enroll`, `watch` and `gauges` use the fleet; `admin` and `server` use them
//! all. Collaborators (the signer, metrics, the watcher's handle, the fleet's event queue) are
//! passed in at construction.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_tls;
pub mod balance;
pub mod cli;
pub mod enroll;
pub mod evidence;
pub mod fleet;
pub mod gauges;
pub mod handshakes;
pub mod hooks;
pub mod lead;
pub mod link;
pub mod metrics;
pub mod monitor;
pub mod pki;
pub mod plan;
pub mod rate;
pub mod rollout;
pub mod server;
pub mod sshca;
pub mod sshd_access;
pub mod store;
pub mod tls;
pub mod udp;
pub mod watch;
pub mod web;
