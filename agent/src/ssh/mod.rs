//! One SSH client session: connect, verify the host key, authenticate, and serve the channels
//! the server opens back to us (remote forwards).
//!
//! The russh client [`Handler`] here is deliberately small: host-key verdicts go to
//! [`HostTrust`], incoming `forwarded-tcpip` channels go to the [`RemoteForwards`] table the
//! profile runner fills, and the session's end is reported on a oneshot so the runner notices a
//! dead session (keepalive timeout, EOF, disconnect) the moment russh does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, ChannelOpenHandle, Handle, Msg, Session};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelId, ChannelOpenFailure, Preferred, cipher};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::hostkey::{HostKeyError, HostTrust, Verdict, fingerprint};
use crate::relay::{ForwardCounters, WINDOW_SIZE, relay};
use crate::server_close::ServerCloses;
use tunnelfleet_protocol::jump::JumpHost;

mod handler;
pub use handler::ClientHandler;

/// Ciphers in order of preference. AES-GCM first: with AES-NI (ring uses it) it is the fastest
/// AEAD on the x86 appliances we run on, ahead of chacha20-poly1305 which OpenSSH prefers.
pub const CIPHERS: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_CTR,
    cipher::AES_128_CTR,
];

impl SessionError {
    /// The kind reported to the coordinator.
    pub fn kind(&self) -> tunnelfleet_protocol::ErrorKind {
        use tunnelfleet_protocol::ErrorKind as K;
        match self {
            SessionError::Connect { .. } => K::Connect,
            SessionError::Timeout { .. } => K::Timeout,
            SessionError::HostKey { .. } => K::HostKey,
            SessionError::Auth { .. } | SessionError::NoCertificate { .. } => K::Auth,
            SessionError::Ssh { .. } => K::Ssh,
            SessionError::Jump { .. } => K::Jump,
            SessionError::Unreachable { .. } => K::Connect,
        }
    }
}

/// Why a session could not be established.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// TCP connect failed.
    #[error("connect to {endpoint}: {source}")]
    Connect {
        /// `host:port`.
        endpoint: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// Connect, handshake and authentication did not finish in time.
    #[error("{endpoint}: no session within {timeout:?} (connect_timeout)")]
    Timeout {
        /// `host:port`.
        endpoint: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The host key was refused.
    #[error("{endpoint}: {source}")]
    HostKey {
        /// `host:port`.
        endpoint: String,
        /// Why, with the offered fingerprint (boxed: it is large and rare).
        source: Box<HostKeyError>,
    },
    /// The server refused our key.
    #[error("{endpoint}: authentication as {user:?} with {key} refused by the server")]
    Auth {
        /// `host:port`.
        endpoint: String,
        /// Remote user.
        user: String,
        /// Fingerprint of our key.
        key: String,
    },
    /// The profile logs in with the agent's certificate, and the coordinator has not issued
    /// one yet.
    #[error(
        "{endpoint}: no SSH certificate for this agent's key {key} yet (the coordinator issues it over the control link)"
    )]
    NoCertificate {
        /// `host:port`.
        endpoint: String,
        /// Fingerprint of the agent's key.
        key: String,
    },
    /// Any other SSH-level failure.
    #[error("{endpoint}: ssh: {source}")]
    Ssh {
        /// `host:port`.
        endpoint: String,
        /// russh's error.
        source: russh::Error,
    },
    /// The last jump host is up but could not reach the endpoint.
    #[error("{endpoint} unreachable from jump host {hop}: {source}")]
    Unreachable {
        /// `host:port`.
        endpoint: String,
        /// The hop that tried, `[user@]host:port`.
        hop: String,
        /// Its refusal.
        source: russh::Error,
    },
    /// A jump host on the way failed.
    #[error("{endpoint} via jump host {hop}: {source}")]
    Jump {
        /// The hop that failed, `[user@]host:port`.
        hop: String,
        /// The endpoint being reached.
        endpoint: String,
        /// What went wrong at the hop.
        source: Box<SessionError>,
    },
}

