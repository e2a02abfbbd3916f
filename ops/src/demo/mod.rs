//! `tunnelfleet demo`: the fleet, end to end, on any machine with nothing set up.
//!
//! A coordinator (real QUIC with mutual TLS, sled in a temp dir, the admin HTTP API), two
//! embedded OMAs (primary and standby, each an SSH server with an API and an NBD stand-in behind
//! it), and three agents, each with its own certificate, running the seed's four forwards on one
//! SSH session per appliance. The profiles are applied and assigned through the admin API, a
//! change is pushed while a connection stays open through it, the primary is stopped and every
//! agent carries data through the standby. Then it cleans up: every task stopped, temp dir
//! removed.
//!
//! # Layout
//! - this module: the story, step by step ([`run`]).
//! - `setup`: keys, OMAs, agents and their profiles.
//! - `checks`: what the story waits for and proves through the tunnels.
//! - `show`: what it prints.

mod checks;
mod setup;
mod show;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use russh::keys::{Algorithm, PrivateKey};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tunnelfleet_coordinator::admin::{AgentSummary, Changed};
use tunnelfleet_coordinator::hooks::HookConfig;
use tunnelfleet_coordinator::server::CoordinatorConfig;
use tunnelfleet_coordinator::store::OmaGroup;

use crate::api::ApiClient;
use crate::render;
use tunnelfleet_standins::embedded_oma::{EmbeddedOma, OmaSpec};
use tunnelfleet_standins::services::{HttpService, WebhookSink, echo_server};

use checks::*;
use setup::*;
use show::*;
use tunnelfleet_standins::wait::wait_until;

/// What the demo measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Agents in the fleet.
    pub agents: usize,
    /// The fleet version every agent acknowledged after the push.
    pub pushed_version: u64,
    /// The version in force at the end (every agent acknowledged it).
    pub version: u64,
    /// The canaries the bad change halted at.
    pub rollout_halted_at: Vec<String>,
    /// Seconds from the primary going silent to data flowing through the standby on every
    /// agent.
    pub failover_s: f64,
    /// The same when the primary is killed outright (its connections closed).
    pub loud_failover_s: f64,
    /// Group moves the coordinator counted (`tunnelfleet_oma_failovers_total`).
    pub failovers: u64,
    /// Seconds from the primary's return to every agent back on it.
    pub failback_s: f64,
    /// Alert states delivered to the webhook (firing and resolved).
    pub alerts_delivered: usize,
    /// The endpoint the first agent ended on.
    pub final_endpoint: String,
    /// Bytes carried through the NBD forwards.
    pub nbd_bytes: u64,
}

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

