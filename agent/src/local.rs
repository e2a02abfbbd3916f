//! Local listeners: `L` forwards and `D` (SOCKS5) forwards.
//!
//! A listener stays bound for the life of its profile, across reconnects: an application that
//! connects while the session is being re-established waits (up to `connect_timeout`) instead
//! of getting "connection refused", which is what `ssh -L` under a restart loop gives it. A port
//! that cannot be bound is reported with the port named and retried; the profile's other
//! forwards carry on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::relay::{ForwardCounters, relay};
use crate::socks;
use crate::ssh::Live;
use crate::status::{ForwardState, ProfileShared};
use tunnelfleet_protocol::forward::ForwardSpec;
use tunnelfleet_runtime::backoff::Backoff;

/// The current session of a profile, if one is up.
pub type SessionSlot = watch::Receiver<Option<Arc<Live>>>;

/// Connections one L or D forward serves at once; more are closed as they arrive (a local
/// process gone wild cannot exhaust the agent's descriptors or the session's channels).
pub const MAX_CONNECTIONS: usize = 4096;

/// Connections of one session waiting at once for the server to open their channel (all its
/// L and D forwards together); more wait their turn (up to `connect_timeout`, or until another
/// session takes over) before they ask. Each open russh holds costs ~18 kB until the server
/// answers or the session ends, and a frozen server answers nothing: without a bound, every
/// connection a local client makes to a SIGSTOPped OMA's forward (monitoring probes, retries)
/// is one more (`MAX_CONNECTIONS` of them: 72 MB a forward).
pub const MAX_OPENING: usize = 64;

/// One L or D forward's listener task.
pub struct LocalForward {
    /// Index in the profile's forwards.
    pub index: usize,
    /// The forward (Local or Dynamic).
    pub spec: ForwardSpec,
    /// Status to update.
    pub shared: Arc<ProfileShared>,
    /// This forward's counters.
    pub counters: Arc<ForwardCounters>,
    /// The session to open channels on.
    pub session: SessionSlot,
    /// How long a new connection waits for a session that is down.
    pub wait_for_session: Duration,
    /// Connections served at once ([`MAX_CONNECTIONS`]); more are closed as they arrive.
    pub max_connections: usize,
    /// Stop accepting.
    pub cancel: CancellationToken,
    /// Connection tasks, drained at shutdown.
    pub tracker: TaskTracker,
}