/// A remote forward the server may open channels for.
#[derive(Debug, Clone)]
pub struct RemoteEntry {
    /// Index of the forward in the profile (for status).
    pub index: usize,
    /// Port requested on the server.
    pub requested_port: u32,
    /// Port the server actually bound (differs when 0 was requested).
    pub bound_port: Option<u32>,
    /// Local target host.
    pub host: String,
    /// Local target port.
    pub port: u16,
    /// Counters of this forward.
    pub counters: Arc<ForwardCounters>,
}

/// The remote forwards of a profile, looked up when the server opens `forwarded-tcpip`.
#[derive(Debug, Default)]
pub struct RemoteForwards {
    entries: Mutex<Vec<RemoteEntry>>,
}

impl RemoteForwards {
    /// Replaces the table.
    pub fn set(&self, entries: Vec<RemoteEntry>) {
        *self.lock() = entries;
    }

    /// Records the port the server bound for forward `index`.
    pub fn mark_bound(&self, index: usize, port: u32) {
        if let Some(e) = self.lock().iter_mut().find(|e| e.index == index) {
            e.bound_port = Some(port);
        }
    }

    /// Forgets bound ports (session gone).
    pub fn clear_bound(&self) {
        for e in self.lock().iter_mut() {
            e.bound_port = None;
        }
    }

