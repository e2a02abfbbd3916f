//! The agent's end of the control link to the coordinator: QUIC with mutual TLS, a hello,
//! then heartbeats.
//!
//! With TLS 1.3 a client whose certificate the server rejects sees `connect()` succeed and
//! learns of the rejection only when it first uses the connection; [`connect`] therefore waits
//! for the coordinator's answer to the hello and reports a closed connection during that wait
//! as a refused certificate, with the TLS alert the coordinator sent.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tunnelfleet_protocol::{
    AgentMessage, CoordinatorMessage, DecodeError, EncodeError, Heartbeat, Hello, Welcome,
    check_version, encode,
};
use tunnelfleet_runtime::frames::{FrameReadError, FrameReader};
use tunnelfleet_runtime::pem;

/// Why the control link could not be established or used.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A PEM file could not be read.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// The PEM parser's or the file system's reason.
        reason: String,
    },
    /// TLS configuration refused.
    #[error("tls: {0}")]
    Tls(String),
    /// The QUIC connection could not start.
    #[error("coordinator {addr}: {reason}")]
    Connect {
        /// Coordinator address.
        addr: SocketAddr,
        /// quinn's reason.
        reason: String,
    },
    /// The coordinator closed the link during the handshake: our certificate was refused
    /// (another CA, expired, revoked) or the coordinator is not who we expect.
    #[error("coordinator {addr} refused this agent during the TLS handshake: {detail}")]
    CertificateRefused {
        /// Coordinator address.
        addr: SocketAddr,
        /// The close frame (TLS alert) as received.
        detail: String,
    },
    /// The coordinator answered the hello with a refusal.
    #[error("coordinator {addr} refused the hello: {reason}")]
    Refused {
        /// Coordinator address.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The coordinator speaks another protocol version.
    #[error("coordinator {addr}: {source}")]
    Version {
        /// Coordinator address.
        addr: SocketAddr,
        /// The mismatch.
        #[source]
        source: tunnelfleet_protocol::VersionMismatch,
    },
    /// The coordinator sent bytes that are not a valid frame.
    #[error("coordinator {addr}: {source}")]
    Protocol {
        /// Coordinator address.
        addr: SocketAddr,
        /// The decode error.
        source: DecodeError,
    },
    /// A message of ours could not be encoded (over the frame limit).
    #[error("coordinator {addr}: {source}")]
    Encode {
        /// Coordinator address.
        addr: SocketAddr,
        /// The encoding error (a message over the frame limit).
        source: EncodeError,
    },
    /// The coordinator holds more than its share of the fleet's links and asked this agent to
    /// link to another ([`tunnelfleet_protocol::close::REBALANCE`]).
    #[error("coordinator {addr} asked this agent to link to another: {reason}")]
    Rebalanced {
        /// Coordinator address.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The coordinator closed the link because this agent is revoked
    /// ([`tunnelfleet_protocol::close::REVOKED`]): it is refused from now on.
    #[error("coordinator {addr} closed the link, this agent is revoked: {reason}")]
    Revoked {
        /// Coordinator address.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The link broke after it was established.
    #[error("coordinator {addr}: link lost: {reason}")]
    Lost {
        /// Coordinator address.
        addr: SocketAddr,
        /// The read or write error, or what arrived out of order.
        reason: String,
    },
}

/// The agent's TLS client settings: trust the fleet CA, present the agent certificate.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<quinn::ClientConfig, LinkError> {
    let pem = |e: pem::PemError| LinkError::Pem {
        path: e.path.display().to_string(),
        reason: e.reason,
    };
    let roots = pem::roots(ca).map_err(pem)?;
    let chain = pem::certs(cert).map_err(pem)?;
    let key_der = pem::key(key).map_err(pem)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(pem::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![tunnelfleet_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(tunnelfleet_protocol::KEEP_ALIVE));
    t.max_idle_timeout(tunnelfleet_protocol::IDLE_TIMEOUT.try_into().ok());
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// An established control link.
pub struct ControlLink {
    /// The coordinator's welcome.
    pub welcome: Welcome,
    addr: SocketAddr,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
}

/// Connects, says hello, and waits for the welcome.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
    hello: Hello,
) -> Result<ControlLink, LinkError> {
    let connecting = endpoint
        .connect_with(config, addr, server_name)
        .map_err(|e| LinkError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let conn = connecting.await.map_err(|e| handshake_error(addr, e))?;
    let (mut send, recv) = conn.open_bi().await.map_err(|e| handshake_error(addr, e))?;
    let frame =
        encode(&AgentMessage::Hello(hello)).map_err(|source| LinkError::Encode { addr, source })?;
    send.write_all(&frame).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(c) => handshake_error(addr, c),
        other => LinkError::Lost {
            addr,
            reason: other.to_string(),
        },
    })?;
    let mut link = ControlLink {
        welcome: Welcome {
            protocol: 0,
            heartbeat_interval_ms: 0,
            coordinator_version: String::new(),
            ssh_host_ca: None,
        },
        addr,
        conn,
        send,
        recv,
        reader: FrameReader::new(),
    };
    match link.next().await {
        Ok(CoordinatorMessage::Welcome(w)) => {
            check_version(w.protocol).map_err(|source| LinkError::Version { addr, source })?;
            link.welcome = w;
            Ok(link)
        }
        Ok(CoordinatorMessage::Refused { reason }) => Err(LinkError::Refused { addr, reason }),
        Ok(
            CoordinatorMessage::Push(_)
            | CoordinatorMessage::Command(_)
            | CoordinatorMessage::SshCert(_)
            | CoordinatorMessage::Evidence(_),
        ) => Err(LinkError::Lost {
            addr,
            reason: "a push, command or certificate before the welcome".into(),
        }),
        Err(e) => Err(e),
    }
}

impl ControlLink {
    /// Sends a heartbeat.
    pub async fn heartbeat(&mut self, hb: Heartbeat) -> Result<(), LinkError> {
        self.send_message(AgentMessage::Heartbeat(hb)).await
    }

    /// Reports the result of applying a pushed profile set.
    pub async fn applied(
        &mut self,
        applied: tunnelfleet_protocol::Applied,
    ) -> Result<(), LinkError> {
        self.send_message(AgentMessage::Applied(applied)).await
    }

    /// Answers a coordinator command.
    pub async fn command_result(
        &mut self,
        r: tunnelfleet_protocol::CommandResult,
    ) -> Result<(), LinkError> {
        self.send_message(AgentMessage::CommandResult(r)).await
    }

    /// Asks the coordinator's SSH CA to certify this agent's own SSH key.
    pub async fn ssh_cert_request(&mut self, public_key: String) -> Result<(), LinkError> {
        self.send_message(AgentMessage::SshCertRequest(
            tunnelfleet_protocol::SshCertRequest { public_key },
        ))
        .await
    }

    async fn send_message(&mut self, msg: AgentMessage) -> Result<(), LinkError> {
        let frame = encode(&msg).map_err(|source| LinkError::Encode {
            addr: self.addr,
            source,
        })?;
        self.send
            .write_all(&frame)
            .await
            .map_err(|e| LinkError::Lost {
                addr: self.addr,
                reason: e.to_string(),
            })
    }

    /// The next message from the coordinator.
    pub async fn next(&mut self) -> Result<CoordinatorMessage, LinkError> {
        let addr = self.addr;
        match self.reader.next(&mut self.recv).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(LinkError::Lost {
                addr,
                reason: "stream closed".into(),
            }),
            Err(FrameReadError::Decode(source)) => Err(LinkError::Protocol { addr, source }),
            Err(FrameReadError::Read(quinn::ReadError::ConnectionLost(e))) => {
                Err(handshake_error(addr, e))
            }
            Err(FrameReadError::Read(e)) => Err(LinkError::Lost {
                addr,
                reason: e.to_string(),
            }),
        }
    }

    /// Closes the link.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"agent closing");
    }
}

/// A connection error seen before the welcome: a transport close carrying a TLS alert means our
/// certificate was refused.
fn handshake_error(addr: SocketAddr, e: quinn::ConnectionError) -> LinkError {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => LinkError::CertificateRefused {
            addr,
            detail: c.to_string(),
        },
        quinn::ConnectionError::TransportError(t) => LinkError::CertificateRefused {
            addr,
            detail: t.to_string(),
        },
        quinn::ConnectionError::ApplicationClosed(a)
            if a.error_code == tunnelfleet_protocol::close::REBALANCE.into() =>
        {
            LinkError::Rebalanced {
                addr,
                reason: String::from_utf8_lossy(&a.reason).to_string(),
            }
        }
        quinn::ConnectionError::ApplicationClosed(a)
            if a.error_code == tunnelfleet_protocol::close::REVOKED.into() =>
        {
            LinkError::Revoked {
                addr,
                reason: String::from_utf8_lossy(&a.reason).to_string(),
            }
        }
        quinn::ConnectionError::ApplicationClosed(a) => LinkError::Refused {
            addr,
            reason: String::from_utf8_lossy(&a.reason).to_string(),
        },
        other => LinkError::Lost {
            addr,
            reason: other.to_string(),
        },
    }
}
