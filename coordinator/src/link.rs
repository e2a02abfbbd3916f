//! The coordinator's end of the control link, one connection at a time: accept QUIC
//! connections, check the hello against the certificate, register the agent with the
//! [`Fleet`], take heartbeats, acknowledgements and command results.
//!
//! One bidirectional stream per connection carries the frames: this task reads, a writer task
//! per connection sends (so a push never waits behind a slow read). Every refusal is logged with
//! the agent and the reason, and sent to the agent as `Refused` when the connection can still
//! carry it; a malformed frame closes that one connection and nothing else.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tunnelfleet_protocol::{
    AgentMessage, CoordinatorMessage, PROTOCOL_VERSION, SshCert, Welcome, check_version, encode,
};
use tunnelfleet_runtime::clock::now_unix_ms;
use tunnelfleet_runtime::frames::{FrameReadError, FrameReader};

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::pki::Signer;
use crate::sshca::{self, SshCa};
use crate::tls;
use tunnelfleet_protocol::close;

/// How long a new connection may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a stopping coordinator waits for its closed connections to drain.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

/// What a connection needs besides the fleet: the CA's signing key when this coordinator
/// enrolls agents, and the metrics to count into.
#[derive(Clone, Default)]
pub struct LinkContext {
    /// Signs enrolling agents' certificates (absent: enrollment is refused).
    pub signer: Option<Arc<Signer>>,
    /// Heartbeats and push latency are counted here (absent: not counted).
    pub metrics: Option<Arc<Metrics>>,
    /// Certifies agents' SSH keys (absent: their requests are refused, saying why).
    pub ssh_ca: Option<Arc<SshCa>>,
    /// How long an SSH certificate is valid.
    pub ssh_cert_validity: Duration,
    /// The fleet's SSH host CA: its public key goes to every agent in the welcome.
    pub ssh_host_ca: Option<Arc<SshCa>>,
}

/// Connections the coordinator holds at once (one per agent, plus enrollments); more are
/// refused before the handshake.
pub const MAX_CONNECTIONS: usize = 16_384;

/// Enrollment connections (no certificate yet) at once: a new appliance enrolls once, so a
/// flood of anonymous clients gets this many and no more.
pub const MAX_ENROLLING: usize = 64;

/// Serves the control link on `endpoint` until `shutdown`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    fleet: Arc<Fleet>,
    ctx: LinkContext,
    shutdown: CancellationToken,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let enrolling = Arc::new(tokio::sync::Semaphore::new(MAX_ENROLLING));
    let mut rate = crate::handshakes::HandshakeRate::default();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        // Address validation (a Retry round trip) before any handshake work: a spoofed
        // source cannot make the coordinator send it a certificate chain.
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        if !rate.allow(incoming.remote_address().ip(), tokio::time::Instant::now()) {
            tracing::debug!(remote = %incoming.remote_address(), "handshakes from this address past their rate; refusing one");
            incoming.refuse();
            continue;
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "{MAX_CONNECTIONS} connections open; refusing another");
            incoming.refuse();
            continue;
        };
        let fleet = fleet.clone();
        let ctx = ctx.clone();
        let enrolling = enrolling.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            use tracing::Instrument;
            match incoming.await {
                Ok(conn) if alpn(&conn).as_deref() == Some(tunnelfleet_protocol::ENROLL_ALPN) => {
                    let Ok(_enrolling) = enrolling.try_acquire_owned() else {
                        tracing::warn!(%remote, "{MAX_ENROLLING} enrollments in progress; refusing another");
                        conn.close(close::REFUSED.into(), b"too many enrollments in progress");
                        return;
                    };
                    crate::enroll::serve(conn, fleet, ctx.signer)
                        .instrument(tracing::info_span!("enrollment", %remote))
                        .await
                }
                Ok(conn) => {
                    handle(conn, fleet, ctx)
                        .instrument(tracing::info_span!(
                            "control_link",
                            %remote,
                            agent = tracing::field::Empty
                        ))
                        .await
                }
                // A client certificate from another CA, or an expired one, ends here.
                Err(e) => tracing::warn!(%remote, "control link refused during handshake: {e}"),
            }
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"coordinator shutting down");
    // Let the close reach the agents (so they reconnect at once instead of timing out) and
    // release the UDP port before returning; a peer that never answers cannot hold us up.
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, endpoint.wait_idle()).await;
}

