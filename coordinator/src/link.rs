//! The coordinator's end of the control link: accept QUIC connections, check the hello
//! against the certificate, then take heartbeats.
//!
//! One bidirectional stream per connection carries the frames. Every refusal is logged with
//! the agent and the reason, and sent to the agent as `Refused` when the connection can still
//! carry it; a malformed frame closes that one connection and nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tunnelfleet_protocol::{
    AgentMessage, CoordinatorMessage, FrameDecoder, Heartbeat, PROTOCOL_VERSION, Welcome,
    check_version, encode,
};

use crate::tls;

/// How long a new connection may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close codes.
pub mod close {
    /// Refused at hello (version, identity).
    pub const REFUSED: u32 = 1;
    /// The peer sent bytes that are not a valid frame.
    pub const MALFORMED: u32 = 2;
    /// The coordinator is shutting down.
    pub const SHUTDOWN: u32 = 3;
}

/// What the coordinator knows about a connected agent (in memory; persistence comes with the
/// fleet state store).
#[derive(Debug, Clone)]
pub struct AgentLink {
    /// Verified agent id.
    pub agent_id: String,
    /// Remote address.
    pub remote: SocketAddr,
    /// Labels from the hello.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Latest heartbeat.
    pub last_heartbeat: Option<Heartbeat>,
    /// Heartbeats received on this connection.
    pub heartbeats: u64,
    /// Still connected.
    pub connected: bool,
}

/// Connected agents by id. A `std` mutex: held only to copy or replace an entry.
#[derive(Debug, Default)]
pub struct Links {
    inner: Mutex<HashMap<String, AgentLink>>,
}

impl Links {
    /// A snapshot of one agent.
    pub fn get(&self, id: &str) -> Option<AgentLink> {
        self.lock().get(id).cloned()
    }

    /// Ids of connected agents.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .values()
            .filter(|l| l.connected)
            .map(|l| l.agent_id.clone())
            .collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AgentLink>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves the control link on `endpoint` until `shutdown`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    links: Arc<Links>,
    heartbeat_interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let links = links.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle(conn, links, heartbeat_interval).await,
                // A client certificate from another CA, or an expired one, ends here.
                Err(e) => tracing::warn!(%remote, "control link refused during handshake: {e}"),
            }
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"coordinator shutting down");
}

async fn handle(conn: quinn::Connection, links: Arc<Links>, heartbeat_interval: Duration) {
    let remote = conn.remote_address();
    let cert_id = match tls::connection_agent_id(&conn) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(%remote, "control link refused: {e}");
            conn.close(close::REFUSED.into(), e.as_bytes());
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
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut hello_done = false;
    loop {
        let msg = loop {
            match dec.next_message::<AgentMessage>() {
                Ok(Some(m)) => break Some(m),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(agent = %cert_id, %remote, "closing control link: {e}");
                    conn.close(close::MALFORMED.into(), e.to_string().as_bytes());
                    mark_disconnected(&links, &cert_id);
                    return;
                }
            }
            let read = if hello_done {
                recv.read(&mut buf).await
            } else {
                match tokio::time::timeout(HELLO_TIMEOUT, recv.read(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(agent = %cert_id, "no hello within {HELLO_TIMEOUT:?}; closing");
                        conn.close(close::REFUSED.into(), b"no hello");
                        return;
                    }
                }
            };
            match read {
                Ok(Some(n)) => dec.push(&buf[..n]),
                Ok(None) | Err(_) => break None,
            }
        };
        let Some(msg) = msg else {
            tracing::info!(agent = %cert_id, "control link closed");
            mark_disconnected(&links, &cert_id);
            return;
        };
        match (hello_done, msg) {
            (false, AgentMessage::Hello(h)) => {
                let refusal = match check_version(h.protocol) {
                    Err(e) => Some(e.to_string()),
                    Ok(()) if h.agent_id != cert_id => Some(format!(
                        "hello says agent {:?} but the certificate is for {cert_id:?}",
                        h.agent_id
                    )),
                    Ok(()) => None,
                };
                if let Some(reason) = refusal {
                    tracing::warn!(agent = %cert_id, %remote, "control link refused: {reason}");
                    refuse(&conn, &mut send, reason).await;
                    return;
                }
                let welcome = CoordinatorMessage::Welcome(Welcome {
                    protocol: PROTOCOL_VERSION,
                    heartbeat_interval_ms: heartbeat_interval.as_millis() as u32,
                    coordinator_version: env!("CARGO_PKG_VERSION").to_string(),
                });
                if let Ok(frame) = encode(&welcome)
                    && send.write_all(&frame).await.is_err()
                {
                    return;
                }
                links.lock().insert(
                    cert_id.clone(),
                    AgentLink {
                        agent_id: cert_id.clone(),
                        remote,
                        labels: h.labels,
                        last_heartbeat: None,
                        heartbeats: 0,
                        connected: true,
                    },
                );
                tracing::info!(agent = %cert_id, %remote, version = %h.agent_version, "agent connected");
                hello_done = true;
            }
            (false, _) => {
                refuse(&conn, &mut send, "the first message must be a hello".into()).await;
                return;
            }
            (true, AgentMessage::Heartbeat(hb)) => {
                if let Some(l) = links.lock().get_mut(&cert_id) {
                    l.heartbeats += 1;
                    l.last_heartbeat = Some(hb);
                }
            }
            (true, AgentMessage::Applied(a)) => {
                tracing::info!(agent = %cert_id, version = a.version, ok = a.ok, "agent applied profiles");
            }
            (true, AgentMessage::Hello(_)) => {
                tracing::warn!(agent = %cert_id, "second hello on one connection; closing");
                conn.close(close::MALFORMED.into(), b"second hello");
                mark_disconnected(&links, &cert_id);
                return;
            }
        }
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

fn mark_disconnected(links: &Links, id: &str) {
    if let Some(l) = links.lock().get_mut(id) {
        l.connected = false;
    }
}
