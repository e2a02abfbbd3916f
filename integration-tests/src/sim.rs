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

/// How a simulated agent reports on what it was pushed.
#[derive(Clone, Default)]
pub enum SimReports {
    /// Heartbeats with no profiles.
    #[default]
    Nothing,
    /// Heartbeats report every pushed profile as a real agent would, at once after each push
    /// and then every interval: session up on its first endpoint with every forward active,
    /// except a profile whose first endpoint has port 1 (a wrong OMA port), reported backing
    /// off with "connection refused"; the first failing heartbeat after a push goes on the
    /// channel with the time it was sent.
    Profiles(tokio::sync::mpsc::UnboundedSender<(usize, std::time::Instant)>),
}

/// What a simulated agent runs, as its heartbeat says.
fn reports(
    set: &tunnelfleet_protocol::ProfileSet,
) -> (Vec<tunnelfleet_protocol::ProfileReport>, bool) {
    use tunnelfleet_protocol::{ForwardReport, ForwardState, ProfileReport, TunnelState};
    let mut failing = false;
    let profiles = set
        .profiles
        .iter()
        .map(|p| {
            let endpoint = p.endpoints.first().cloned().unwrap_or_default();
            let bad = endpoint.ends_with(":1");
            failing |= bad;
            let mut r = ProfileReport::new(
                &p.name,
                if bad {
                    TunnelState::Backoff
                } else {
                    TunnelState::Up
                },
                &endpoint,
            );
            if bad {
                r.last_error = Some(format!("connect to {endpoint}: Connection refused"));
            }
            r.forwards = p
                .forwards
                .iter()
                .map(|f| ForwardReport {
                    spec: f.clone(),
                    state: if bad {
                        ForwardState::Listening
                    } else {
                        ForwardState::Active
                    },
                    detail: None,
                    bytes_out: 0,
                    bytes_in: 0,
                    connections_open: 0,
                })
                .collect();
            r
        })
        .collect();
    (profiles, failing)
}

/// The hello of simulated agent `id` with `labels` (protocol version of this build, process
/// started at 1 ms: a reconnect is never a restart).
pub fn sim_hello(id: String, labels: &[(&str, &str)]) -> tunnelfleet_protocol::Hello {
    tunnelfleet_protocol::Hello {
        protocol: tunnelfleet_protocol::PROTOCOL_VERSION,
        agent_id: id,
        agent_version: "bench".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        applied_version: None,
        started_unix_ms: 1,
    }
}

/// A protocol-level agent for benchmarks: real QUIC and mutual TLS, no SSH. Connects with
/// jittered backoff like a real agent (at most `gate` handshakes at once), reports `up` once
/// connected, heartbeats every `heartbeat` (spread by `i`; what they carry is `report`'s
/// choice), and acknowledges every push after reporting it on `pushes` with the time it
/// arrived. With several addresses (several coordinators), a lost link is made again to the
/// next one (to any other when the coordinator asked it to move), as a real agent does, and reported on `up` again; with one, the agent ends.
#[allow(clippy::too_many_arguments)]
pub fn spawn_sim_agent(
    i: usize,
    hello: tunnelfleet_protocol::Hello,
    client: quinn::ClientConfig,
    ep: quinn::Endpoint,
    addrs: Vec<std::net::SocketAddr>,
    heartbeat: Duration,
    gate: Arc<tokio::sync::Semaphore>,
    up: tokio::sync::mpsc::UnboundedSender<()>,
    pushes: tokio::sync::mpsc::UnboundedSender<(
        usize,
        tunnelfleet_protocol::ProfileSet,
        std::time::Instant,
    )>,
    report: SimReports,
) {
    use tunnelfleet_protocol::{Applied, CoordinatorMessage, Heartbeat};
    tokio::spawn(async move {
        let mut backoff = tunnelfleet_runtime::backoff::Backoff::new(
            Duration::from_millis(200),
            Duration::from_secs(5),
        );
        // Which coordinator next, as a real agent picks it.
        let n = addrs.len().max(1);
        let mut rotation = tunnelfleet_agent::coordinators::Rotation::new(i);
        loop {
            let (mut link, at) = loop {
                let at = rotation.order(n)[0];
                let addr = addrs[at];
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
                    Ok(l) => break (l, at),
                    Err(_) => {
                        rotation.down(at, n);
                        tokio::time::sleep(backoff.next_delay()).await
                    }
                }
            };
            backoff.reset();
            let _ = up.send(());
            // Spread heartbeats over the interval, as real agents started at different times.
            let offset =
                Duration::from_millis((i as u64 * 7919) % heartbeat.as_millis().max(1) as u64);
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + offset, heartbeat);
            let mut seq = 0;
            let mut running = tunnelfleet_protocol::ProfileSet {
                version: 0,
                profiles: vec![],
            };
            // A failure not told yet (set by a push of a failing set, cleared once told).
            let mut untold = false;
            // The link ended because the coordinator asked it to move.
            let mut moved = false;
            loop {
                let pushed = tokio::select! {
                    _ = tick.tick() => false,
                    m = link.next() => match m {
                        Ok(CoordinatorMessage::Push(set)) => {
                            let version = set.version;
                            running = set.clone();
                            untold = true;
                            let _ = pushes.send((i, set, std::time::Instant::now()));
                            if link.applied(Applied { version, ok: true, results: vec![] }).await.is_err() {
                                break;
                            }
                            true
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            moved = matches!(e, tunnelfleet_agent::link::LinkError::Rebalanced { .. });
                            break;
                        }
                    }
                };
                // A real agent reports at once after it applied; a silent one waits for its tick.
                if pushed && matches!(report, SimReports::Nothing) {
                    continue;
                }
                seq += 1;
                let (profiles, failing) = match &report {
                    SimReports::Nothing => (vec![], false),
                    SimReports::Profiles(_) => reports(&running),
                };
                if link
                    .heartbeat(Heartbeat {
                        seq,
                        sent_unix_ms: 0,
                        profiles,
                    })
                    .await
                    .is_err()
                {
                    break;
                }
                if let SimReports::Profiles(failures) = &report
                    && failing
                    && untold
                {
                    let _ = failures.send((i, std::time::Instant::now()));
                }
                untold = false;
            }
            if addrs.len() < 2 {
                return;
            }
            // The link is gone: the next coordinator first (any other when asked to move), after
            // a jittered pause.
            if moved {
                rotation.elsewhere(at, n);
            } else {
                rotation.down(at, n);
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    });
}
