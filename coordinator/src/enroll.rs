//! Join tokens, enrollment and revocation: how hundreds of appliances get certificates without
//! anyone copying files, and how one of them is shut out again.
//!
//! `tunnelfleet token create` makes a one-time secret with an expiry and the labels the agent
//! will carry. Only its SHA-256 is stored, so the state directory does not hold usable tokens.
//! An agent presents the secret with a certificate request on the enrollment ALPN; the token is
//! spent durably before the certificate is signed, so a token is never good twice, even across a
//! crash. A revoked agent id is refused at every connection, whatever certificate it holds, and a
//! connected one is closed at once.

use std::sync::Arc;
use std::time::Duration;
use tunnelfleet_runtime::clock::now_unix_ms;

use tunnelfleet_protocol::{EnrollReply, EnrollRequest, FrameDecoder, check_version, encode};

use crate::fleet::Fleet;
use crate::pki::Signer;
use crate::store::StoreError;

/// Prefix of every join token secret (recognizable in a leaked log or paste).
pub const TOKEN_PREFIX: &str = "tfj_";

/// Largest enrollment request read (a CSR is about 500 bytes).
const MAX_REQUEST: usize = 16 * 1024;

/// How long an enrolling agent has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A new join-token secret, its storage hash and its public id.
pub fn new_token() -> (String, String, String) {
    new_secret(TOKEN_PREFIX)
}

/// A new secret starting with `prefix` (160 random bits), its storage hash and its public id.
pub fn new_secret(prefix: &str) -> (String, String, String) {
    let mut bytes = [0u8; 20];
    rand::fill(&mut bytes);
    let secret = format!(
        "{prefix}{}",
        data_encoding::BASE32_NOPAD
            .encode(&bytes)
            .to_ascii_lowercase()
    );
    let hash = token_hash(&secret);
    let id = hash[..12].to_string();
    (secret, hash, id)
}

/// The stored form of a secret: hex SHA-256.
pub fn token_hash(secret: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.trim().as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Validity of certificates issued through enrollment.
pub const ENROLLED_CERT_DAYS: i64 = 365;

/// Serves one enrollment connection: one request, one reply, then close.
pub async fn serve(conn: quinn::Connection, fleet: Arc<Fleet>, signer: Option<Arc<Signer>>) {
    let remote = conn.remote_address();
    let Ok(Ok((mut send, mut recv))) =
        tokio::time::timeout(REQUEST_TIMEOUT, conn.accept_bi()).await
    else {
        conn.close(1u32.into(), b"no enrollment request");
        return;
    };
    let bytes = match tokio::time::timeout(REQUEST_TIMEOUT, recv.read_to_end(MAX_REQUEST)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            tracing::warn!(%remote, "enrollment request unreadable: {e}");
            conn.close(2u32.into(), b"request too large or cut off");
            return;
        }
        Err(_) => {
            conn.close(1u32.into(), b"no enrollment request");
            return;
        }
    };
    let mut dec = FrameDecoder::new();
    dec.push(&bytes);
    let reply = match dec.next_message::<EnrollRequest>() {
        Ok(Some(req)) if dec.buffered() == 0 => {
            decide(&fleet, signer.as_deref(), req, remote).await
        }
        Ok(_) => EnrollReply::Refused {
            reason: "the request must be exactly one frame".into(),
        },
        Err(e) => EnrollReply::Refused {
            reason: format!("malformed enrollment request: {e}"),
        },
    };
    if let EnrollReply::Refused { reason } = &reply {
        tracing::warn!(%remote, "enrollment refused: {reason}");
    }
    if let Ok(frame) = encode(&reply) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    conn.close(0u32.into(), b"done");
}

async fn decide(
    fleet: &Fleet,
    signer: Option<&Signer>,
    req: EnrollRequest,
    remote: std::net::SocketAddr,
) -> EnrollReply {
    let refuse = |reason: String| EnrollReply::Refused { reason };
    let Some(signer) = signer else {
        return refuse(
            "enrollment is not enabled on this coordinator: its PKI directory holds no CA key"
                .into(),
        );
    };
    if let Err(e) = check_version(req.protocol) {
        return refuse(e.to_string());
    }
    if let Err(e) = crate::pki::check_agent_id(&req.agent_id) {
        return refuse(e.to_string());
    }
    let id = req.agent_id.as_str();
    // Check the request before the token is spent on it.
    if let Err(e) = rcgen::CertificateSigningRequestParams::from_pem(&req.csr_pem) {
        return refuse(format!("certificate request: {e}"));
    }
    let token = match fleet
        .store
        .spend_token(
            &token_hash(&req.token),
            id,
            now_unix_ms(),
            signer.issued_offline(id),
        )
        .await
    {
        Ok(t) => t,
        Err(StoreError::TokenRefused(r)) => return refuse(r),
        Err(e) => return refuse(format!("coordinator store: {e}")),
    };
    match signer.sign_request(&req.csr_pem, id, ENROLLED_CERT_DAYS) {
        Ok(cert_pem) => {
            tracing::info!(agent = %id, %remote, token = %token.id, labels = ?token.labels, "agent enrolled");
            EnrollReply::Issued {
                cert_pem,
                ca_pem: signer.ca_pem().to_string(),
                labels: token.labels,
            }
        }
        Err(e) => refuse(format!("signing: {e}")),
    }
}