    fn lookup(&self, port: u32) -> Option<RemoteEntry> {
        let entries = self.lock();
        entries
            .iter()
            .find(|e| e.bound_port == Some(port))
            .or_else(|| entries.iter().find(|e| e.requested_port == port))
            .cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RemoteEntry>> {
        // Plain data; see ProfileShared::lock for why poisoning is ignored.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything needed to open a session for a profile.
#[derive(Clone)]
pub struct SessionParams {
    /// Profile name (for logs).
    pub profile: String,
    /// Remote user.
    pub user: String,
    /// What we log in with.
    pub identity: Identity,
    /// Host-key trust.
    pub trust: Arc<HostTrust>,
    /// russh client config (keepalive, window, ciphers).
    pub config: Arc<client::Config>,
    /// The profile's remote forwards.
    pub remote: Arc<RemoteForwards>,
    /// Tracks relay tasks so shutdown can drain them.
    pub tracker: TaskTracker,
    /// Deadline for connect + handshake + auth (through every jump host).
    pub connect_timeout: Duration,
    /// Jump hosts, first to last (empty: connect directly).
    pub jump: Vec<JumpHost>,
}

/// What a profile's sessions bring besides its config: how they log in, and the fleet's SSH
/// host CA file when the profile trusts it (`fleet_host_ca`; the agent keeps it current from
/// its coordinator's welcome).
#[derive(Clone)]
pub struct Login {
    /// How it logs in.
    pub identity: Identity,
    /// `STATE_DIR/ssh/known_hosts`: `@cert-authority * <the fleet's host CA>`.
    pub fleet_host_ca: Option<std::path::PathBuf>,
}

/// How a session logs in: a key file of the profile's, or the agent's own key with the
/// certificate the coordinator issued (read at each login, so a renewal reaches the next one).
#[derive(Clone)]
pub enum Identity {
    /// A static key (`identity_file`).
    Key(Arc<PrivateKey>),
    /// The agent's own key and its current certificate.
    Certified(Arc<crate::sshcert::SshCredential>),
}

impl Identity {
    /// The key's fingerprint, for errors.
    pub fn fingerprint(&self) -> String {
        match self {
            Identity::Key(k) => fingerprint(k.public_key()),
            Identity::Certified(c) => c.fingerprint(),
        }
    }
}

/// Builds the russh client config for a profile: a silent server is dropped
/// `keepalive_interval × keepalive_count` after it last sent anything (OpenSSH's
/// `ServerAliveInterval × ServerAliveCountMax`).
/// Keys are renewed after `rekey.0` bytes either way or `rekey.1`, whichever comes first.
pub fn client_config(
    keepalive_interval: Duration,
    keepalive_count: u32,
    rekey: (u64, Duration),
    host_certificates: bool,
) -> client::Config {
    let (interval, max) = keepalive(keepalive_interval, keepalive_count);
    let bytes = usize::try_from(rekey.0).unwrap_or(usize::MAX);
    client::Config {
        limits: russh::Limits {
            rekey_write_limit: bytes,
            rekey_read_limit: bytes,
            rekey_time_limit: rekey.1,
        },
        keepalive_interval: Some(interval),
        keepalive_max: max,
        window_size: WINDOW_SIZE,
        maximum_packet_size: 32768,
        channel_buffer_size: 64,
        nodelay: true,
        preferred: Preferred {
            cipher: std::borrow::Cow::Borrowed(CIPHERS),
            // Ed25519 only: the fleet's host CA certifies ed25519 host keys, and russh's RSA
            // certificates carry a SHA-1 pitfall.
            host_key_certificates: std::borrow::Cow::Borrowed(if host_certificates {
                &[russh::keys::Algorithm::Ed25519]
            } else {
                &[]
            }),
            ..Preferred::default()
        },
        ..client::Config::default()
    }
}

/// russh's keepalive timer and limit for "dead after `count` silent intervals". russh counts a
/// timeout on every silent interval and gives up when the count *exceeds* its limit (and 0
/// means never), so `count` intervals are a limit of `count - 1`; a count of 1 is two
/// half-intervals with a limit of 1.
pub fn keepalive(interval: Duration, count: u32) -> (Duration, usize) {
    match count {
        0 | 1 => (interval / 2, 1),
        n => (interval, (n - 1) as usize),
    }
}

/// How long a session may take to say goodbye. A server that stopped reading (or a stalled
/// transport) would otherwise hold the disconnect until its own inactivity timeout, minutes
/// later, and with it a shutdown that promised a bounded drain.
pub const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends SSH_MSG_DISCONNECT, waiting at most [`DISCONNECT_TIMEOUT`]; the session is closed
/// either way once its handles are dropped.
pub async fn disconnect(handle: &Handle<ClientHandler>, why: &str) {
    if tokio::time::timeout(
        DISCONNECT_TIMEOUT,
        handle.disconnect(russh::Disconnect::ByApplication, why, ""),
    )
    .await
    .is_err()
    {
        tracing::warn!(
            reason = why,
            "the server did not take the disconnect within {DISCONNECT_TIMEOUT:?}; dropping the session"
        );
    }
}

/// A session as the forwards use it: the handle to open channels on, and the connections it
/// carries (each holds a token of `conns`), so a session left behind by a move drains its own
/// connections and no one else's.
pub struct Live {
    /// The russh handle.
    pub handle: Handle<ClientHandler>,
    /// Connections carried by this session.
    pub conns: TaskTracker,
    /// `host:port` it is connected to.
    pub endpoint: String,
    /// Turns at asking the server for a channel ([`crate::local::MAX_OPENING`]).
    pub opening: Arc<tokio::sync::Semaphore>,
    /// Its finished channels held until the server's CLOSE.
    pub closes: ServerCloses,
}

/// An established session.
pub struct SshSession {
    /// The russh handle: open channels, request forwards, disconnect.
    pub handle: Handle<ClientHandler>,
    /// Resolves with the reason when the session ends.
    pub closed: oneshot::Receiver<String>,
    /// `host:port` it is connected to.
    pub endpoint: String,
    /// Host key fingerprint of the server.
    pub host_key: String,
    /// Sessions to the jump hosts this one runs through; they close when it is dropped.
    pub jumps: Vec<Handle<ClientHandler>>,
    /// Connections carried by this session (remote-forward ones are counted by its handler).
    pub conns: TaskTracker,
    /// Its finished channels held until the server's CLOSE.
    pub closes: ServerCloses,
}

/// The endpoint's own session over `stream` (direct, or the last jump host's channel): it
/// serves the profile's remote forwards and reports its end.
pub(crate) async fn endpoint_session<S>(
    p: &SessionParams,
    stream: S,
    host: &str,
    port: u16,
    endpoint: &str,
    jumps: Vec<Handle<ClientHandler>>,
) -> Result<SshSession, SessionError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (closed_tx, closed) = oneshot::channel();
    let hop = Hop {
        host,
        port,
        user: &p.user,
        endpoint,
        jump: false,
    };
    let conns = TaskTracker::new();
    let closes = ServerCloses::default();
    let (handle, host_key) = handshake(
        p,
        stream,
        hop,
        p.remote.clone(),
        Some(closed_tx),
        conns.clone(),
        closes.clone(),
    )
    .await?;
    Ok(SshSession {
        handle,
        closed,
        endpoint: endpoint.to_string(),
        host_key,
        jumps,
        conns,
        closes,
    })
}

pub(crate) async fn tcp(host: &str, port: u16, endpoint: &str) -> Result<TcpStream, SessionError> {
    let stream =
        TcpStream::connect((host, port))
            .await
            .map_err(|source| SessionError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Where one SSH handshake goes, and as whom.
#[derive(Clone, Copy)]
pub(crate) struct Hop<'a> {
    /// Host to verify the key for.
    pub(crate) host: &'a str,
    /// Its port.
    pub(crate) port: u16,
    /// The login name to authenticate as.
    pub(crate) user: &'a str,
    /// `host:port` for errors and logs.
    pub(crate) endpoint: &'a str,
    /// A jump host on the way (its key is trusted only by a pin or line naming it).
    pub(crate) jump: bool,
}

/// The SSH handshake over `stream`: host key verified for `hop`, then public-key authentication
/// as `hop.user`. Returns the handle and the verified host key's fingerprint.
pub(crate) async fn handshake<S>(
    p: &SessionParams,
    stream: S,
    hop: Hop<'_>,
    remote: Arc<RemoteForwards>,
    closed: Option<oneshot::Sender<String>>,
    conns: TaskTracker,
    closes: ServerCloses,
) -> Result<(Handle<ClientHandler>, String), SessionError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let endpoint = hop.endpoint;
    let verdict = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        host: hop.host.to_string(),
        port: hop.port,
        jump: hop.jump,
        profile: p.profile.clone(),
        trust: p.trust.clone(),
        verdict: verdict.clone(),
        remote,
        tracker: p.tracker.clone(),
        conns,
        closed,
        closes,
    };
    let ssh_err = |source: russh::Error| -> SessionError {
        let v = verdict.lock().unwrap_or_else(|p| p.into_inner()).take();
        match v {
            Some((Verdict::Refused(e), _)) => SessionError::HostKey {
                endpoint: endpoint.to_string(),
                source: Box::new(e),
            },
            _ => SessionError::Ssh {
                endpoint: endpoint.to_string(),
                source,
            },
        }
    };
    let mut handle = client::connect_stream(p.config.clone(), stream, handler)
        .await
        .map_err(ssh_err)?;
    let host_key = match verdict.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some((Verdict::Trusted | Verdict::Learned, fp)) => fp,
        _ => String::new(),
    };
    let auth = match &p.identity {
        Identity::Key(key) => {
            let hash = handle
                .best_supported_rsa_hash()
                .await
                .map_err(ssh_err)?
                .flatten();
            handle
                .authenticate_publickey(
                    hop.user.to_string(),
                    PrivateKeyWithHashAlg::new(key.clone(), hash),
                )
                .await
                .map_err(ssh_err)?
        }
        Identity::Certified(cred) => {
            let Some(cert) = cred.certificate() else {
                return Err(SessionError::NoCertificate {
                    endpoint: endpoint.to_string(),
                    key: cred.fingerprint(),
                });
            };
            handle
                .authenticate_openssh_cert(hop.user.to_string(), cred.key(), cert)
                .await
                .map_err(ssh_err)?
        }
    };
    if !auth.success() {
        return Err(SessionError::Auth {
            endpoint: endpoint.to_string(),
            user: hop.user.to_string(),
            key: p.identity.fingerprint(),
        });
    }
    Ok((handle, host_key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// russh's rule, as its client loop applies it: one more timeout per silent interval, dead
    /// once the count exceeds the limit.
    fn dead_after((interval, max): (Duration, usize)) -> Duration {
        let mut timeouts = 0usize;
        let mut t = Duration::ZERO;
        loop {
            t += interval;
            timeouts += 1;
            if max != 0 && timeouts > max {
                return t;
            }
        }
    }

    #[test]
    fn a_silent_server_is_dropped_after_interval_times_count() {
        let s = Duration::from_secs;
        assert_eq!(dead_after(keepalive(s(5), 3)), s(15));
        assert_eq!(dead_after(keepalive(s(1), 2)), s(2));
        assert_eq!(dead_after(keepalive(s(4), 1)), s(4));
        assert_eq!(dead_after(keepalive(s(30), 3)), s(90));
    }
}
