//! The agent <-> coordinator protocol of tunnelfleet: messages, versions and frames. No IO.
//!
//! Everything that crosses the QUIC control link is defined here as plain serde types, encoded
//! with bincode 2 in length-prefixed frames. The crate takes bytes and returns messages or
//! errors — never panics on what a peer sends — so it is fuzzed and property-tested on its own,
//! and the agent and coordinator drive it over whatever transport they hold.
//!
//! # Layout
//! - [`message`]: the messages each side sends, and the version check of the hello.
//! - [`enroll`]: the one-shot exchange that gives a new agent its certificate.
//! - [`frame`]: length-prefixed frames, encoding, and the incremental decoder with limits.
//! - [`limits`]: how many of each thing a message may carry, enforced while decoding.
//! - [`profile`]: the one profile model: fields, defaults, validation, OMA-group resolution.
//! - [`forward`]: forwards as OpenSSH writes them (`L [bind:]port:host:hostport`, `R`, `D`).
//! - [`jump`]: jump hosts (`ssh -J`): a hop as written, parsed and printed.
//! - [`addr`]: `host:port` and the one name rule of profiles, groups, hooks and agent ids.
//! - [`fingerprint`]: host key and CA fingerprints as operators paste them.
//! - [`duration`]: durations as `"15s"` in TOML/JSON and exact in frames.
//! - [`legacy`]: profiles as protocol 3 stored them, read once at upgrade.
//! - [`close`]: the QUIC application close codes of the control link.

#![forbid(unsafe_code)]

pub mod addr;
pub mod duration;
pub mod enroll;
pub mod fingerprint;
pub mod forward;
pub mod frame;
pub mod jump;
pub mod legacy;
pub mod limits;
pub mod message;
pub mod profile;

pub use enroll::{ENROLL_ALPN, EnrollReply, EnrollRequest};
pub use frame::{
    DecodeError, EncodeError, FrameDecoder, KEPT_CAPACITY, MAX_FRAME_LEN, decode, encode,
};
pub use message::*;
pub use profile::{HealthSpec, ProfileSpec};

/// The protocol version this build speaks; exchanged in [`Hello`] and [`Welcome`].
/// 2: coordinator -> agent commands (`tunnels … --agent`).
/// 3: jump hosts in profiles (`ProfileSpec::jump`) and the `Jump` session error kind.
/// 4: one profile model on both sides: exact durations, `autostart` on the wire.
/// 5: `failback_after`, `reclaim_remote_ports` and `standby` in profiles.
/// 6: SSH user certificates (`SshCertRequest`, `SshCert`); a profile's `identity_file` is
///    optional (none: the agent's certificate); the fleet's SSH host CA in `Welcome` and a
///    profile's `fleet_host_ca`; other agents' health through an endpoint (`Evidence`).
pub const PROTOCOL_VERSION: u32 = 6;

/// QUIC keep-alive of the control link, sent by the agent: when it sent nothing this long it
/// sends a PING, and the coordinator's ACK keeps both idle timers running (the coordinator
/// sends none of its own: one PING and one ACK per agent per interval, not two of each).
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(500);

/// QUIC idle timeout of the control link: a link silent this long is dead (four keep-alives
/// lost in a row). A coordinator killed outright is noticed by its agents this fast, and they
/// relink to another within [`RELINK_JITTER`] more; a lost link costs only a relink (the
/// tunnels never depend on it).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// An agent whose link was lost dials the next coordinator after a pause uniform in
/// `[0, RELINK_JITTER]`, so the agents of a dead coordinator arrive at the others spread out,
/// not in one burst; rounds that fail back off from `reconnect_min`.
pub const RELINK_JITTER: std::time::Duration = std::time::Duration::from_millis(500);

/// QUIC application close codes of the control link (the agent logs them; tests read them).
pub mod close {
    /// Refused at hello (version, identity).
    pub const REFUSED: u32 = 1;
    /// The peer sent bytes that are not a valid frame.
    pub const MALFORMED: u32 = 2;
    /// The coordinator is shutting down.
    pub const SHUTDOWN: u32 = 3;
    /// The agent was revoked.
    pub const REVOKED: u32 = 4;
    /// A newer connection of the same agent replaced this one (one connection per agent).
    pub const REPLACED: u32 = 5;
    /// This coordinator holds more than its share of the fleet's links: link to another
    /// configured coordinator (the tunnels are untouched; see the coordinator's `balance`).
    pub const REBALANCE: u32 = 6;
}

/// The QUIC ALPN of the control link.
pub const ALPN: &[u8] = b"tunnelfleet/1";
