//! Enrollment: a new agent turns a join token into its own certificate.
//!
//! Started with `enroll_token_file` and `ca_fingerprint` in its `[coordinator]` section and no
//! certificate yet, the agent creates its key (it never leaves the appliance), sends a
//! certificate request with the token on the enrollment ALPN, and writes the certificate and
//! the CA it receives. It trusts the coordinator only through the pinned CA fingerprint: the
//! server's chain must contain a certificate with that SHA-256, and the server certificate must
//! verify against it — so a token is never handed to an impostor.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tunnelfleet_protocol::{
    ENROLL_ALPN, EnrollReply, EnrollRequest, FrameDecoder, PROTOCOL_VERSION, encode,
};

use crate::config::CoordinatorSection;
use crate::coordinators::{self, Candidate};
use tunnelfleet_protocol::fingerprint::parse_ca_fingerprint;

/// Why enrollment failed. Nothing is written unless it succeeded.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token file could not be read or is readable by others.
    #[error("coordinator.enroll_token_file {path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// What is wrong with the token file.
        reason: String,
    },
    /// The coordinator could not be reached or the exchange broke.
    #[error("enrolling with coordinator {addr}: {reason}")]
    Exchange {
        /// Coordinator address as configured.
        addr: String,
        /// How the exchange broke.
        reason: String,
    },
    /// The coordinator refused the token or the request.
    #[error("coordinator {addr} refused the enrollment: {reason}")]
    Refused {
        /// Coordinator address as configured.
        addr: String,
        /// Its reason.
        reason: String,
    },
    /// A certificate or key could not be created or written.
    #[error("{path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// The IO or encoding error.
        reason: String,
    },
}

/// Why the enrollment exchange itself broke (before any reply was judged).
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] rustls::Error),
    /// QUIC could not be set up.
    #[error(transparent)]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The local UDP socket could not be opened.
    #[error("local socket: {0}")]
    Socket(std::io::Error),
    /// The connection could not start.
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed.
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    /// Sending the request failed.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
    /// Finishing the request stream failed.
    #[error(transparent)]
    Finish(#[from] quinn::ClosedStream),
    /// Reading the reply failed.
    #[error(transparent)]
    Read(#[from] quinn::ReadToEndError),
    /// The request could not be encoded.
    #[error(transparent)]
    Encode(#[from] tunnelfleet_protocol::EncodeError),
    /// The reply is not a valid frame.
    #[error(transparent)]
    Decode(#[from] tunnelfleet_protocol::DecodeError),
    /// The coordinator closed without answering.
    #[error("the coordinator closed without a reply")]
    NoReply,
}

/// How long the whole exchange may take.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest reply read (two certificates).
const MAX_REPLY: usize = 64 * 1024;

/// Whether this agent must enroll before it can connect: it has a token and lacks a
/// certificate or key.
pub fn needed(c: &CoordinatorSection) -> bool {
    c.enroll_token_file.is_some() && (!c.cert.exists() || !c.key.exists())
}

/// Enrolls and writes `cert`, `key` and `ca` of the section. Returns the labels the token gave.
pub async fn enroll(
    c: &CoordinatorSection,
) -> Result<std::collections::BTreeMap<String, String>, EnrollError> {
    let addr_s = c.address.to_string();
    let xerr = |reason: String| EnrollError::Exchange {
        addr: addr_s.clone(),
        reason,
    };
    let token_path = c
        .enroll_token_file
        .as_deref()
        .ok_or_else(|| EnrollError::Token {
            path: "-".into(),
            reason: "not set".into(),
        })?;
    let terr = |reason: String| EnrollError::Token {
        path: token_path.display().to_string(),
        reason,
    };
    tunnelfleet_runtime::secret::check_permissions(token_path).map_err(|e| terr(e.to_string()))?;
    let token = std::fs::read_to_string(token_path)
        .map_err(|e| terr(e.to_string()))?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(terr("empty".into()));
    }
    let pin = c
        .ca_fingerprint
        .as_deref()
        .ok_or_else(|| xerr("coordinator.ca_fingerprint is required to enroll".into()))
        .and_then(|f| parse_ca_fingerprint(f).map_err(|e| xerr(e.to_string())))?;

    let key = rcgen::KeyPair::generate().map_err(|e| xerr(format!("generating a key: {e}")))?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, c.agent_id.clone());
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| xerr(format!("certificate request: {e}")))?;

    let req = EnrollRequest {
        protocol: PROTOCOL_VERSION,
        agent_id: c.agent_id.clone(),
        token,
        csr_pem,
    };
    // Any coordinator of the fleet enrolls: the first that answers does.
    let candidates = coordinators::resolve(c)
        .await
        .map_err(|e| xerr(e.to_string()))?;
    let mut failures = Vec::new();
    let mut answered = None;
    for cand in &candidates {
        match tokio::time::timeout(ENROLL_TIMEOUT, exchange(cand, pin.clone(), req.clone())).await {
            Ok(Ok(r)) => {
                answered = Some((cand, r));
                break;
            }
            Ok(Err(e)) => failures.push(format!("{}: {e}", cand.addr)),
            Err(_) => failures.push(format!(
                "{}: no answer within {ENROLL_TIMEOUT:?}",
                cand.addr
            )),
        }
    }
    let Some((cand, reply)) = answered else {
        return Err(xerr(failures.join("; ")));
    };
    let (cert_pem, ca_pem, labels) = match reply {
        EnrollReply::Issued {
            cert_pem,
            ca_pem,
            labels,
        } => (cert_pem, ca_pem, labels),
        EnrollReply::Refused { reason } => {
            return Err(EnrollError::Refused {
                addr: cand.configured.clone(),
                reason,
            });
        }
    };
    // The CA we are told to trust from now on must be the one we pinned.
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| xerr(format!("CA certificate in the reply: {e}")))?;
    if sha256(ca_der.as_ref()) != pin {
        return Err(xerr(
            "the CA certificate in the reply does not match coordinator.ca_fingerprint".into(),
        ));
    }
    write_file(&c.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&c.cert, cert_pem.as_bytes(), 0o644)?;
    write_file(&c.ca, ca_pem.as_bytes(), 0o644)?;
    tracing::info!(agent = %c.agent_id, cert = %c.cert.display(), ?labels, "enrolled: certificate written");
    Ok(labels)
}

async fn exchange(
    cand: &Candidate,
    pin: Vec<u8>,
    req: EnrollRequest,
) -> Result<EnrollReply, ExchangeError> {
    let (addr, server_name) = (cand.addr, cand.server_name.as_str());
    let provider = tunnelfleet_runtime::pem::provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin, provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(ExchangeError::Socket)?;
    let conn = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(quic)), addr, server_name)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let frame = encode(&req)?;
    send.write_all(&frame).await?;
    send.finish()?;
    let bytes = recv.read_to_end(MAX_REPLY).await?;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    let mut dec = FrameDecoder::new();
    dec.push(&bytes);
    dec.next_message::<EnrollReply>()?
        .ok_or(ExchangeError::NoReply)
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// Writes a file whole (temp file, fsync, rename) with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EnrollError> {
    tunnelfleet_runtime::secret::write_atomic(path, bytes, mode).map_err(|e| EnrollError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Trusts a server whose chain holds the pinned CA and whose certificate verifies against it.
#[derive(Debug)]
struct PinnedCa {
    pin: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256(c.as_ref()) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "no certificate in the coordinator's chain matches coordinator.ca_fingerprint"
                        .into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
