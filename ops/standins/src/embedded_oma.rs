//! An embedded OMA: a russh SSH server that serves `direct-tcpip` (L and D forwards) and
//! `tcpip-forward` (R forwards), with its services behind it.
//!
//! It exists so `tunnelfleet demo` runs on any machine with nothing installed. It is not a
//! substitute for OpenSSH in tests of the agent: those run against a real sshd. Like an OMA, it
//! exposes only its own services: `direct-tcpip` to `localhost:<port>` is mapped to the
//! in-process service registered under that port, anything else is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{Algorithm, PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, MethodKind, MethodSet};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What an embedded OMA serves.
pub struct OmaSpec {
    /// Name shown in logs.
    pub name: String,
    /// The one client key it accepts.
    pub authorized: PublicKey,
    /// Virtual `localhost` ports and the real addresses behind them.
    pub services: HashMap<u16, SocketAddr>,
}

/// A running embedded OMA; [`EmbeddedOma::stop`] (or drop) kills it and every session.
pub struct EmbeddedOma {
    /// Its name.
    pub name: String,
    /// The SSH port on 127.0.0.1.
    pub port: u16,
    /// `SHA256:…` of its host key.
    pub fingerprint: String,
    /// The serving loop's stop token and tasks (replaced by a restart).
    running: std::sync::Mutex<(CancellationToken, TaskTracker)>,
    /// True while it is frozen: nothing read or written on any connection, nothing accepted.
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    spec: Arc<OmaSpec>,
    host_key: PrivateKey,
}

/// Accepts SSH sessions on `listener` until the returned token is cancelled; while `frozen`
/// holds true, accepts nothing and moves no byte on any session.
fn serve(
    shared: Arc<OmaSpec>,
    host_key: PrivateKey,
    listener: TcpListener,
    frozen: tokio::sync::watch::Receiver<bool>,
) -> (CancellationToken, TaskTracker) {
    let config = Arc::new(server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        window_size: tunnelfleet_agent::relay::WINDOW_SIZE,
        nodelay: true,
        keepalive_interval: Some(Duration::from_secs(5)),
        ..Default::default()
    });
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (s, t) = (stop.clone(), tasks.clone());
    tasks.spawn(async move {
        loop {
            let mut gate = frozen.clone();
            // Frozen: the kernel still completes TCP handshakes into the backlog, and nothing
            // answers them (no banner), like a host that stopped responding.
            tokio::select! {
                _ = s.cancelled() => return,
                _ = gate.wait_for(|f| !*f) => {}
            }
            let (tcp, _) = tokio::select! {
                _ = s.cancelled() => return,
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            };
            let _ = tcp.set_nodelay(true);
            let tcp = Frozen::new(tcp, &frozen);
            let handler = OmaHandler {
                spec: shared.clone(),
                forwards: Arc::new(Mutex::new(HashMap::new())),
                session_stop: s.child_token(),
                tasks: t.clone(),
                frozen: frozen.clone(),
            };
            let (config, s2) = (config.clone(), s.clone());
            t.spawn(async move {
                let session_stop = handler.session_stop.clone();
                let Ok(mut running) = server::run_stream(config, tcp, handler).await else {
                    return;
                };
                let handle = running.handle();
                tokio::select! {
                    _ = &mut running => {}
                    _ = s2.cancelled() => {
                        // The OMA goes away: end the session so the TCP connection closes.
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, "OMA stopping".into(), String::new())
                            .await;
                        let _ = tokio::time::timeout(Duration::from_secs(1), running).await;
                    }
                }
                session_stop.cancel();
            });
        }
    });
    (stop, tasks)
}

impl EmbeddedOma {
    /// Starts the server on 127.0.0.1, port chosen by the OS.
    pub async fn start(spec: OmaSpec) -> std::io::Result<EmbeddedOma> {
        let host_key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
            .map_err(std::io::Error::other)?;
        let fingerprint = tunnelfleet_agent::hostkey::fingerprint(host_key.public_key());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let name = spec.name.clone();
        let spec = Arc::new(spec);
        let frozen = Arc::new(tokio::sync::watch::Sender::new(false));
        let (stop, tasks) = serve(spec.clone(), host_key.clone(), listener, frozen.subscribe());
        Ok(EmbeddedOma {
            name,
            port,
            fingerprint,
            running: std::sync::Mutex::new((stop, tasks)),
            frozen,
            spec,
            host_key,
        })
    }

    /// Starts it again after [`EmbeddedOma::stop`]: same port, same host key (an OMA coming
    /// back after an outage).
    pub async fn restart(&self) -> std::io::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.frozen.send_replace(false);
        *self.lock() = serve(
            self.spec.clone(),
            self.host_key.clone(),
            listener,
            self.frozen.subscribe(),
        );
        Ok(())
    }

    /// Stops answering without closing anything (a host that hangs, a network that drops
    /// every packet): sessions stay open with nothing read or written, new connections are
    /// not served. Only timeouts can tell.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Answers again after [`EmbeddedOma::freeze`].
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (CancellationToken, TaskTracker)> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops accepting and drops every session at once (an OMA going away).
    pub async fn stop(&self) {
        let (stop, tasks) = self.lock().clone();
        stop.cancel();
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    }
}

