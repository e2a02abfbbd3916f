//! The russh client handler of one session: the host key verdict, the server's `R`
//! connections, channel closes and the session's end.

use super::*;

/// The russh client handler of one session.
pub struct ClientHandler {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) jump: bool,
    pub(super) profile: String,
    pub(super) trust: Arc<HostTrust>,
    pub(super) verdict: Arc<Mutex<Option<(Verdict, String)>>>,
    pub(super) remote: Arc<RemoteForwards>,
    pub(super) tracker: TaskTracker,
    pub(super) conns: TaskTracker,
    pub(super) closed: Option<oneshot::Sender<String>>,
    /// Finished channels held until the server's CLOSE.
    pub(super) closes: ServerCloses,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let (verdict, fp) = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => (
                self.trust.verify(&self.host, self.port, key, self.jump),
                fingerprint(key),
            ),
            PublicKeyOrCertificate::Certificate(cert) => (
                self.trust.verify_certificate(
                    &self.host,
                    self.port,
                    cert,
                    self.jump,
                    tunnelfleet_runtime::clock::now_unix_ms() / 1000,
                ),
                fingerprint(&russh::keys::PublicKey::from(cert.public_key().clone())),
            ),
        };
        let accepted = match &verdict {
            Verdict::Trusted => true,
            Verdict::Learned => {
                tracing::warn!(profile = %self.profile, host = %self.host, port = self.port, fingerprint = %fp, "trust_on_first_use: recorded a new host key");
                true
            }
            Verdict::Refused(e) => {
                tracing::error!(profile = %self.profile, "{e}");
                false
            }
        };
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some((verdict, fp));
        Ok(accepted)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(entry) = self.remote.lookup(connected_port) else {
            tracing::warn!(profile = %self.profile, port = connected_port, address = connected_address, "server opened a forwarded connection for a port we did not forward; refused");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let profile = self.profile.clone();
        let origin = format!("{originator_address}:{originator_port}");
        // Registered before the channel is accepted: the server cannot close it before.
        let server_close = self.closes.expect(channel.id());
        // Connecting to the local target may take a while; never block the session loop on it.
        let carried = self.conns.token();
        self.tracker.spawn(async move {
            let _carried = carried;
            match TcpStream::connect((entry.host.as_str(), entry.port)).await {
                Ok(local) => {
                    let _ = local.set_nodelay(true);
                    reply.accept().await;
                    let _open = entry.counters.hold_open();
                    let mut stream = channel.into_stream();
                    // Both sides sent EOF: the server closes, then the channel goes (a relay
                    // that failed lets go at once: unread, it would stall the session).
                    if relay(local, &mut stream, &entry.counters).await.is_ok() {
                        server_close.wait().await;
                    }
                    drop(stream);
                }
                Err(e) => {
                    tracing::warn!(profile = %profile, target = %format!("{}:{}", entry.host, entry.port), from = %origin, "remote forward: local target refused: {e}");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.closes.closed(channel);
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let (text, result) = match reason {
            client::DisconnectReason::ReceivedDisconnect(info) => (
                format!(
                    "server disconnected: {:?} {}",
                    info.reason_code, info.message
                ),
                Ok(()),
            ),
            client::DisconnectReason::Error(e) => (describe_close(&e), Err(e)),
        };
        if let Some(tx) = self.closed.take() {
            let _ = tx.send(text);
        }
        result
    }
}

fn describe_close(e: &russh::Error) -> String {
    match e {
        russh::Error::KeepaliveTimeout => "keepalive timeout: server stopped answering".into(),
        russh::Error::InactivityTimeout => "inactivity timeout".into(),
        russh::Error::IO(io) => format!("connection lost: {io}"),
        russh::Error::Disconnect => "connection closed by server".into(),
        other => format!("session error: {other}"),
    }
}