/// The ALPN protocol a connection negotiated.
fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

async fn handle(conn: quinn::Connection, fleet: Arc<Fleet>, ctx: LinkContext) {
    let metrics = ctx.metrics.clone();
    let remote = conn.remote_address();
    let cert_id = match tls::connection_agent_id(&conn) {
        Ok(id) => {
            tracing::Span::current().record("agent", id.as_str());
            id
        }
        Err(e) => {
            tracing::warn!(%remote, "control link refused: {e}");
            conn.close(close::REFUSED.into(), e.to_string().as_bytes());
            return;
        }
    };
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(agent = %cert_id, "connection ended before a stream: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!(agent = %cert_id, %remote, "no hello within {HELLO_TIMEOUT:?}; closing");
            conn.close(close::REFUSED.into(), b"no hello");
            return;
        }
    };
    let mut reader = FrameReader::new();

    // The hello, with a deadline.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, next(&mut reader, &mut recv)).await {
        Ok(Ok(Some(AgentMessage::Hello(h)))) => h,
        Ok(Ok(Some(_))) => {
            refuse(&conn, &mut send, "the first message must be a hello".into()).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::warn!(agent = %cert_id, %remote, "closing control link: {e}");
            conn.close(close::MALFORMED.into(), e.to_string().as_bytes());
            return;
        }
        Err(_) => {
            tracing::warn!(agent = %cert_id, %remote, "no hello within {HELLO_TIMEOUT:?}; closing");
            conn.close(close::REFUSED.into(), b"no hello");
            return;
        }
    };
    if !fleet.hello_allowed(&cert_id, tokio::time::Instant::now()) {
        let reason = format!(
            "agent {cert_id:?} is connecting too often (more than {} hellos, then one per {:?}); retry later",
            crate::fleet::HELLO_BURST,
            crate::fleet::HELLO_EVERY
        );
        tracing::warn!(agent = %cert_id, %remote, "control link refused: {reason}");
        refuse(&conn, &mut send, reason).await;
        return;
    }
    let refusal = match check_version(hello.protocol) {
        Err(e) => Some(e.to_string()),
        Ok(()) if hello.agent_id != cert_id => Some(format!(
            "hello says agent {:?} but the certificate is for {cert_id:?}",
            hello.agent_id
        )),
        Ok(()) => match fleet.store.revocation(&cert_id) {
            Ok(Some(r)) => Some(format!("agent {cert_id:?} is revoked: {}", r.reason)),
            Ok(None) => None,
            Err(e) => Some(format!("coordinator store: {e}")),
        },
    };
    if let Some(reason) = refusal {
        tracing::warn!(agent = %cert_id, %remote, "control link refused: {reason}");
        refuse(&conn, &mut send, reason).await;
        return;
    }
    let welcome = CoordinatorMessage::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        heartbeat_interval_ms: fleet.heartbeat_interval.as_millis() as u32,
        coordinator_version: env!("CARGO_PKG_VERSION").to_string(),
        ssh_host_ca: ctx.ssh_host_ca.as_ref().map(|ca| ca.public_line()),
    });
    let Ok(frame) = encode(&welcome) else { return };
    if send.write_all(&frame).await.is_err() {
        return;
    }
    let mut record = fleet
        .store
        .agent(&cert_id)
        .ok()
        .flatten()
        .unwrap_or_default();
    record.id = cert_id.clone();
    record.labels = hello.labels;
    let labels = record.effective_labels();
    record.last_seen_unix_ms = now_unix_ms();
    if let Err(e) = fleet.store.record_agent(&record).await {
        tracing::error!(agent = %cert_id, "{e}");
    }

    // From here a writer task owns the send side; pushes and replies go through its queue.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if send.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    tracing::info!(agent = %cert_id, %remote, version = ?hello.agent_version, "agent connected");
    let replies = tx.clone();
    if let Err(e) = fleet.attach(
        &cert_id,
        remote,
        labels,
        tx,
        conn.clone(),
        hello.started_unix_ms,
    ) {
        tracing::warn!(agent = %cert_id, %remote, "control link refused: {e}");
        conn.close(e.close_code().into(), e.to_string().as_bytes());
        writer.abort();
        return;
    }
    // An agent that was away gets the current profiles at once.
    if let Err(e) = fleet.push_one(&cert_id) {
        tracing::error!(agent = %cert_id, "computing profiles: {e}");
    }

    let mut told = crate::evidence::Told::default();
    loop {
        match next(&mut reader, &mut recv).await {
            Ok(Some(AgentMessage::Heartbeat(hb))) => {
                let judged = fleet.heard(&cert_id, Some(hb));
                if let Some(m) = &metrics {
                    m.heartbeats.add(1, &[]);
                }
                // Failing checks: what the others see through the same endpoint.
                let said = judged.map(|hb| {
                    fleet
                        .evidence
                        .replies(&cert_id, &hb, &mut told, tokio::time::Instant::now())
                });
                for e in said.unwrap_or_default() {
                    let Ok(frame) = encode(&CoordinatorMessage::Evidence(e)) else {
                        continue;
                    };
                    // A full queue drops the word (it is repeated): never wait on an agent.
                    let _ = replies.try_send(frame);
                }
            }
            Ok(Some(AgentMessage::Applied(a))) => {
                fleet.heard(&cert_id, None);
                // Only the acknowledgement of the version pushed to it, once: anything else
                // (a version never pushed, a repeat) is written nowhere.
                let Some(took) = fleet.acknowledged(&cert_id, a.version) else {
                    tracing::debug!(agent = %cert_id, version = a.version, "ignoring an Applied for a version not pushed to it");
                    continue;
                };
                if let Some(m) = &metrics {
                    m.push_latency.record(took.as_secs_f64(), &[]);
                }
                tracing::info!(agent = %cert_id, version = a.version, ok = a.ok, "agent applied profiles");
                let mut rec = fleet
                    .store
                    .agent(&cert_id)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                rec.id = cert_id.clone();
                rec.last_seen_unix_ms = now_unix_ms();
                rec.applied_version = Some(a.version);
                rec.applied_ok = a.ok;
                rec.apply_errors = a
                    .results
                    .iter()
                    .filter(|r| !r.ok)
                    .map(|r| format!("{} {}: {}", r.profile, r.forward, r.detail))
                    .collect();
                if let Err(e) = fleet.store.record_agent(&rec).await {
                    tracing::error!(agent = %cert_id, "{e}");
                }
            }
            Ok(Some(AgentMessage::CommandResult(r))) => {
                // Only answers to commands sent to this agent are taken.
                match fleet.answered(&cert_id, r.id) {
                    Some(done) => {
                        // Its words go to a log and an operator's terminal: lines kept (an
                        // audit report has them), escape sequences written out.
                        let mut r = r;
                        r.message = crate::fleet::clean_text(&r.message, true, usize::MAX);
                        tracing::info!(agent = %cert_id, id = r.id, ok = r.ok, "command result: {:?}", r.message);
                        let _ = done.send(r);
                    }
                    None => {
                        tracing::debug!(agent = %cert_id, id = r.id, "result of a command nobody waits for")
                    }
                }
            }
            Ok(Some(AgentMessage::SshCertRequest(req))) => {
                fleet.heard(&cert_id, None);
                let answer = ssh_cert(&fleet, &ctx, &cert_id, &req.public_key).await;
                let result = match &answer {
                    SshCert::Granted { .. } => "issued",
                    SshCert::Refused { .. } => "refused",
                };
                if let Some(m) = &metrics {
                    m.ssh_certs.add(1, &[KeyValue::new("result", result)]);
                }
                let Ok(frame) = encode(&CoordinatorMessage::SshCert(answer)) else {
                    continue;
                };
                if replies.send(frame).await.is_err() {
                    break;
                }
            }
            Ok(Some(AgentMessage::Hello(_))) => {
                tracing::warn!(agent = %cert_id, "second hello on one connection; closing");
                conn.close(close::MALFORMED.into(), b"second hello");
                break;
            }
            Ok(None) => {
                tracing::info!(agent = %cert_id, "control link closed");
                break;
            }
            Err(e) => {
                tracing::warn!(agent = %cert_id, %remote, "closing control link: {e}");
                conn.close(close::MALFORMED.into(), e.to_string().as_bytes());
                break;
            }
        }
    }
    fleet.detach(&cert_id, &conn);
    writer.abort();
}

