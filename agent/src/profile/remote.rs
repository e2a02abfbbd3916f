//! Remote (`R`) forwards: one request, the refusals an operator can act on, and holding a
//! forward while the server refuses it.

use std::sync::Arc;
use std::time::Duration;

use russh::client::Handle;
use tokio_util::sync::CancellationToken;

use crate::reclaim::ReclaimError;
use crate::ssh::{ClientHandler, Live, RemoteForwards};
use crate::status::{ForwardState, ProfileShared};
use tunnelfleet_runtime::backoff::Backoff;

/// One remote forward to request.
pub(super) struct RemoteRequest {
    pub(super) index: usize,
    pub(super) bind: String,
    pub(super) port: u16,
    pub(super) reclaim: bool,
}

/// How long one remote-forward request may take before it counts as refused.
const REMOTE_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server did not bind a remote forward; each says what an operator can do.
#[derive(Debug, thiserror::Error)]
pub enum RemoteRefused {
    /// The server refused the port: in use there, most likely by this account's stale session.
    #[error(
        "the server refused to listen on {bind}:{port} (port {port} in use on the server, most likely by this account's stale session from before a reconnect: install ops/deploy/oma/ on the OMA so sshd drops dead sessions within 15 s, or set reclaim_remote_ports = true)"
    )]
    Held {
        /// The bind address asked for.
        bind: String,
        /// The port asked for.
        port: u16,
    },
    /// The request failed in the session.
    #[error("remote forward request failed: {0}")]
    Request(russh::Error),
    /// The server did not answer in time.
    #[error("no answer to the remote forward request within {REMOTE_REQUEST_TIMEOUT:?}")]
    NoAnswer,
    /// The port was held and `reclaim_remote_ports` could not end the holder.
    #[error("{held}; {reclaim}")]
    Reclaim {
        /// The refusal.
        held: Box<RemoteRefused>,
        /// Why the reclaim failed.
        reclaim: ReclaimError,
    },
    /// `reclaim_remote_ports` ended the holder, and the port stayed held.
    #[error("{held}; ended stale session(s) {pids:?}, yet the port is still held")]
    StillHeld {
        /// The refusal.
        held: Box<RemoteRefused>,
        /// The sessions ended.
        pids: Vec<u32>,
    },
}

/// One request for a remote forward on `handle`; with `reclaim`, a refusal ends this account's
/// stale session holding the port and asks again. The port the server bound, or why not.
pub(super) async fn bind_remote(
    handle: &Handle<ClientHandler>,
    bind: &str,
    port: u16,
    reclaim: bool,
) -> Result<u32, RemoteRefused> {
    let held = || RemoteRefused::Held {
        bind: bind.to_string(),
        port,
    };
    let request = || async {
        match tokio::time::timeout(
            REMOTE_REQUEST_TIMEOUT,
            handle.tcpip_forward(bind.to_string(), u32::from(port)),
        )
        .await
        {
            Ok(Ok(assigned)) => Ok(if port == 0 { assigned } else { u32::from(port) }),
            Ok(Err(russh::Error::RequestDenied)) => Err(held()),
            Ok(Err(e)) => Err(RemoteRefused::Request(e)),
            Err(_) => Err(RemoteRefused::NoAnswer),
        }
    };
    match request().await {
        Err(RemoteRefused::Held { .. }) if reclaim => {}
        done => return done,
    }
    let pids = crate::reclaim::reclaim(handle, port)
        .await
        .map_err(|reclaim| RemoteRefused::Reclaim {
            held: Box::new(held()),
            reclaim,
        })?;
    tracing::warn!(
        port,
        ?pids,
        "reclaim_remote_ports: ended this account's stale session holding the port"
    );
    // sshd closes the listener as the process exits: a few quick tries.
    for _ in 0..10 {
        match request().await {
            Err(RemoteRefused::Held { .. }) => tokio::time::sleep(Duration::from_millis(200)).await,
            done => return done,
        }
    }
    Err(RemoteRefused::StillHeld {
        held: Box::new(held()),
        pids,
    })
}

/// Requests one remote forward, retrying while the server refuses.
///
/// The classic autossh failure: after a reconnect the server still holds the port for the old,
/// half-dead session and answers "remote port forwarding failed". `ssh -o
/// ExitOnForwardFailure=yes` then exits and the loop spins; without it ssh runs on without the
/// forward. Here the request is retried with backoff until the old session is reaped (the OMA
/// drop-in makes sshd do that within 15 s) or, with `reclaim_remote_ports`, this account's
/// stale session is ended through the new one.
pub(super) async fn hold_remote_forward(
    live: Arc<Live>,
    req: RemoteRequest,
    shared: Arc<ProfileShared>,
    remote: Arc<RemoteForwards>,
    cancel: CancellationToken,
    mut backoff: Backoff,
) {
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = bind_remote(&live.handle, &req.bind, req.port, req.reclaim) => r,
        };
        match result {
            Ok(bound) => {
                remote.mark_bound(req.index, bound);
                let detail = (req.port == 0).then(|| format!("server assigned port {bound}"));
                shared.set_forward(req.index, ForwardState::Active, detail);
                return;
            }
            Err(why) => {
                let delay = backoff.next_delay();
                shared.set_forward(
                    req.index,
                    ForwardState::Retrying,
                    Some(format!("{why}; retrying")),
                );
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an operator reads in `tunnels status` names the port and the two ways out; after a
    /// reclaim, also what was ended.
    #[test]
    fn a_held_port_names_the_port_and_what_to_do() {
        let held = RemoteRefused::Held {
            bind: "localhost".into(),
            port: 9081,
        };
        let text = held.to_string();
        assert!(text.contains("localhost:9081"), "{text}");
        assert!(text.contains("ops/deploy/oma/"), "{text}");
        assert!(text.contains("reclaim_remote_ports = true"), "{text}");
        let still = RemoteRefused::StillHeld {
            held: Box::new(held),
            pids: vec![41, 42],
        };
        assert!(
            still
                .to_string()
                .ends_with("ended stale session(s) [41, 42], yet the port is still held")
        );
    }
}
