//! Reaching one endpoint within the profile's connect timeout: directly, or through its
//! jump hosts ([`crate::jump`]).

use crate::jump::connect_via_jumps;
use crate::ssh::{SessionError, SessionParams, SshSession, endpoint_session, tcp};

/// Connects to `host:port`, verifies, authenticates.
pub async fn connect(p: &SessionParams, host: &str, port: u16) -> Result<SshSession, SessionError> {
    let endpoint = format!("{host}:{port}");
    tokio::time::timeout(p.connect_timeout, connect_inner(p, host, port, &endpoint))
        .await
        .unwrap_or_else(|_| {
            Err(SessionError::Timeout {
                endpoint: endpoint.clone(),
                timeout: p.connect_timeout,
            })
        })
}

async fn connect_inner(
    p: &SessionParams,
    host: &str,
    port: u16,
    endpoint: &str,
) -> Result<SshSession, SessionError> {
    match p.jump.split_first() {
        None => {
            let stream = tcp(host, port, endpoint).await?;
            endpoint_session(p, stream, host, port, endpoint, Vec::new()).await
        }
        Some((first, rest)) => connect_via_jumps(p, first, rest, host, port, endpoint).await,
    }
}