/// Resolves once the gate is open.
async fn wait_thawed(mut frozen: tokio::sync::watch::Receiver<bool>) {
    let _ = frozen.wait_for(|f| !*f).await;
}

/// A connection that moves no byte while its OMA is frozen.
struct Frozen {
    inner: TcpStream,
    frozen: tokio::sync::watch::Receiver<bool>,
    /// The reader's and the writer's wait for the thaw, apart: a future keeps only the waker
    /// of its last poll, and the two sides may be polled by different tasks.
    gates: [tokio_util::sync::ReusableBoxFuture<'static, ()>; 2],
}

/// Which side of a [`Frozen`] connection waits.
#[derive(Clone, Copy)]
enum Side {
    Read = 0,
    Write = 1,
}

impl Frozen {
    fn new(inner: TcpStream, frozen: &tokio::sync::watch::Receiver<bool>) -> Frozen {
        let gate = || tokio_util::sync::ReusableBoxFuture::new(wait_thawed(frozen.clone()));
        Frozen {
            inner,
            frozen: frozen.clone(),
            gates: [gate(), gate()],
        }
    }

    /// Ready when not frozen; otherwise pending, `side`'s task woken when thawed.
    fn poll_open(&mut self, side: Side, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if !*self.frozen.borrow() {
            return std::task::Poll::Ready(());
        }
        let gate = &mut self.gates[side as usize];
        match gate.poll(cx) {
            std::task::Poll::Ready(()) => {
                gate.set(wait_thawed(self.frozen.clone()));
                std::task::Poll::Ready(())
            }
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for Frozen {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_open(Side::Read, cx));
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Frozen {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_open(Side::Write, cx));
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_open(Side::Write, cx));
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Drop for EmbeddedOma {
    fn drop(&mut self) {
        self.lock().0.cancel();
    }
}

struct OmaHandler {
    spec: Arc<OmaSpec>,
    /// Remote forwards of this session: port → listener stop.
    forwards: Arc<Mutex<HashMap<u32, CancellationToken>>>,
    session_stop: CancellationToken,
    tasks: TaskTracker,
    /// The OMA's freeze: its remote-forward ports are on its own host, out of everyone's
    /// reach while it is frozen, so they close (two embedded OMAs share this machine's ports;
    /// two real ones do not).
    frozen: tokio::sync::watch::Receiver<bool>,
}

impl server::Handler for OmaHandler {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if key.public_key.key_data() == self.spec.authorized.key_data() {
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let local = matches!(host_to_connect, "localhost" | "127.0.0.1" | "::1");
        let target = u16::try_from(port_to_connect)
            .ok()
            .filter(|_| local)
            .and_then(|p| self.spec.services.get(&p).copied());
        let Some(addr) = target else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let stop = self.session_stop.clone();
        self.tasks.spawn(async move {
            match TcpStream::connect(addr).await {
                Ok(mut tcp) => {
                    let _ = tcp.set_nodelay(true);
                    reply.accept().await;
                    let mut stream = channel.into_stream();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut stream, 256 * 1024, 256 * 1024) => {}
                        _ = stop.cancelled() => {}
                    }
                }
                Err(_) => {
                    reply
                        .reject(russh::ChannelOpenFailure::ConnectFailed)
                        .await
                }
            }
        });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Ok(want) = u16::try_from(*port) else {
            return Ok(false);
        };
        // Loopback only, like sshd with GatewayPorts=no.
        let Ok(listener) = TcpListener::bind(("127.0.0.1", want)).await else {
            return Ok(false);
        };
        let bound = listener.local_addr().map(|a| a.port()).unwrap_or(want) as u32;
        *port = bound;
        let stop = self.session_stop.child_token();
        if let Ok(mut f) = self.forwards.lock() {
            f.insert(bound, stop.clone());
        }
        let handle = session.handle();
        let address = address.to_string();
        let tasks = self.tasks.clone();
        let mut frozen = self.frozen.clone();
        self.tasks.spawn(async move {
            loop {
                let (mut tcp, peer) = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = frozen.wait_for(|f| *f) => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let (handle, address, stop) = (handle.clone(), address.clone(), stop.clone());
                tasks.spawn(async move {
                    let Ok(ch) = handle
                        .channel_open_forwarded_tcpip(
                            address,
                            bound,
                            peer.ip().to_string(),
                            peer.port() as u32,
                        )
                        .await
                    else {
                        return;
                    };
                    let mut stream = ch.into_stream();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut tcp, &mut stream) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let stop = self.forwards.lock().ok().and_then(|mut f| f.remove(&port));
        Ok(stop.map(|s| s.cancel()).is_some())
    }
}

impl Drop for OmaHandler {
    fn drop(&mut self) {
        self.session_stop.cancel();
    }
}
