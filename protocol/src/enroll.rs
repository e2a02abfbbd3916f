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

/// Agent -> coordinator: the only message of an enrollment. Its `Debug` leaves the token out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("protocol", &self.protocol)
            .field("agent_id", &self.agent_id)
            .field("token", &"<redacted>")
            .field("csr_pem", &self.csr_pem)
            .finish()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_join_token_out() {
        let r = EnrollRequest {
            protocol: 4,
            agent_id: "vma-1".into(),
            token: "tfj_secret-token-value".into(),
            csr_pem: String::new(),
        };
        let shown = format!("{r:?}");
        assert!(shown.contains("vma-1"), "{shown}");
        assert!(!shown.contains("secret-token-value"), "{shown}");
    }
}