pub(super) async fn run_in(
    dir: &Path,
    out: &mut (impl Write + Send),
) -> anyhow::Result<DemoReport> {
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
        admin_tls: false,
        admin_plaintext_on_network: false,
        pki_dir: pki_dir.clone(),
        state_dir: dir.join("coordinator"),
        store: Default::default(),
        etcd: None,
        name: None,
        admin_token_file: token_file,
        heartbeat_interval: Duration::from_secs(1),
        ssh_cert_validity: tunnelfleet_coordinator::sshca::DEFAULT_VALIDITY,
        alerts: Default::default(),
        hooks: vec![HookConfig::webhook(
            "ops-webhook",
            format!("http://127.0.0.1:{}/alerts", sink.port),
            secret,
        )],
        metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        web_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        udp_buffer: tunnelfleet_coordinator::udp::DEFAULT_BUFFER,
    })
    .await?;
    let (control_addr, admin_addr, fleet) = (bound.control, bound.admin, bound.fleet.clone());
    let metrics_port = bound
        .metrics
        .map(|a| a.port())
        .context("metrics listener")?;
    let web = bound.web.context("fleet page listener")?;
    let coordinator_stop = CancellationToken::new();
    let coordinator = tokio::spawn(bound.run(coordinator_stop.clone()));
    let api = ApiClient::new(&admin_addr.to_string(), &token);
    say(
        out,
        &format!(
            "  coordinator  control link quic://{control_addr} (mutual TLS), admin API http://{admin_addr}\n  fleet page   http://{web}/ while the demo runs (sign in with the token in {})",
            dir.join("admin.token").display()
        ),
    )?;

    // Three appliances, each with a certificate naming it and no local profiles: everything
    // they run comes from the coordinator.
    // Every local port the demo binds, picked at once so that no two collide.
    let mut ports = tunnelfleet_standins::ports::free_tcp_ports(AGENTS * 4 + 1)?;
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

        // A bad change, staged: one more forward on every appliance, onto a port that is taken
        // here (the VMA's own API). The canary cannot bind it; the rollout halts there.
        say(out, &format!("\n[4] a bad change, staged: every appliance gets `L {}:localhost:{OMA_API}`, a port already taken here", vma_api.port))?;
        let taken = format!("L {}:localhost:{OMA_API}", vma_api.port);
        let bad: Vec<_> = agents
            .iter()
            .map(|a| {
                let mut extra_fw = vec![taken.clone()];
                if a.id == first.id {
                    extra_fw.insert(0, format!("L {extra}:localhost:{OMA_API}"));
                }
                profile(a, &key_path, primary, standby, vma_api.port, &extra_fw)
            })
            .collect::<anyhow::Result<_>>()?;
        let staged: tunnelfleet_coordinator::store::Rollout = api
            .call(
                "POST",
                "/v1/rollouts",
                Some(&tunnelfleet_coordinator::rollout::StartRequest {
                    profiles: bad,
                    canary: tunnelfleet_coordinator::rollout::Canary::Count(1),
                    waves: 2,
                    wait_ms: 2000,
                    settle_ms: 20_000,
                }),
            )
            .await?;
        say(out, &format!("  $ tunnelfleet profiles apply -f vmas.toml --canary 1 --waves 2 --wait 2s\n    version {}: staged over {} agents in {} stages", staged.version, staged.stages.iter().map(|s| s.agents.len()).sum::<usize>(), staged.stages.len()))?;
        let t = Instant::now();
        let halted = wait_halted(&api).await?;
        let canary = halted.rollout.stages[0].agents.clone();
        say(out, &format!("  $ tunnelfleet rollout   # {:.1}s later", t.elapsed().as_secs_f64()))?;
        for line in render::staged_rollout(&halted).lines() {
            say(out, &format!("    {line}"))?;
        }
        for a in agents {
            let want = if a.id == first.id { 5 } else { 4 };
            wait_for(&a.socket, 20, |p| all_active(p) && p.forwards.len() == want).await
                .with_context(|| format!("{}: not back on (or not kept on) the previous version", a.id))?;
            get(a.ports[0], "/health").await?;
        }
        say(out, &format!("    canary {} is back on the previous version, data flowing; {} never received the bad one", canary.join(", "), agents.iter().filter(|a| !canary.contains(&a.id)).map(|a| a.id.as_str()).collect::<Vec<_>>().join(" and ")))?;
        let aborted: tunnelfleet_coordinator::admin::Aborted = api
            .call::<(), _>("POST", "/v1/rollouts/current/abort", None)
            .await?;
        say(out, &format!("  $ tunnelfleet rollout abort\n    version {} restores version {}'s profiles everywhere; the rollout_halted alert resolves", aborted.version, aborted.rollout.base_version))?;
        wait_rollout(&api, aborted.version).await?;

        say(out, "\n[5] the primary OMA (oma-a) goes silent: it stops answering, nothing is closed (a hung host, a network dropping every packet)")?;
        let t0 = Instant::now();
        primary.freeze();
        for a in agents {
            wait_for(&a.socket, 30, |p| all_active(p) && p.active_endpoint.ends_with(&standby.port.to_string())).await
                .with_context(|| format!("{}: did not fail over to the standby", a.id))?;
            // Failover counts when data flows, not when the session is up.
            get(a.ports[0], "/health").await?;
        }
        let failover_s = t0.elapsed().as_secs_f64();
        say(out, &format!("    all {AGENTS} agents on the standby, data flowing again after {failover_s:.2}s: the time to notice silence (probes every 500 ms, 3 strikes; SSH keepalives every 1 s, 3 strikes)"))?;
        nbd_bytes += show_traffic(out, first, "oma-b").await?;
        let fired = wait_webhook(&sink, "firing").await?;
        say(out, &format!("    the coordinator's probes confirm it: one incident for the fleet, not one per agent\n    [webhook, signed] {}", fired))?;
        // The agents' next heartbeats report where they are now.
        let on_standby = format!("127.0.0.1:{}", standby.port);
        wait_until(10, "heartbeats reporting every agent on the standby", || async {
            api.get::<Vec<tunnelfleet_coordinator::monitor::EndpointView>>("/v1/oma")
                .await
                .is_ok_and(|v| v.iter().any(|e| e.endpoint == on_standby && e.agents.len() == AGENTS))
        })
        .await?;
        print_oma(out, &api).await?;

        say(out, "\n[6] oma-a answers again: the incident resolves; failback only once it has been healthy for the stable period")?;
        let t1 = Instant::now();
        primary.thaw();
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

        // The loud case: a closed socket is noticed at once.
        let t2 = Instant::now();
        primary.stop().await;
        for a in agents {
            wait_for(&a.socket, 30, |p| all_active(p) && p.active_endpoint.ends_with(&standby.port.to_string())).await
                .with_context(|| format!("{}: did not fail over to the standby", a.id))?;
            get(a.ports[0], "/health").await?;
        }
        let loud_failover_s = t2.elapsed().as_secs_f64();
        primary.restart().await?;
        say(out, &format!("\n[7] the loud case: oma-a killed outright (every connection closed): all {AGENTS} agents on oma-b in {loud_failover_s:.2}s; oma-a restarted"))?;
        for a in agents {
            wait_for(&a.socket, 30, |p| all_active(p) && p.active_endpoint.ends_with(&primary.port.to_string())).await
                .with_context(|| format!("{}: did not fail back to the primary", a.id))?;
        }
        wait_until(20, "every alert resolved and delivered", || async {
            api.get::<Vec<tunnelfleet_coordinator::store::Alert>>("/v1/alerts").await.is_ok_and(|v| v.is_empty())
                && sink.delivered().len() == 6
        })
        .await?;
        print_alerts(out, &api).await?;
        let counters = print_metrics(out, metrics_port).await?;
        let status = print_status(out, first).await?;
        let p = &status.profiles[0];
        let in_force = wait_rollout(&api, aborted.version).await?;
        anyhow::Ok(DemoReport {
            agents: AGENTS,
            pushed_version: c.version,
            version: in_force.version,
            rollout_halted_at: canary,
            failover_s,
            failback_s,
            loud_failover_s,
            failovers: counters.failovers,
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
            "\ndone: {} agents on version {}; the bad change halted at canary {} and was aborted; a silent OMA failure noticed and failed over in {:.2}s, a loud one in {:.2}s; {} group moves; {} webhook deliveries (each incident fired and resolved); {} through the NBD forwards; everything stopped gracefully, temp files removed",
            report.agents,
            report.version,
            report.rollout_halted_at.join(", "),
            report.failover_s,
            report.loud_failover_s,
            report.failovers,
            report.alerts_delivered,
            render::bytes(report.nbd_bytes)
        ),
    )?;
    Ok(report)
}
