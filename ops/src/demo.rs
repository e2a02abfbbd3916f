//! `tunnelfleet demo`: the fleet, end to end, on any machine with nothing set up.
//!
//! A coordinator (real QUIC with mutual TLS, sled in a temp dir, the admin HTTP API), two
//! embedded OMAs (primary and standby, each an SSH server with an API and an NBD stand-in behind
//! it), and three agents, each with its own certificate, running the seed's four forwards on one
//! SSH session per appliance. The profiles are applied and assigned through the admin API, a
//! change is pushed while a connection stays open through it, the primary is stopped and every
//! agent carries data through the standby. Then it cleans up: every task stopped, temp dir
//! removed.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use russh::keys::{Algorithm, PrivateKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::control;
use tunnelfleet_agent::status::{AgentStatus, ForwardState, ProfileStatus, SessionState};
use tunnelfleet_agent::supervisor::{Request, Response};
use tunnelfleet_coordinator::admin::{AgentSummary, Changed, Rollout};
use tunnelfleet_coordinator::hooks::HookConfig;
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::server::CoordinatorConfig;
use tunnelfleet_coordinator::store::Alert;
use tunnelfleet_coordinator::store::OmaGroup;
use tunnelfleet_protocol::ProfileSpec;

use crate::api::ApiClient;
use crate::oma::{EmbeddedOma, OmaSpec};
use crate::render;
use crate::services::{HttpService, WebhookSink, echo_server};

/// What the demo measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Agents in the fleet.
    pub agents: usize,
    /// The fleet version every agent acknowledged after the push.
    pub pushed_version: u64,
    /// Seconds from stopping the primary to data flowing through the standby on every agent.
    pub failover_s: f64,
    /// Seconds from the primary's return to every agent back on it.
    pub failback_s: f64,
    /// Alert states delivered to the webhook (firing and resolved).
    pub alerts_delivered: usize,
    /// The endpoint the first agent ended on.
    pub final_endpoint: String,
    /// Bytes carried through the NBD forwards.
    pub nbd_bytes: u64,
}

/// The seed's virtual OMA ports.
const OMA_API: u16 = 8082;
const OMA_NBD: u16 = 10809;

/// Appliances in the demo fleet.
const AGENTS: usize = 3;

/// The demo's stable period before failback (the default is 5 minutes).
const FAILBACK_AFTER: Duration = Duration::from_secs(3);
/// How long stopping everything may take (the agents' drain is 1 s, an OMA's stop 5 s).
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// Runs the demo, narrating to `out`.
pub async fn run(out: &mut (impl Write + Send)) -> anyhow::Result<DemoReport> {
    let dir = tempfile::Builder::new()
        .prefix("tunnelfleet-demo-")
        .tempdir()
        .context("creating the demo's temp dir")?;
    let result = run_in(dir.path(), out).await;
    drop(dir);
    result
}

