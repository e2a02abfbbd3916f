//! Simulated agents for the benchmarks: real QUIC and mutual TLS, no SSH.

use std::sync::Arc;
use std::time::Duration;

/// `n` client endpoints (UDP sockets) for simulated agents, each shared by many of them as
/// NATed appliances would share an address, with the coordinator's buffer size: one socket
/// standing in for a thousand appliances needs a thousand appliances' room.
pub fn sim_endpoints(n: usize) -> std::io::Result<Vec<quinn::Endpoint>> {
    use tunnelfleet_coordinator::udp;
    (0..n)
        .map(|_| {
            let b = udp::bind(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                udp::DEFAULT_BUFFER,
            )?;
            udp::endpoint(b.socket, None)
        })
        .collect()
}

/// A protocol-level agent for benchmarks: real QUIC and mutual TLS, no SSH. Connects with
/// jittered backoff like a real agent (at most `gate` handshakes at once), reports `up` once
/// connected, heartbeats every `heartbeat` (spread by `i`), and acknowledges every push after
/// reporting it on `pushes` with the time it arrived.
#[allow(clippy::too_many_arguments)]
pub fn spawn_sim_agent(
    i: usize,
    hello: tunnelfleet_protocol::Hello,
    client: quinn::ClientConfig,
    ep: quinn::Endpoint,
    addr: std::net::SocketAddr,
    heartbeat: Duration,
    gate: Arc<tokio::sync::Semaphore>,
    up: tokio::sync::mpsc::UnboundedSender<()>,
    pushes: tokio::sync::mpsc::UnboundedSender<(
        usize,
        tunnelfleet_protocol::ProfileSet,
        std::time::Instant,
    )>,
) {
    use tunnelfleet_protocol::{Applied, CoordinatorMessage, Heartbeat};
    tokio::spawn(async move {
        let mut backoff = tunnelfleet_agent::backoff::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        let mut link = loop {
            let attempt = {
                let _permit = gate.acquire().await;
                tunnelfleet_agent::link::connect(
                    &ep,
                    client.clone(),
                    addr,
                    "localhost",
                    hello.clone(),
                )
                .await
            };
            match attempt {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(backoff.next_delay()).await,
            }
        };
        let _ = up.send(());
        // Spread heartbeats over the interval, as real agents started at different times.
        let offset = Duration::from_millis((i as u64 * 7919) % heartbeat.as_millis().max(1) as u64);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, heartbeat);
        let mut seq = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    if link.heartbeat(Heartbeat { seq, sent_unix_ms: 0, profiles: vec![] }).await.is_err() {
                        return;
                    }
                }
                m = link.next() => match m {
                    Ok(CoordinatorMessage::Push(set)) => {
                        let version = set.version;
                        let _ = pushes.send((i, set, std::time::Instant::now()));
                        if link.applied(Applied { version, ok: true, results: vec![] }).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }
    });
}