impl LocalForward {
    /// Binds (retrying while the port is taken) and serves until cancelled.
    pub async fn run(mut self) {
        let Some((bind, port)) = self.spec.local_listen().map(|(b, p)| (b.to_string(), p)) else {
            return;
        };
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let listener = loop {
            match TcpListener::bind((bind.as_str(), port)).await {
                Ok(l) => break l,
                Err(e) => {
                    let why = if e.kind() == std::io::ErrorKind::AddrInUse {
                        format!(
                            "cannot listen on {bind}:{port}: port {port} is already in use by another process; retrying"
                        )
                    } else {
                        format!("cannot listen on {bind}:{port}: {e}; retrying")
                    };
                    self.shared
                        .set_forward(self.index, ForwardState::Retrying, Some(why));
                    tokio::select! {
                        _ = self.cancel.cancelled() => {
                            self.shared.set_forward(self.index, ForwardState::Stopped, None);
                            return;
                        }
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        let cap = self.max_connections;
        let permits = Arc::new(Semaphore::new(cap));
        loop {
            let state = if self.session.borrow().is_some() {
                ForwardState::Active
            } else {
                ForwardState::Listening
            };
            self.shared.set_forward(self.index, state, None);
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                changed = self.session.changed() => if changed.is_err() { break },
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => match permits.clone().try_acquire_owned() {
                        Ok(permit) => self.spawn_connection(tcp, peer, permit),
                        Err(_) => {
                            tracing::warn!(forward = %self.spec, %peer, "{cap} connections open; closing a new one");
                            drop(tcp);
                        }
                    },
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly, keep serving.
                        tracing::warn!(forward = %self.spec, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        self.shared
            .set_forward(self.index, ForwardState::Stopped, None);
    }

    fn spawn_connection(&self, tcp: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        let _ = tcp.set_nodelay(true);
        let spec = self.spec.clone();
        let counters = self.counters.clone();
        let session = self.session.clone();
        let wait = self.wait_for_session;
        self.tracker.spawn(async move {
            let _permit = permit;
            let _open = counters.hold_open();
            let deadline = Instant::now() + wait;
            if let Err(e) = serve(tcp, peer, &spec, session, deadline, &counters).await {
                tracing::debug!(forward = %spec, %peer, "connection ended: {e}");
            }
        });
    }
}

async fn serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    spec: &ForwardSpec,
    session: SessionSlot,
    deadline: Instant,
    counters: &Arc<ForwardCounters>,
) -> Result<(), ConnectionError> {
    let (host, port, socks) = match spec {
        ForwardSpec::Local {
            host, host_port, ..
        } => (host.clone(), *host_port, false),
        ForwardSpec::Dynamic { .. } => {
            let (h, p) = socks::accept_in_time(&mut tcp).await?;
            (h, p, true)
        }
        ForwardSpec::Remote { .. } => return Ok(()),
    };
    let Some((live, permit)) = turn(session, deadline).await else {
        if socks {
            let _ = socks::reply(&mut tcp, socks::Reply::GeneralFailure).await;
        }
        return Err(ConnectionError::NoSession);
    };
    // The connection belongs to the session it was opened on: a move to another endpoint lets
    // it finish there.
    let _carried = live.conns.token();
    let asking = counters.hold_opening();
    let channel = match live
        .handle
        .channel_open_direct_tcpip(
            host.clone(),
            port as u32,
            peer.ip().to_string(),
            peer.port() as u32,
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            if socks {
                let _ = socks::reply(&mut tcp, socks::Reply::HostUnreachable).await;
            }
            return Err(ConnectionError::Open {
                target: format!("{host}:{port}"),
                source: e,
            });
        }
    };
    let server_close = live.closes.expect(channel.id());
    drop((asking, permit, live));
    if socks {
        socks::reply(&mut tcp, socks::Reply::Success)
            .await
            .map_err(ConnectionError::Io)?;
    }
    let mut stream = channel.into_stream();
    let relayed = relay(tcp, &mut stream, counters).await;
    if relayed.is_ok() {
        // Both sides sent EOF: held until the server's CLOSE, which OpenSSH sends then (see
        // `server_close`: dropped first, russh keeps the channel for the session's life). A
        // relay that failed lets go at once: a channel still receiving and not read would
        // stall the whole session.
        server_close.wait().await;
    }
    drop(stream);
    relayed.map_err(ConnectionError::Io)
}

/// Why one forwarded connection ended early (logged at debug; the listener carries on).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    /// The SOCKS handshake failed.
    #[error(transparent)]
    Socks(#[from] socks::SocksError),
    /// No session came up, or none had a turn free, within `connect_timeout`.
    #[error("no SSH session answering within connect_timeout; connection closed")]
    NoSession,
    /// The server would not open the channel.
    #[error("server could not open {target}: {source}")]
    Open {
        /// `host:port` asked for.
        target: String,
        /// Its refusal.
        source: russh::Error,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Io(std::io::Error),
}

/// The session to open a channel on and a turn at asking it ([`MAX_OPENING`]), once both are
/// there before `deadline`. A session taking over while this waits for a turn is asked
/// instead.
async fn turn(
    mut session: SessionSlot,
    deadline: Instant,
) -> Option<(Arc<Live>, OwnedSemaphorePermit)> {
    loop {
        let live = tokio::time::timeout_at(deadline, session.wait_for(|s| s.is_some()))
            .await
            .ok()?
            .ok()?
            .clone()?;
        tokio::select! {
            t = tokio::time::timeout_at(deadline, live.opening.clone().acquire_owned()) => {
                return Some((live, t.ok()?.ok()?));
            }
            changed = session.changed() => changed.ok()?,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.
    use super::*;
    use tokio::io::AsyncReadExt;

    /// With the session down, connections wait for it holding their place: beyond the cap a
    /// new one is closed at once.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_as_they_arrive() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let line = format!("L 127.0.0.1:{port}:127.0.0.1:9");
        let spec = ForwardSpec::parse(&line).unwrap();
        let shared = Arc::new(ProfileShared::new("p", "", vec![], &[line], None));
        let (_session_tx, session) = watch::channel(None);
        let cancel = CancellationToken::new();
        let lf = LocalForward {
            index: 0,
            spec,
            counters: shared.counters[0].clone(),
            shared,
            session,
            wait_for_session: Duration::from_secs(3600),
            max_connections: 3,
            cancel: cancel.clone(),
            tracker: TaskTracker::new(),
        };
        tokio::spawn(lf.run());
        let connect = || async {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match TcpStream::connect(("127.0.0.1", port)).await {
                    Ok(s) => return s,
                    Err(_) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        };
        // Closed at once: EOF well before the hour a held connection would wait.
        let closed_now = |mut s: TcpStream| async move {
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        };
        let mut _held = Vec::new();
        for _ in 0..3 {
            _held.push(connect().await);
        }
        assert!(
            closed_now(connect().await).await,
            "a fourth connection was kept"
        );
        cancel.cancel();
    }
}