/// One appliance: its agent task and the local ports of the seed's forwards.
struct DemoAgent {
    id: String,
    socket: PathBuf,
    /// L api, L nbd, L alternate nbd, R vma api.
    ports: [u16; 4],
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn run_in(dir: &Path, out: &mut (impl Write + Send)) -> anyhow::Result<DemoReport> {
    say(
        out,
        "tunnelfleet demo: a coordinator, three appliances (VMAs), an OMA primary and its standby",
    )?;

    // The appliances' key, 0600 as OpenSSH demands.
    let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .context("generating the VMA key")?;
    let key_path = dir.join("vma_ed25519");
    write_private(&key_path, &key)?;

    // Two OMAs with their own API and NBD services behind them.
    let mut omas = Vec::new();
    let mut keep = Vec::new();
    for name in ["oma-a", "oma-b"] {
        let api = HttpService::start(&format!("{name} api"), 0).await?;
        let (nbd, nbd_guard) = echo_server().await?;
        let services = HashMap::from([
            (OMA_API, SocketAddr::from(([127, 0, 0, 1], api.port))),
            (OMA_NBD, SocketAddr::from(([127, 0, 0, 1], nbd))),
        ]);
        let oma = EmbeddedOma::start(OmaSpec {
            name: name.into(),
            authorized: key.public_key().clone(),
            services,
        })
        .await?;
        keep.push((api, nbd_guard));
        omas.push(oma);
    }
    let (primary, standby) = (&omas[0], &omas[1]);
    for (role, name, oma) in [("primary", "oma-a", primary), ("standby", "oma-b", standby)] {
        say(
            out,
            &format!(
                "  OMA {role}  {name}  ssh 127.0.0.1:{}  host key {}",
                oma.port, oma.fingerprint
            ),
        )?;
    }
    let vma_api = HttpService::start("vma api", 0).await?;

    // Where the alerts go: a local webhook receiver, HMAC-signed deliveries.
    let sink = WebhookSink::start(0).await?;
    let secret = dir.join("webhook.secret");
    write_secret(
        &secret,
        format!("{:032x}", rand::random::<u128>()).as_bytes(),
    )?;

    // The coordinator: its CA, an admin token, sled in the temp dir, loopback listeners.
    let pki_dir = dir.join("pki");
    tunnelfleet_coordinator::pki::init(&pki_dir, &["localhost".into()])?;
    let token_file = dir.join("admin.token");
    let token = format!("demo-{:032x}", rand::random::<u128>());
    write_secret(&token_file, token.as_bytes())?;
    let bound = tunnelfleet_coordinator::server::bind(&CoordinatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        pki_dir: pki_dir.clone(),
        state_dir: dir.join("coordinator"),
        admin_token_file: token_file,
        heartbeat_interval: Duration::from_secs(1),
        alerts: Default::default(),
        hooks: vec![HookConfig::webhook(
            "ops-webhook",
            format!("http://127.0.0.1:{}/alerts", sink.port),
            secret,
        )],
        metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        udp_buffer: tunnelfleet_coordinator::udp::DEFAULT_BUFFER,
    })
    .await?;
    let (control_addr, admin_addr, fleet) = (bound.control, bound.admin, bound.fleet.clone());
    let metrics_port = bound
        .metrics
        .map(|a| a.port())
        .context("metrics listener")?;
    let coordinator_stop = CancellationToken::new();
    let coordinator = tokio::spawn(bound.run(coordinator_stop.clone()));
    let api = ApiClient::new(&admin_addr.to_string(), &token);
    say(
        out,
        &format!(
            "  coordinator  control link quic://{control_addr} (mutual TLS), admin API http://{admin_addr}"
        ),
    )?;

    // Three appliances, each with a certificate naming it and no local profiles: everything
    // they run comes from the coordinator.
    // Every local port the demo binds, picked at once so that no two collide.
    let mut ports = crate::services::free_tcp_ports(AGENTS * 4 + 1)?;
    let extra = ports.pop().context("no free port")?;
    let mut agents = Vec::new();

