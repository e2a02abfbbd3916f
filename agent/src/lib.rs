//! tunnelfleet agent: holds an appliance's SSH tunnels in-process and keeps them alive.
//!
//! One SSH session per profile carries all its forwards (`L`, `R`, `D`), verified against
//! known_hosts or pinned fingerprints, kept alive, reconnected with jittered backoff, failed
//! over to the next endpoint, and health-checked through the tunnel. It replaces `ssh -L … -R …`
//! under autossh or a bash loop.
//!
//! # Layout
//! - [`config`]: the agent's TOML file around its profiles, validated whole (the profile model
//!   itself is `tunnelfleet_protocol::profile`).
//! - [`hostkey`]: host key trust: known_hosts, pinned fingerprints, opt-in TOFU.
//! - [`identity`]: loading the private key, refusing loose permissions.
//! - [`sshcert`]: an enrolled agent's own SSH key (made here) and the certificate the
//!   coordinator issued for it; renewal due at half-life.
//! - [`ssh`]: one SSH client session and its handler (remote-forward channels land here).
//! - [`jump`]: the jump-host chain (`ssh -J`): a session to each hop, a channel to the next.
//! - [`dial`]: reaching an endpoint within the connect timeout, directly or through jumps.
//! - [`local`]: local listeners for `L` and `D` forwards.
//! - [`socks`]: SOCKS5 CONNECT for `D` forwards.
//! - [`relay`]: byte copying between sockets and channels, with counters.
//! - [`server_close`]: a finished channel held until the server's CLOSE (russh keeps a
//!   channel's entry for the session's life when we let go first).
//! - [`health`]: health checks and the consecutive-failure rule.
//! - [`placement`]: where a profile's session goes next: failover and failback rules, no IO.
//! - [`profile`]: the life of one profile: session, reconnect, moves make-before-break.
//! - [`reclaim`]: `reclaim_remote_ports`: ending this account's stale session holding an `R`
//!   port, through the new session.
//! - [`supervisor`]: all profiles and the commands that act on them; its turn never waits on
//!   long work.
//! - [`control`]: the local Unix control socket (JSON lines) and its client.
//! - [`status`]: status data shared by the tasks and returned to the CLI.
//! - [`enroll`]: a join token traded for the agent's own certificate, trusting a pinned CA.
//! - [`metrics`]: Prometheus `/metrics` of the agent (opt-in), read from status snapshots.
//! - [`net`]: `tunnelfleet net check` and `net bandwidth`, here so an agent runs them for
//!   `--agent ID` too.
//! - [`audit`]: `tunnelfleet audit` (keys, sshd settings, sockets, failed logins, own config),
//!   here for the same reason.
//! - [`coordinators`]: which coordinator to dial next (every configured address, in turn).
//! - [`fleet`]: fleet membership: cached profiles, the coordinator link loop, heartbeats.
//! - [`link`]: the control link to the coordinator (QUIC, mutual TLS, hello, heartbeats).
//! - [`agent`]: `run`, the whole agent as one call.
//! - [`cli`]: the `tunnelfleet-agent` command line (the binary is a one-line `main` over it).

#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod coordinators;
pub mod dial;
pub mod enroll;
pub mod fleet;
pub mod health;
pub mod hostkey;
pub mod identity;
pub mod jump;
pub mod link;
pub mod local;
pub mod metrics;
pub mod net;
pub mod placement;
pub mod profile;
pub mod reclaim;
pub mod relay;
pub mod server_close;
pub mod socks;
pub mod ssh;
pub mod sshcert;
pub mod status;
pub mod supervisor;
