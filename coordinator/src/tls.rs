//! TLS and QUIC settings of the control link, server side, and the agent's identity.
//!
//! Mutual TLS with the fleet CA: a client with a certificate from another CA (or an expired
//! one) fails the handshake, and the control link refuses a client without one (only the
//! enrollment ALPN serves those). The agent id comes from the verified certificate only.
//! QUIC keep-alives every 500 ms from the agent and a 2 s idle timeout (protocol::KEEP_ALIVE,
//! IDLE_TIMEOUT) notice a dead link within seconds, where TCP keepalive defaults would take hours.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use crate::pki;

pub use tunnelfleet_protocol::IDLE_TIMEOUT;

/// Why the TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// The PEM parser's or the file system's reason.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(String),
    /// quinn refused the rustls configuration.
    #[error("quic: {0}")]
    Quic(String),
}

use tunnelfleet_runtime::pem::{self, provider};

impl From<tunnelfleet_runtime::pem::PemError> for TlsError {
    fn from(e: tunnelfleet_runtime::pem::PemError) -> TlsError {
        TlsError::Pem {
            path: e.path.display().to_string(),
            reason: e.reason,
        }
    }
}

/// Receive window of the one stream a peer may open, and of its whole connection: a
/// heartbeat frame streams through it (the window slides as frames are read), and it is all the
/// memory a peer can make the coordinator buffer per connection.
const RECEIVE_WINDOW: u32 = 1024 * 1024;

/// The coordinator's transport settings: the protocol uses one bidirectional stream per
/// connection (the control link, or one enrollment exchange), so a peer gets exactly that
/// (quinn's defaults would let anyone, before any certificate, open 100 of each kind at
/// 1.25 MB of buffer each).
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // The agents send the keep-alives (KEEP_ALIVE); our ACKs keep their idle timers running.
    t.keep_alive_interval(None);
    // Safe: 2 s fits the VarInt range of an idle timeout.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(RECEIVE_WINDOW.into());
    t.receive_window(RECEIVE_WINDOW.into());
    Arc::new(t)
}

/// The coordinator's QUIC server config from a PKI directory.
pub fn server_config(pki_dir: &Path) -> Result<quinn::ServerConfig, TlsError> {
    let roots = pem::roots(&pki_dir.join(pki::CA_CERT))?;
    // A client certificate, when presented, must chain to the CA (a foreign or expired one
    // fails the handshake). Presenting none is allowed only so that a new agent can enroll:
    // the control link refuses a connection without one before reading a byte.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    // The chain carries the CA certificate too: an enrolling agent knows only its fingerprint.
    let mut chain = pem::certs(&pki_dir.join(pki::SERVER_CERT))?;
    chain.extend(pem::certs(&pki_dir.join(pki::CA_CERT))?);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, pem::key(&pki_dir.join(pki::SERVER_KEY))?)?;
    tls.alpn_protocols = vec![
        tunnelfleet_protocol::ALPN.to_vec(),
        tunnelfleet_protocol::ENROLL_ALPN.to_vec(),
    ];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(transport());
    Ok(cfg)
}

/// Why a connection's certificate names no agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerIdError {
    /// The certificate does not parse.
    #[error("unparsable client certificate: {0}")]
    Unparsable(String),
    /// Neither a tunnelfleet URI nor a common name.
    #[error("client certificate names no agent")]
    NoAgent,
    /// The peer presented no certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// quinn handed an identity of another type.
    #[error("unexpected peer identity type")]
    UnexpectedIdentity,
    /// An empty chain.
    #[error("empty certificate chain")]
    EmptyChain,
}

/// The agent id in a verified client certificate: its `urn:tunnelfleet:agent:ID` URI SAN, or
/// failing that its common name.
pub fn agent_id(cert: &CertificateDer<'_>) -> Result<String, PeerIdError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PeerIdError::Unparsable(e.to_string()))?;
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n
                && let Some(id) = u.strip_prefix("urn:tunnelfleet:agent:")
            {
                return Ok(id.to_string());
            }
        }
    }
    x.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
        .ok_or(PeerIdError::NoAgent)
}

/// The verified agent id of a QUIC connection.
pub fn connection_agent_id(conn: &quinn::Connection) -> Result<String, PeerIdError> {
    let identity = conn.peer_identity().ok_or(PeerIdError::NoCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PeerIdError::UnexpectedIdentity)?;
    let leaf = certs.first().ok_or(PeerIdError::EmptyChain)?;
    agent_id(leaf)
}