    let result = async {
        for (i, p) in ports.chunks_exact(4).enumerate() {
            let p = [p[0], p[1], p[2], p[3]];
            agents.push(start_agent(dir, &pki_dir, control_addr, i + 1, p).await?);
        }
        let agents = &agents;
        wait_until(20, "every agent connected to the coordinator", || async {
            fleet.links.connected().len() == AGENTS
        })
        .await?;
        say(out, &format!("\n[1] {AGENTS} agents connected over QUIC; each certificate names its agent"))?;

        // The OMA pair as a group: probed every 500 ms (TCP plus SSH banner), down after three
        // failures, failback after 3 s of health (5 minutes by default).
        let group = OmaGroup::probed(
            "oma",
            vec![format!("127.0.0.1:{}", primary.port), format!("127.0.0.1:{}", standby.port)],
            Duration::from_millis(500),
            Duration::from_millis(400),
            FAILBACK_AFTER,
        );
        let _: Changed = api.call("PUT", "/v1/groups/oma", Some(&group)).await?;
        say(out, &format!("\n  $ tunnelfleet oma apply -f groups.toml   # group oma: oma-a {} primary, oma-b {} standby, 500 ms probes, failback after {}", group.endpoints[0], group.endpoints[1], humantime::format_duration(FAILBACK_AFTER)))?;

        // One profile per appliance: the seed's forwards, on free local ports (one machine
        // plays all three appliances), on OMA group `oma` with pinned host keys.
        say(out, "\n[2] the seed's tunnel set as a profile per appliance, applied through the admin API")?;
        let mut last = 0;
        for a in agents {
            let spec = profile(a, &key_path, primary, standby, vma_api.port, &[])?;
            let _: Changed = api.call("PUT", &format!("/v1/profiles/{}", a.id), Some(&spec)).await?;
            let c: Changed = api
                .call("POST", "/v1/assignments", Some(&serde_json::json!({"profile": a.id, "agent": a.id})))
                .await?;
            last = c.version;
            say(out, &format!("  $ tunnelfleet profiles apply -f {}.toml && tunnelfleet assign {} --agent {}   # {}", a.id, a.id, a.id, spec.forwards.join(", ")))?;
        }
        let started = Instant::now();
        wait_rollout(&api, last).await?;
        for a in agents {
            wait_for(&a.socket, 20, |p| all_active(p) && p.active_endpoint.ends_with(&primary.port.to_string())).await
                .with_context(|| format!("{}: the tunnels did not come up on the primary", a.id))?;
        }
        say(out, &format!("    version {last} acknowledged by every agent; all tunnels up on oma-a in {:.2}s", started.elapsed().as_secs_f64()))?;
        let first = &agents[0];
        let mut nbd_bytes = show_traffic(out, first, "oma-a").await?;
        wait_for(&first.socket, 10, |p| p.health.as_ref().is_some_and(|h| h.last.as_ref().is_some_and(|r| r.ok))).await
            .context("the health check did not pass through the tunnel")?;
        say(out, "    health check GET /health through the L forward passes")?;
        wait_until(10, "heartbeats reporting every tunnel up", || async {
            api.get::<Vec<AgentSummary>>("/v1/agents").await.is_ok_and(|l| l.len() == AGENTS && l.iter().all(|a| a.tunnels == 1 && a.tunnels_up == 1))
        }).await?;
        print_agents(out, &api).await?;

        // A change pushed while a connection is open through a forward that does not change.
        say(out, &format!("\n[3] pushing a change: {} gets a second API forward while a transfer runs through its NBD forward", first.id))?;
        let mut open = TcpStream::connect(("127.0.0.1", first.ports[1])).await?;
        roundtrip(&mut open, b"before the push").await?;
            let spec = profile(first, &key_path, primary, standby, vma_api.port, &[format!("L {extra}:localhost:{OMA_API}")])?;
        let c: Changed = api.call("PUT", &format!("/v1/profiles/{}", first.id), Some(&spec)).await?;
        let t = Instant::now();
        let rollout = wait_rollout(&api, c.version).await?;
        say(out, &format!("  $ tunnelfleet rollout\n    version {}: applied by {} in {:.0} ms, pending {}, failed {}", rollout.version, rollout.applied.join(", "), t.elapsed().as_secs_f64() * 1000.0, rollout.pending.len(), rollout.failed.len()))?;
        roundtrip(&mut open, b"after the push").await.context("the open connection did not survive the push")?;
        let body = get(extra, "/health").await?;
        say(out, &format!("    the open NBD connection still echoes; new L {extra} -> oma-a:8082 GET /health -> {body:?}"))?;
        drop(open);

        say(out, "\n[4] stopping the primary OMA (oma-a): every session dropped, port closed")?;
        let t0 = Instant::now();
        primary.stop().await;
        for a in agents {
            wait_for(&a.socket, 30, |p| all_active(p) && p.active_endpoint.ends_with(&standby.port.to_string())).await
                .with_context(|| format!("{}: did not fail over to the standby", a.id))?;
            // Failover counts when data flows, not when the session is up.
            get(a.ports[0], "/health").await?;
        }
        let failover_s = t0.elapsed().as_secs_f64();
        say(out, &format!("    all {AGENTS} agents on the standby, data flowing again after {failover_s:.2}s"))?;
        nbd_bytes += show_traffic(out, first, "oma-b").await?;
        let fired = wait_webhook(&sink, "firing").await?;
        say(out, &format!("    the coordinator's probes confirm it: one incident for the fleet, not one per agent\n    [webhook, signed] {}", fired))?;
        print_oma(out, &api).await?;

        say(out, "\n[5] oma-a comes back: the incident resolves; failback only once it has been healthy for the stable period")?;
        let t1 = Instant::now();
        primary.restart().await?;
        let resolved = wait_webhook(&sink, "resolved").await?;
        say(out, &format!("    [webhook, signed] {resolved}"))?;
        for a in agents {
            wait_for(&a.socket, 30, |p| all_active(p) && p.active_endpoint.ends_with(&primary.port.to_string())).await
                .with_context(|| format!("{}: did not fail back to the primary", a.id))?;
            get(a.ports[0], "/health").await?;
        }
        let failback_s = t1.elapsed().as_secs_f64();
        say(out, &format!("    all {AGENTS} agents back on oma-a {failback_s:.2}s after it returned (make-before-break: new session up, then the old one drained)"))?;
        nbd_bytes += show_traffic(out, first, "oma-a").await?;
        print_alerts(out, &api).await?;
        print_metrics(out, metrics_port).await?;
        let status = print_status(out, first).await?;
        let p = &status.profiles[0];
        anyhow::Ok(DemoReport {
            agents: AGENTS,
            pushed_version: c.version,
            failover_s,
            failback_s,
            alerts_delivered: sink.delivered().len(),
            final_endpoint: p.active_endpoint.clone(),
            nbd_bytes,
        })
    }
    .await;

