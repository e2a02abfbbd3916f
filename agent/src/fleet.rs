//! The agent as a member of a fleet: report to the coordinator, run what it pushes.
//!
//! Tunnels never depend on the coordinator: the last applied profile set is cached in the state
//! dir and applied at start before the coordinator is reached (or if it never is), and a lost
//! link only means reconnecting with full-jitter backoff — so a coordinator restart does not
//! bring the whole fleet back in the same second — while every tunnel keeps running.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tunnelfleet_protocol::{
    CoordinatorMessage, ForwardReport, HealthSample, Heartbeat, Hello, PROTOCOL_VERSION,
    ProfileReport, ProfileSet, SshCert,
};

use crate::config::CoordinatorSection;
use crate::coordinators::{self, Rotation};
use crate::link::{self, LinkError};
use crate::placement::Coordinated;
use crate::sshcert::SshCredential;
use crate::status::{AgentStatus, ProfileStatus};
use crate::supervisor::SupervisorHandle;
use tunnelfleet_runtime::backoff::Backoff;

/// The least time between heartbeats a profile asked for (its health went down, it moved):
/// changes that come together go in one heartbeat.
pub const URGENT_GAP: Duration = Duration::from_millis(250);

/// The cache file inside the state dir.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join("profiles.json")
}

/// The cached profile set, if one was stored and still reads.
pub fn load_cache(state_dir: &Path) -> Option<ProfileSet> {
    let path = cache_path(state_dir);
    let text = std::fs::read(&path).ok()?;
    // A cache written before protocol 4 is read too, so an upgraded agent starts its tunnels
    // without waiting for the coordinator.
    match tunnelfleet_protocol::legacy::profile_set_from_json(&text) {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(file = %path.display(), "ignoring unreadable profile cache: {e}");
            None
        }
    }
}

/// Stores the set atomically (temp file, fsync, rename), so a crash leaves the old or the new
/// cache, never half of one.
pub fn store_cache(state_dir: &Path, set: &ProfileSet) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(set).map_err(std::io::Error::other)?;
    tunnelfleet_runtime::secret::write_atomic(&cache_path(state_dir), &json, 0o644)
}

