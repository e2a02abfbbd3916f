//! tunnelfleet coordinator: the fleet's CA and the QUIC control link the agents connect to.
//!
//! # Layout
//! - [`pki`]: the fleet CA; coordinator and agent certificates.
//! - [`tls`]: mutual-TLS QUIC settings; the agent id from a verified certificate.
//! - [`link`]: accepting agents: hello checked against the certificate, heartbeats.
//! - [`store`]: fleet state in sled; every acknowledged write flushed first.

pub mod link;
pub mod pki;
pub mod store;
pub mod tls;