    for a in &agents {
        a.stop.cancel();
    }
    // Every part stops with a bounded drain; a stop that hangs anyway is a failure to report,
    // not a demo that sits there for minutes.
    let stopped = tokio::time::timeout(STOP_WITHIN, async {
        for a in agents {
            let _ = a.task.await;
        }
        coordinator_stop.cancel();
        let _ = coordinator.await;
        for o in &omas {
            o.stop().await;
        }
    })
    .await;
    drop(keep);
    let report = result?;
    if stopped.is_err() {
        bail!("the demo's agents, coordinator and OMAs did not stop within {STOP_WITHIN:?}");
    }
    say(
        out,
        &format!(
            "\ndone: {} agents on version {}; failover to the standby in {:.2}s; one incident and its resolution delivered ({} webhook deliveries); failback after the stable period in {:.2}s; {} through the NBD forwards; everything stopped gracefully, temp files removed",
            report.agents,
            report.pushed_version,
            report.failover_s,
            report.alerts_delivered,
            report.failback_s,
            render::bytes(report.nbd_bytes)
        ),
    )?;
    Ok(report)
}

/// Starts appliance `i` (`vma-i`) with its own certificate, control socket and state dir.
async fn start_agent(
    dir: &Path,
    pki_dir: &Path,
    coordinator: SocketAddr,
    i: usize,
    ports: [u16; 4],
) -> anyhow::Result<DemoAgent> {
    let id = format!("vma-{i}");
    let home = dir.join(&id);
    let files = tunnelfleet_coordinator::pki::issue_agent(pki_dir, &id, 1, &home.join("tls"))?;
    let socket = home.join("agent.sock");
    let config = format!(
        r#"[agent]
control_socket = "{socket}"
drain_timeout = "1s"

[coordinator]
address = "{coordinator}"
server_name = "localhost"
agent_id = "{id}"
labels = {{ site = "demo" }}
ca = "{ca}"
cert = "{cert}"
key = "{key}"
state_dir = "{state}"
reconnect_min = "100ms"
reconnect_max = "1s"
"#,
        socket = socket.display(),
        ca = files.ca.display(),
        cert = files.cert.display(),
        key = files.key.display(),
        state = home.join("state").display(),
    );
    let cfg_path = home.join("agent.toml");
    std::fs::write(&cfg_path, &config)?;
    let cfg = AgentConfig::load(&cfg_path)?;
    let agent = tunnelfleet_agent::agent::Agent::prepare(&cfg).await?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    Ok(DemoAgent {
        id,
        socket,
        ports,
        stop,
        task,
    })
}

