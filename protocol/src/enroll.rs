//! Enrollment: an agent without a certificate trades a one-time join token and a certificate
//! request for a certificate signed by the fleet CA.
//!
//! It runs on its own ALPN ([`ENROLL_ALPN`]) on the coordinator's QUIC port, one request and one
//! reply on one stream, because the agent has no client certificate yet: the control link
//! ([`crate::ALPN`]) still requires one. The agent proves nothing but the token; the coordinator
//! proves itself by a server certificate chaining to the CA whose fingerprint the agent was given.

use serde::{Deserialize, Serialize};

/// The QUIC ALPN of enrollment.
pub const ENROLL_ALPN: &[u8] = b"tunnelfleet-enroll/1";

/// Agent -> coordinator: the only message of an enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub struct EnrollRequest {
    /// [`crate::PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// The id the agent wants its certificate to name.
    pub agent_id: String,
    /// The join token, as `tunnelfleet token create` printed it.
    pub token: String,
    /// PKCS#10 certificate request (PEM) for the agent's own key; the key never leaves it.
    pub csr_pem: String,
}

/// Coordinator -> agent: the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
pub enum EnrollReply {
    /// The certificate, and the CA certificate to trust the coordinator by from now on.
    Issued {
        /// The agent's certificate (PEM).
        cert_pem: String,
        /// The fleet CA certificate (PEM).
        ca_pem: String,
        /// Labels the token gives the agent (the coordinator applies them by itself).
        labels: std::collections::BTreeMap<String, String>,
    },
    /// Refused, with the reason (used, expired or unknown token; an id taken; …).
    Refused {
        /// Why, for the agent's log.
        reason: String,
    },
}