/// Runs the coordinator link until `shutdown`. Never returns early on coordinator trouble.
/// `coordinated` is set while the link is up: pushed profiles then leave health-driven moves to
/// the coordinator, and move on their own when it is away. `ssh`, the agent's own SSH key, is
/// kept certified through the link.
pub async fn run(
    cfg: CoordinatorSection,
    sup: SupervisorHandle,
    coordinated: Coordinated,
    ssh: Option<Arc<SshCredential>>,
    shutdown: CancellationToken,
) {
    let client = match link::client_config(&cfg.ca, &cfg.cert, &cfg.key) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("coordinator link disabled: {e}");
            return;
        }
    };
    let mut applied_version = load_cache(&cfg.state_dir).map(|s| s.version);
    // The coordinator tells a restart from a reconnect by this.
    let started = tunnelfleet_runtime::clock::now_unix_ms();
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max);
    let mut rotation = Rotation::random();
    let mut sockets = Sockets::default();
    loop {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: cfg.agent_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            labels: cfg.labels.clone(),
            applied_version,
            started_unix_ms: started,
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connect_any(&cfg, &client, &mut rotation, &mut sockets, hello) => r,
        };
        match connected {
            Ok((mut l, candidate)) => {
                tracing::info!(coordinator = %candidate.addr, configured = %candidate.configured, agent = %cfg.agent_id, "connected to the coordinator");
                let linked_at = tokio::time::Instant::now();
                coordinated.set(true);
                if let (Some(ssh), Some(line)) = (&ssh, &l.welcome.ssh_host_ca) {
                    match ssh.take_host_ca(line) {
                        Ok(true) => {
                            tracing::info!(file = %ssh.host_ca_path().display(), "learned the fleet's SSH host CA")
                        }
                        Ok(false) => {}
                        Err(e) => tracing::warn!(coordinator = %candidate.addr, "{e}"),
                    }
                }
                let every =
                    Duration::from_millis(u64::from(l.welcome.heartbeat_interval_ms).max(200));
                let mut tick = tokio::time::interval(every);
                let mut seq = 0u64;
                let mut since = tunnelfleet_runtime::clock::now_unix_ms();
                // Commands run beside the link (a health check takes its timeout); their
                // results come back here to be sent.
                let (done_tx, mut done_rx) =
                    tokio::sync::mpsc::channel::<tunnelfleet_protocol::CommandResult>(16);
                // The SSH certificate: asked for on connecting when none is held or it is past
                // half its life, then checked at every tick; one request at a time, asked
                // again after RENEW_RETRY when it was refused or never answered.
                let mut asked: Option<tokio::time::Instant> = None;
                let ended: Result<(), LinkError> = loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            l.close();
                            return;
                        }
                        Some(r) = done_rx.recv() => {
                            if let Err(e) = l.command_result(r).await {
                                break Err(e);
                            }
                        }
                        _ = tick.tick() => {
                            if let Some(cred) = &ssh
                                && let Err(e) = renew(&mut l, cred, &mut asked).await
                            {
                                break Err(e);
                            }
                            match beat(&mut l, &sup, &mut seq, &mut since).await {
                                None => return,
                                Some(Err(e)) => break Err(e),
                                Some(Ok(())) => {}
                            }
                        }
                        _ = coordinated.report_asked() => {
                            // A profile's health went down or it moved: tell the coordinator
                            // now, not at the next tick; at most one such extra heartbeat per
                            // URGENT_GAP.
                            tokio::time::sleep(URGENT_GAP).await;
                            match beat(&mut l, &sup, &mut seq, &mut since).await {
                                None => return,
                                Some(Err(e)) => break Err(e),
                                Some(Ok(())) => tick.reset(),
                            }
                        }
                        m = l.next() => match m {
                            Ok(CoordinatorMessage::Push(set)) => {
                                let version = set.version;
                                let Some(applied) = sup.apply(set.clone()).await else { return };
                                if let Err(e) = store_cache(&cfg.state_dir, &set) {
                                    tracing::error!(dir = %cfg.state_dir.display(), "cannot cache the applied profiles: {e}");
                                }
                                applied_version = Some(version);
                                tracing::info!(version, ok = applied.ok, "applied profiles pushed by the coordinator");
                                if let Err(e) = l.applied(applied).await {
                                    break Err(e);
                                }
                            }
                            Ok(CoordinatorMessage::Command(c)) => {
                                tracing::info!(id = c.id, action = ?c.action, profile = %c.profile, "command from the coordinator");
                                let (sup, done) = (sup.clone(), done_tx.clone());
                                tokio::spawn(async move {
                                    let _ = done.send(run_command(&sup, c).await).await;
                                });
                            }
                            Ok(CoordinatorMessage::SshCert(answer)) => {
                                match (answer, &ssh) {
                                    (SshCert::Granted { certificate }, Some(cred)) => {
                                        match cred.accept(&certificate) {
                                            // Answered: the next one is asked for when due.
                                            Ok(()) => asked = None,
                                            Err(e) => tracing::error!("{e}"),
                                        }
                                    }
                                    (SshCert::Refused { reason }, _) => {
                                        tracing::warn!("the coordinator refused an SSH certificate: {reason}");
                                    }
                                    (SshCert::Granted { .. }, None) => {
                                        tracing::debug!("ignoring an SSH certificate nobody asked for");
                                    }
                                }
                            }
                            Ok(CoordinatorMessage::Evidence(e)) => {
                                coordinated.evidence_heard(&e.endpoint, e.others_passing, e.others_failing, tokio::time::Instant::now());
                            }
                            Ok(other) => tracing::debug!("ignoring {other:?}"),
                            Err(e) => break Err(e),
                        }
                    }
                };
                coordinated.set(false);
                match ended {
                    // Asked to move: any other coordinator, picked at random, so the agents
                    // one sheds spread over the rest.
                    Err(e @ LinkError::Rebalanced { .. }) => {
                        rotation.elsewhere(candidate.index, candidate.of);
                        tracing::info!("{e}; tunnels keep running");
                    }
                    Err(e @ LinkError::Revoked { .. }) => {
                        rotation.down(candidate.index, candidate.of);
                        tracing::error!(
                            "{e}; tunnels keep running until their certificates or keys are refused"
                        );
                    }
                    // The next round starts at another coordinator: this one may be gone.
                    ended => {
                        rotation.down(candidate.index, candidate.of);
                        if let Err(e) = ended {
                            tracing::warn!("{e}; tunnels keep running, reconnecting");
                        }
                    }
                }
                // A link that was up a while: the next coordinator after a short jittered
                // pause (the agents of a dead coordinator spread over it). One that keeps
                // ending soon after it is made backs off instead.
                let pause = if linked_at.elapsed() >= STABLE_LINK {
                    backoff.reset();
                    relink_pause()
                } else {
                    backoff.next_delay()
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
            Err(e) => tracing::warn!("{e}; tunnels keep running, retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// A link up this long counts as working: losing it relinks at once ([`relink_pause`]) and
/// resets the backoff.
pub const STABLE_LINK: Duration = Duration::from_secs(10);

/// The pause before dialing again after a link that was up was lost: uniform in
/// `[0, RELINK_JITTER]`.
fn relink_pause() -> Duration {
    use rand::RngExt;
    let span = tunnelfleet_protocol::RELINK_JITTER.as_millis() as u64;
    Duration::from_millis(rand::rng().random_range(0..=span))
}

/// How long the agent waits before asking for a certificate again after a request that was
/// refused or never answered.
pub const RENEW_RETRY: Duration = Duration::from_secs(60);

/// Asks for an SSH certificate when the one held is due ([`SshCredential::wants_renewal`])
/// and no request is pending.
async fn renew(
    l: &mut link::ControlLink,
    cred: &SshCredential,
    asked: &mut Option<tokio::time::Instant>,
) -> Result<(), LinkError> {
    let now = tunnelfleet_runtime::clock::now_unix_ms() / 1000;
    if !cred.wants_renewal(now) || asked.is_some_and(|t| t.elapsed() < RENEW_RETRY) {
        return Ok(());
    }
    *asked = Some(tokio::time::Instant::now());
    tracing::info!(key = %cred.fingerprint(), valid_before = ?cred.valid_before(), "asking the coordinator for an SSH certificate");
    l.ssh_cert_request(cred.public_line()).await
}

/// How long one coordinator may take from the first packet to its welcome before the next
/// one is tried (a dead host answers nothing; QUIC alone would wait its idle timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The candidate a link was made to, and where it stands in the round.
struct Reached {
    addr: std::net::SocketAddr,
    configured: String,
    index: usize,
    of: usize,
}

/// Why one attempt of a round failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// No local QUIC endpoint.
    #[error("QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    /// The link was refused or could not be made.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// Nothing came back in time.
    #[error("coordinator {0}: no welcome within {CONNECT_TIMEOUT:?}")]
    Timeout(std::net::SocketAddr),
}

/// Why a round reached no coordinator: every attempt's reason, in order.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// No configured address resolved.
    #[error(transparent)]
    Resolve(#[from] coordinators::ResolveError),
    /// Every candidate was tried.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Failed(Vec<AttemptError>),
}

/// The agent's QUIC endpoints, one per address family, made on first use and kept for every
/// link after. Each holds ~1.5 MB of receive buffers: an endpoint made and dropped at each
/// attempt grew the agents of bench-chaos by megabytes at every coordinator kill (glibc keeps
/// what such peaks free).
#[derive(Default)]
struct Sockets {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Sockets {
    /// The endpoint to reach `addr` from, made now if this family has none yet.
    fn toward(&mut self, addr: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
        let (slot, bind) = if addr.is_ipv4() {
            (&mut self.v4, std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
        } else {
            (
                &mut self.v6,
                std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
            )
        };
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let e = quinn::Endpoint::client(bind)?;
        *slot = Some(e.clone());
        Ok(e)
    }
}

/// One round: every configured coordinator once, from where `rotation` stands, until one
/// welcomes us. The error names every attempt.
async fn connect_any(
    cfg: &CoordinatorSection,
    client: &quinn::ClientConfig,
    rotation: &mut Rotation,
    sockets: &mut Sockets,
    hello: Hello,
) -> Result<(link::ControlLink, Reached), RoundError> {
    let candidates = coordinators::resolve(cfg).await?;
    let n = candidates.len();
    let mut failures = Vec::new();
    for i in rotation.order(n) {
        let c = &candidates[i];
        let endpoint = sockets.toward(c.addr);
        let attempt = async {
            let endpoint = endpoint.map_err(AttemptError::Endpoint)?;
            let l = link::connect(
                &endpoint,
                client.clone(),
                c.addr,
                &c.server_name,
                hello.clone(),
            )
            .await?;
            Ok::<_, AttemptError>(l)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(l)) => {
                rotation.up(i, n);
                let reached = Reached {
                    addr: c.addr,
                    configured: c.configured.clone(),
                    index: i,
                    of: n,
                };
                return Ok((l, reached));
            }
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push(AttemptError::Timeout(c.addr)),
        }
        rotation.down(i, n);
        if n > 1
            && let Some(e) = failures.last()
        {
            tracing::info!(coordinator = %c.addr, "{e}; trying the next coordinator");
        }
    }
    Err(RoundError::Failed(failures))
}

/// Sends the next heartbeat from the supervisor's status (results newer than `since`); None
/// when the agent is shutting down.
async fn beat(
    l: &mut link::ControlLink,
    sup: &SupervisorHandle,
    seq: &mut u64,
    since: &mut u64,
) -> Option<Result<(), LinkError>> {
    let status = sup.status().await?;
    *seq += 1;
    let hb = heartbeat(*seq, &status, *since);
    *since = hb.sent_unix_ms;
    Some(l.heartbeat(hb).await)
}

/// Runs a coordinator command through the same path as the local control socket.
pub async fn run_command(
    sup: &SupervisorHandle,
    c: tunnelfleet_protocol::Command,
) -> tunnelfleet_protocol::CommandResult {
    use crate::supervisor::{Request, Response};
    use tunnelfleet_protocol::CommandAction;
    let name = c.profile.clone();
    let req = match c.action {
        CommandAction::Start => Request::Start { name },
        CommandAction::Stop => Request::Stop { name },
        CommandAction::Restart => Request::Restart { name },
        CommandAction::Health => Request::Health { name },
        CommandAction::NetCheck => return net_check(sup, c.id).await,
        CommandAction::Audit => {
            let report = tokio::task::spawn_blocking(|| {
                crate::audit::run(&crate::audit::AuditOptions::default())
            })
            .await;
            return match report {
                Ok(r) => tunnelfleet_protocol::CommandResult {
                    id: c.id,
                    ok: true,
                    message: r.render(),
                    report: serde_json::to_string(&r).ok(),
                },
                Err(e) => tunnelfleet_protocol::CommandResult {
                    id: c.id,
                    ok: false,
                    message: format!("audit: {e}"),
                    report: None,
                },
            };
        }
    };
    let (ok, message) = match sup.call(req).await {
        Response::Ok { message } => (true, message),
        Response::Health(h) => (
            h.ok,
            format!(
                "health {}: {} ({:.1} ms)",
                if h.ok { "passed" } else { "FAILED" },
                h.detail,
                h.latency_ms
            ),
        ),
        Response::Error { message } => (false, message),
        Response::Status(_) => (false, "unexpected status answer".into()),
    };
    tunnelfleet_protocol::CommandResult {
        id: c.id,
        ok,
        message,
        report: None,
    }
}

/// `net check` from this agent against every endpoint of its profiles (SSH ports: banner too).
async fn net_check(sup: &SupervisorHandle, id: u64) -> tunnelfleet_protocol::CommandResult {
    let Some(status) = sup.status().await else {
        return tunnelfleet_protocol::CommandResult {
            id,
            ok: false,
            message: "agent is shutting down".into(),
            report: None,
        };
    };
    let mut targets: Vec<String> = status
        .profiles
        .iter()
        .flat_map(|p| p.endpoints.iter().cloned())
        .collect();
    targets.sort();
    targets.dedup();
    let opts = crate::net::CheckOptions {
        ports: Vec::new(),
        ssh_ports: Vec::new(),
        probes: 3,
        timeout: Duration::from_secs(2),
    };
    let mut reports = Vec::new();
    for t in &targets {
        reports.push(crate::net::check(t, &opts).await);
    }
    tunnelfleet_protocol::CommandResult {
        id,
        ok: reports.iter().all(|r| r.ok),
        message: if reports.is_empty() {
            "no OMA endpoints in this agent's profiles".into()
        } else {
            crate::net::render(&reports)
        },
        report: serde_json::to_string(&reports).ok(),
    }
}

/// A heartbeat from a status snapshot; health results newer than `since_ms` are included.
pub fn heartbeat(seq: u64, s: &AgentStatus, since_ms: u64) -> Heartbeat {
    Heartbeat {
        seq,
        sent_unix_ms: tunnelfleet_runtime::clock::now_unix_ms(),
        profiles: s.profiles.iter().map(|p| report(p, since_ms)).collect(),
    }
}

fn report(p: &ProfileStatus, since_ms: u64) -> ProfileReport {
    let state = p.state;
    let health = p
        .health
        .as_ref()
        .and_then(|h| h.last.as_ref())
        .filter(|r| r.at_unix_ms > since_ms)
        .map(|r| HealthSample {
            at_unix_ms: r.at_unix_ms,
            ok: r.ok,
            latency_us: (r.latency_ms * 1000.0) as u64,
            detail: r.detail.clone(),
        })
        .into_iter()
        .collect();
    ProfileReport {
        name: p.name.clone(),
        state,
        active_endpoint: p.active_endpoint.clone(),
        up_since_unix_ms: p.up_since_unix_ms,
        reconnects: p.reconnects,
        failovers: p.failovers,
        last_error: p.last_error.clone(),
        consecutive_failures: p
            .health
            .as_ref()
            .map(|h| h.consecutive_failures)
            .unwrap_or(0),
        health,
        forwards: p
            .forwards
            .iter()
            .map(|f| ForwardReport {
                spec: f.spec.clone(),
                state: f.state,
                detail: f.detail.clone(),
                bytes_out: f.bytes_out,
                bytes_in: f.bytes_in,
                connections_open: f.connections_open,
            })
            .collect(),
        errors: p.errors.clone(),
        failover_log: p.failover_log.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn a_cache_written_by_a_protocol_3_agent_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            cache_path(dir.path()),
            r#"{"version":4,"profiles":[{"name":"oma","description":"","endpoints":["oma-a:443"],"user":"vma","identity_file":"/k","known_hosts":"/kh","host_key_fingerprints":[],"trust_on_first_use":false,"forwards":["L 8082:localhost:8082"],"connect_timeout_ms":15000,"keepalive_interval_ms":5000,"keepalive_count":3,"reconnect_min_ms":500,"reconnect_max_ms":30000,"failover_after":3,"health":null}]}"#,
        )
        .unwrap();
        let set = load_cache(dir.path()).unwrap();
        assert_eq!(set.version, 4);
        assert_eq!(set.profiles[0].connect_timeout, Duration::from_secs(15));
        // Written back in the current form, it reads the same.
        store_cache(dir.path(), &set).unwrap();
        assert_eq!(load_cache(dir.path()).unwrap(), set);
    }
}