/// The seed's tunnel set for appliance `a`, plus `extra` forwards, as the coordinator holds it.
fn profile(
    a: &DemoAgent,
    key: &Path,
    primary: &EmbeddedOma,
    standby: &EmbeddedOma,
    vma_api: u16,
    extra: &[String],
) -> anyhow::Result<ProfileSpec> {
    let [l_api, l_nbd, l_alt, r_vma] = a.ports;
    let mut forwards = vec![
        format!("L {l_api}:localhost:{OMA_API}"),
        format!("L {l_nbd}:localhost:{OMA_NBD}"),
        format!("L {l_alt}:localhost:{OMA_NBD}"),
        format!("R {r_vma}:localhost:{vma_api}"),
    ];
    forwards.extend(extra.iter().cloned());
    let toml = format!(
        r#"[agent]
control_socket = "/unused"

[[profile]]
name = "{name}"
description = "VMA to OMA: API, NBD, alternate NBD, reverse VMA API"
endpoints = ["127.0.0.1:{p1}", "127.0.0.1:{p2}"]
user = "vma"
identity_file = "{key}"
host_key_fingerprints = ["{f1}", "{f2}"]
forwards = [{fw}]
connect_timeout = "2s"
keepalive_interval = "1s"
keepalive_count = 3
reconnect_min = "100ms"
reconnect_max = "1s"
failover_after = 2

[profile.health]
http = "http://127.0.0.1:{l_api}/health"
interval = "500ms"
timeout = "1s"
threshold = 3
"#,
        name = a.id,
        p1 = primary.port,
        p2 = standby.port,
        key = key.display(),
        f1 = primary.fingerprint,
        f2 = standby.fingerprint,
        fw = forwards
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    // The same validation `tunnelfleet profiles apply -f` runs; then the endpoints come from
    // the group, active one first.
    let cfg = AgentConfig::parse(&toml, Path::new(&format!("{}.toml", a.id)))?;
    let mut spec = cfg.profiles[0].clone();
    spec.group = Some("oma".into());
    spec.endpoints.clear();
    Ok(spec)
}

/// Waits until every agent has acknowledged `version`; fails on an agent's failed apply.
async fn wait_rollout(api: &ApiClient, version: u64) -> anyhow::Result<Rollout> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r: Rollout = api.get("/v1/rollout").await?;
        if let Some((agent, errors)) = r.failed.iter().next() {
            bail!(
                "{agent} could not apply version {}: {}",
                r.version,
                errors.join("; ")
            );
        }
        if r.version >= version && r.pending.is_empty() && r.applied.len() == AGENTS {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("version {version} not acknowledged by every agent within 20s: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        if Instant::now() > deadline {
            bail!("not reached within {secs}s: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn print_agents(out: &mut (impl Write + Send), api: &ApiClient) -> anyhow::Result<()> {
    let list: Vec<AgentSummary> = api.get("/v1/agents").await?;
    say(out, "\n  $ tunnelfleet agents list")?;
    for line in render::fleet_agents(&list).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(())
}

/// Waits for the webhook delivery of the OMA-down incident in `status` and renders it.
async fn wait_webhook(sink: &WebhookSink, status: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = sink.delivered().into_iter().find(|r| {
            let j = r.json();
            j["status"] == status && j["alert"]["kind"] == "oma_down"
        }) {
            let alert: Alert = serde_json::from_value(r.json()["alert"].clone())?;
            return Ok(tunnelfleet_coordinator::hooks::text(&alert));
        }
        if Instant::now() > deadline {
            bail!("no {status} OMA-down alert at the webhook within 20s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn print_oma(out: &mut (impl Write + Send), api: &ApiClient) -> anyhow::Result<()> {
    let v: Vec<EndpointView> = api.get("/v1/oma").await?;
    say(out, "\n  $ tunnelfleet oma list")?;
    for line in crate::render::oma_table(&v).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(())
}

/// A few lines of what Prometheus would scrape.
async fn print_metrics(out: &mut (impl Write + Send), port: u16) -> anyhow::Result<()> {
    let text = get(port, "/metrics").await?;
    say(
        out,
        &format!(
            "\n  $ curl -s http://127.0.0.1:{port}/metrics | grep -E 'agents|failovers|alerts_fired|hook_deliveries'"
        ),
    )?;
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && [
                "tunnelfleet_agents{",
                "tunnelfleet_oma_failovers_total",
                "tunnelfleet_alerts_fired_total",
                "tunnelfleet_hook_deliveries_total",
            ]
            .iter()
            .any(|m| l.starts_with(m))
    }) {
        say(out, &format!("    {line}"))?;
    }
    Ok(())
}

async fn print_alerts(out: &mut (impl Write + Send), api: &ApiClient) -> anyhow::Result<()> {
    let v: Vec<Alert> = api.get("/v1/alerts?all=true").await?;
    say(out, "\n  $ tunnelfleet alerts list --all")?;
    for line in crate::render::alerts_table(&v).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(())
}

async fn roundtrip(s: &mut TcpStream, payload: &[u8]) -> anyhow::Result<()> {
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
    if back != payload {
        bail!("echo returned other bytes");
    }
    Ok(())
}

async fn show_traffic(
    out: &mut (impl Write + Send),
    a: &DemoAgent,
    oma: &str,
) -> anyhow::Result<u64> {
    let [l_api, l_nbd, l_alt, r_vma] = a.ports;
    let body = get(l_api, "/health").await?;
    if !body.starts_with(oma) {
        bail!("expected the API of {oma}, got {body:?}");
    }
    say(
        out,
        &format!("    L {l_api} -> {oma}:8082   GET /health -> {body:?}"),
    )?;
    let n = 8 << 20;
    let t = Instant::now();
    echo(l_nbd, n).await?;
    say(
        out,
        &format!(
            "    L {l_nbd} -> {oma}:10809  {} echoed through NBD in {:.0} ms",
            render::bytes(n as u64),
            t.elapsed().as_secs_f64() * 1000.0
        ),
    )?;
    echo(l_alt, 64 << 10).await?;
    say(
        out,
        &format!("    L {l_alt} -> {oma}:10809  alternate NBD port echoes"),
    )?;
    let body = get(r_vma, "/health").await?;
    say(
        out,
        &format!("    R {oma}:{r_vma} -> VMA api  reverse GET /health -> {body:?}"),
    )?;
    Ok(2 * n as u64 + 2 * (64 << 10))
}

async fn print_status(out: &mut (impl Write + Send), a: &DemoAgent) -> anyhow::Result<AgentStatus> {
    let status = status(&a.socket).await?;
    say(
        out,
        &format!("\n  $ tunnelfleet tunnels status   # on {}", a.id),
    )?;
    for line in render::status(&status).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(status)
}

async fn status(socket: &Path) -> anyhow::Result<AgentStatus> {
    match control::call(socket, &Request::Status).await? {
        Response::Status(s) => Ok(s),
        other => bail!("unexpected answer {other:?}"),
    }
}

fn all_active(p: &ProfileStatus) -> bool {
    p.state == SessionState::Up && p.forwards.iter().all(|f| f.state == ForwardState::Active)
}

async fn wait_for(
    socket: &Path,
    secs: u64,
    cond: impl Fn(&ProfileStatus) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = status(socket).await
            && s.profiles.first().is_some_and(&cond)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            let last = status(socket)
                .await
                .map(|s| render::status(&s))
                .unwrap_or_default();
            bail!("not reached within {secs}s; last status:\n{last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn get(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "GET 127.0.0.1:{port}{path}: {}",
            head.lines().next().unwrap_or("no response")
        );
    }
    Ok(body.to_string())
}

async fn echo(port: u16, n: usize) -> anyhow::Result<()> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![0x5au8; 64 << 10];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            w.write_all(&chunk[..k]).await?;
            left -= k;
        }
        anyhow::Ok(w)
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    while got < n {
        let k = tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await??;
        if k == 0 {
            bail!("echo through port {port} ended after {got} of {n} bytes");
        }
        if buf[..k].iter().any(|&b| b != 0x5a) {
            bail!("echo through port {port} returned corrupted data");
        }
        got += k;
    }
    writer.await??;
    Ok(())
}

fn write_private(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    let pem = key.to_openssh(russh::keys::ssh_key::LineEnding::LF)?;
    write_secret(path, pem.as_bytes())
}

/// Writes a new file readable by its owner only.
fn write_secret(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    tunnelfleet_runtime::secret::write_atomic(path, bytes, 0o600)
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn say(out: &mut impl Write, line: &str) -> std::io::Result<()> {
    writeln!(out, "{line}")?;
    out.flush()
}
