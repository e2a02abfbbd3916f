//! Reaching one endpoint within the profile's connect timeout: directly, or through its
//! jump hosts ([`crate::jump`]).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::jump::connect_via_jumps;
use crate::ssh::{SessionError, SessionParams, SshSession, endpoint_session, tcp};

/// Connects to `host:port`, verifies, authenticates. Through jump hosts, a deadline that passes
/// before the last hop opened its channel to the endpoint is the path's failure
/// ([`SessionError::Jump`], naming the hop), not the endpoint's.
pub async fn connect(p: &SessionParams, host: &str, port: u16) -> Result<SshSession, SessionError> {
    let endpoint = format!("{host}:{port}");
    // Jump hosts with a session so far: all of them means the endpoint's leg was reached.
    let progress = AtomicUsize::new(0);
    match tokio::time::timeout(
        p.connect_timeout,
        connect_inner(p, host, port, &endpoint, &progress),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => {
            let timeout = SessionError::Timeout {
                endpoint: endpoint.clone(),
                timeout: p.connect_timeout,
            };
            let passed = progress.load(Ordering::Relaxed);
            match p.jump.get(passed) {
                Some(hop) => Err(SessionError::Jump {
                    hop: hop.to_string(),
                    endpoint,
                    source: Box::new(timeout),
                }),
                None => Err(timeout),
            }
        }
    }
}

async fn connect_inner(
    p: &SessionParams,
    host: &str,
    port: u16,
    endpoint: &str,
    progress: &AtomicUsize,
) -> Result<SshSession, SessionError> {
    match p.jump.split_first() {
        None => {
            let stream = tcp(host, port, endpoint).await?;
            endpoint_session(p, stream, host, port, endpoint, Vec::new()).await
        }
        Some((first, rest)) => {
            connect_via_jumps(p, first, rest, host, port, endpoint, progress).await
        }
    }
}