/// The SSH user CA's answer to `agent`'s request for `public_key`: refused without a CA, to a
/// revoked agent, and sooner than [`sshca::MIN_REQUEST_INTERVAL`] after its last certificate;
/// else certified and recorded (durable before the agent is told).
async fn ssh_cert(fleet: &Fleet, ctx: &LinkContext, agent: &str, public_key: &str) -> SshCert {
    let refused = |reason: String| {
        tracing::warn!(%agent, "SSH certificate refused: {reason}");
        SshCert::Refused { reason }
    };
    let Some(ca) = &ctx.ssh_ca else {
        // Said once at start; every agent asking is not news.
        tracing::debug!(%agent, "SSH certificate refused: no SSH CA");
        return SshCert::Refused {
            reason: format!(
                "this coordinator has no SSH CA ({} in its pki_dir: tunnelfleet pki ssh-ca)",
                sshca::SSH_CA_KEY
            ),
        };
    };
    let store = &fleet.store;
    match store.revocation(agent) {
        Ok(None) => {}
        Ok(Some(r)) => return refused(format!("agent {agent} is revoked: {}", r.reason)),
        Err(e) => return refused(format!("coordinator store: {e}")),
    }
    let now_ms = now_unix_ms();
    let last = match store.ssh_cert(agent) {
        Ok(last) => last,
        Err(e) => return refused(format!("coordinator store: {e}")),
    };
    if sshca::too_soon(last.as_ref().map(|c| c.issued_unix_ms), now_ms) {
        return refused(format!(
            "asked again within {:?} of the last certificate",
            sshca::MIN_REQUEST_INTERVAL
        ));
    }
    let serial = match store.next_ssh_serial().await {
        Ok(s) => s,
        Err(e) => return refused(format!("coordinator store: {e}")),
    };
    let issued = match ca.certify(&sshca::CertRequest {
        agent_id: agent,
        public_key,
        serial,
        now_unix: now_ms / 1000,
        validity: ctx.ssh_cert_validity,
    }) {
        Ok(i) => i,
        Err(e) => return refused(e.to_string()),
    };
    let record = crate::store::SshCertRecord {
        agent_id: agent.to_string(),
        serial,
        key_fingerprint: issued.key_fingerprint.clone(),
        public_key: issued.public_key.clone(),
        valid_after: issued.valid_after,
        valid_before: issued.valid_before,
        issued_unix_ms: now_ms,
    };
    if let Err(e) = store.record_ssh_cert(&record).await {
        return refused(format!("coordinator store: {e}"));
    }
    tracing::info!(%agent, serial, key = %issued.key_fingerprint, valid_before = issued.valid_before, "SSH certificate issued");
    if last.is_none() {
        fleet.notify(crate::fleet::FleetEvent::FirstSshCert {
            agent: agent.to_string(),
        });
    }
    SshCert::Granted {
        certificate: issued.certificate,
    }
}

/// The next message of the agent's stream: `Ok(None)` when the stream or connection ended
/// (nothing more to read), `Err` with the reason on bytes that are not a valid frame.
async fn next(
    reader: &mut FrameReader,
    recv: &mut quinn::RecvStream,
) -> Result<Option<AgentMessage>, tunnelfleet_protocol::DecodeError> {
    match reader.next(recv).await {
        Ok(m) => Ok(m),
        Err(FrameReadError::Read(_)) => Ok(None),
        Err(FrameReadError::Decode(e)) => Err(e),
    }
}

async fn refuse(conn: &quinn::Connection, send: &mut quinn::SendStream, reason: String) {
    if let Ok(frame) = encode(&CoordinatorMessage::Refused {
        reason: reason.clone(),
    }) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        // Give the frame a moment to leave before the close overtakes it.
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
    conn.close(close::REFUSED.into(), reason.as_bytes());
}
