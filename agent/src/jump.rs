//! The jump-host chain (OpenSSH's `ProxyJump`, `ssh -J`): a profile's `jump =
//! ["user@bastion:22"]` reaches its endpoints through one or more SSH hosts, each hop a
//! `direct-tcpip` channel of the one before, the way appliances behind a bastion reach their OMA.
//!
//! A hop as written is parsed by [`tunnelfleet_protocol::jump`]. Every hop's host key is
//! verified with the profile's trust (known_hosts or pinned fingerprints), as the endpoint's is,
//! and a hop's failure is reported as the path's problem (`ErrorKind::Jump`), not the
//! endpoint's, so neither the agent nor the coordinator fails over an OMA because a bastion is
//! down. The last hop refusing to reach the endpoint is the endpoint's failure: the bastion
//! answered, the OMA did not.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use russh::client::{Handle, Msg};
use tunnelfleet_protocol::jump::JumpHost;

use crate::ssh::{
    ClientHandler, Hop, SessionError, SessionParams, SshSession, endpoint_session, handshake, tcp,
};

/// Reaches `host:port` through the profile's jump hosts (`first`, then `rest`): an SSH session
/// to the first, a `direct-tcpip` channel from each to the next, and the endpoint's own session
/// over the last channel. The jump sessions live as long as the endpoint's session (dropped
/// with it).
pub(crate) async fn connect_via_jumps(
    p: &SessionParams,
    first: &JumpHost,
    rest: &[JumpHost],
    host: &str,
    port: u16,
    endpoint: &str,
    progress: &AtomicUsize,
) -> Result<SshSession, SessionError> {
    let via = |hop: &JumpHost, source: SessionError| SessionError::Jump {
        hop: hop.to_string(),
        endpoint: endpoint.to_string(),
        source: Box::new(source),
    };
    let stream = tcp(&first.host, first.port, &first.endpoint())
        .await
        .map_err(|e| via(first, e))?;
    let mut current = jump_session(p, stream, first)
        .await
        .map_err(|e| via(first, e))?;
    progress.fetch_add(1, Ordering::Relaxed);
    let mut earlier = Vec::with_capacity(rest.len());
    let mut at = first;
    for hop in rest {
        let stream = open_direct(&current, &hop.host, hop.port, at)
            .await
            .map_err(|e| via(at, e))?;
        let next = jump_session(p, stream, hop)
            .await
            .map_err(|e| via(hop, e))?;
        earlier.push(std::mem::replace(&mut current, next));
        progress.fetch_add(1, Ordering::Relaxed);
        at = hop;
    }
    let stream = open_direct(&current, host, port, at)
        .await
        .map_err(|e| match e {
            // The hop is up and says the endpoint is not: that is the endpoint's failure.
            SessionError::Ssh { source, .. } => SessionError::Unreachable {
                endpoint: endpoint.to_string(),
                hop: at.to_string(),
                source,
            },
            other => via(at, other),
        })?;
    earlier.push(current);
    let session = endpoint_session(p, stream, host, port, endpoint, earlier).await?;
    tracing::info!(profile = %p.profile, %endpoint, via = %p.jump.iter().map(ToString::to_string).collect::<Vec<_>>().join(","), "session through jump hosts");
    Ok(session)
}

/// A session to jump host `hop` over `stream`, as its user (or the profile's). It serves no
/// forwards: an empty table refuses any channel the server opens.
async fn jump_session<S>(
    p: &SessionParams,
    stream: S,
    hop: &JumpHost,
) -> Result<Handle<ClientHandler>, SessionError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let endpoint = hop.endpoint();
    let at = Hop {
        host: &hop.host,
        port: hop.port,
        user: hop.user.as_deref().unwrap_or(&p.user),
        endpoint: &endpoint,
        jump: true,
    };
    let (handle, _) = handshake(
        p,
        stream,
        at,
        Arc::default(),
        None,
        Default::default(),
        Default::default(),
    )
    .await?;
    Ok(handle)
}

/// A `direct-tcpip` channel from the jump session `from` to `host:port`, as a byte stream.
async fn open_direct(
    from: &Handle<ClientHandler>,
    host: &str,
    port: u16,
    hop: &JumpHost,
) -> Result<russh::ChannelStream<Msg>, SessionError> {
    let channel = from
        .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
        .await
        .map_err(|source| SessionError::Ssh {
            endpoint: format!("{} (opening a channel to {host}:{port})", hop.endpoint()),
            source,
        })?;
    Ok(channel.into_stream())
}
