//! `bench-failover`: from a fault to data through the standby, for the failures that really
//! happen, against real OpenSSH sshd on two OMA hosts of their own (network namespaces on
//! 198.18.0.0/15, each sshd with the OMA drop-in, its own API and NBD echo on its own
//! `localhost`), with the competitors in the same run.
//!
//! Coordinated, with the README's defaults and nothing tuned (the group's probes every 1 s,
//! 800 ms timeout, 3 failures; heartbeats every 5 s; the agents' keepalive 5 s × 3, connect 15 s,
//! health check every 10 s with a 5 s timeout and threshold 3, failback after 30 s) — except the
//! group's failback after 5 s instead of 5 min, so the runs come back between faults (no figure
//! measures a failback); three real agents; forwards L to the API, L to the NBD echo, R back to
//! the appliance's API. Two agents run in this process, the third is the agent binary inside a site
//! host of its own with its own links to both OMAs:
//! - `blackhole_s`: the primary host blackholed (nftables drop-all: no RST, no FIN) → data
//!   through the standby on L and R; `alert_latency_ms`: the coordinator's decision to the signed
//!   webhook at a real receiver; `reverse_after_failback_s`: the group's failback → R bound on
//!   the primary again (its stale session dropped by the drop-in's ClientAlive probes).
//! - `freeze_s`: the primary's sshd and every session child SIGSTOPped → data through the standby.
//! - `service_down_alert_s` / `service_down_failover_s`: the primary's API answering 503 while
//!   its sshd answers → the first alert about it at the webhook (the agents' `tunnel_health`)
//!   / data through the standby's API; `service_down_incident_s`: the group's `oma_unhealthy`.
//! - `partition_s`: only the site host's link to the primary cut (the coordinator still reaches
//!   it) → that agent's data through the standby.
//! - `simulated_failover_s`: `--agents N` (default 1,000) protocol-level agents (real QUIC and
//!   mTLS) on the same coordinator; the primary host blackholed → every one pushed the standby.
//!
//! Standalone (no coordinator, the defaults: keepalive 5 s × 3, health every 10 s):
//! `standalone_blackhole_s`. Competitors, the same
//! blackhole: `ssh -N -L` in a bash loop over both hosts with ServerAliveInterval=5 × 3 and
//! ConnectTimeout=5 (`ssh_loop_blackhole_s`), and with the seed's 30 × 3 and 30
//! (`seed_blackhole_s`, skipped by `--quick`).
//!
//! Ends with one JSON line. Needs root (network namespaces). Run:
//! `cargo run --release -p integration-tests --bin bench-failover`.

use integration_tests::SpawnOwned;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::*;
use tokio::sync::{Semaphore, mpsc};
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_coordinator::admin::Changed;
use tunnelfleet_coordinator::hooks::HookConfig;
use tunnelfleet_coordinator::store::OmaGroup;
use tunnelfleet_protocol::ProfileSpec;

/// Two OMA hosts: sshd with the drop-in, the API and the NBD echo on the same ports in each.
struct Omas {
    h1: NetHost,
    h2: NetHost,
    primary: Sshd,
    standby: Sshd,
    api_port: u16,
    echo_port: u16,
    api1: NsHttp,
    _rest: Vec<NsHttp>,
}

fn omas() -> Omas {
    let drop_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/oma/tunnelfleet.conf");
    let include = format!("Include {}\n", drop_in.display());
    let (h1, h2) = (NetHost::create(), NetHost::create());
    let mut primary = Sshd::start_in(&h1);
    primary.restart_with(&include);
    let mut standby = Sshd::start_sharing_client_key_in(&primary, &h2);
    standby.restart_with(&include);
    let (api_port, echo_port) = (free_port(), free_port());
    let api1 = NsHttp::start_on(&h1, "oma-a api", api_port);
    let rest = vec![
        NsHttp::start_on(&h2, "oma-b api", api_port),
        NsHttp::echo_on(&h1, echo_port),
        NsHttp::echo_on(&h2, echo_port),
    ];
    Omas {
        h1,
        h2,
        primary,
        standby,
        api_port,
        echo_port,
        api1,
        _rest: rest,
    }
}

/// One appliance's forwards: L to the API, L to the NBD echo, R back to its own API.
struct Ports {
    api: u16,
    echo: u16,
    r: u16,
}

/// A profile block with the defaults (keepalive 5 s × 3, connect 15 s, failover after 3 connect
/// failures, health timeout 5 s and threshold 3) and a health check every `health_every`.
fn profile_text(
    o: &Omas,
    name: &str,
    p: &Ports,
    vma_api: u16,
    failback_after: &str,
    health_every: &str,
) -> String {
    let extra = format!(
        "host_key_fingerprints = [{:?}, {:?}]\nfailback_after = \"{failback_after}\"\n[profile.health]\nhttp = \"http://127.0.0.1:{}/health\"\ninterval = \"{health_every}\"\n",
        o.primary.fingerprint, o.standby.fingerprint, p.api
    );
    profile_toml(
        name,
        &[o.primary.endpoint(), o.standby.endpoint()],
        &o.primary,
        &[
            format!("L {}:localhost:{}", p.api, o.api_port),
            format!("L {}:localhost:{}", p.echo, o.echo_port),
            format!("R localhost:{}:localhost:{vma_api}", p.r),
        ],
        &extra,
    )
    .replace("keepalive_interval = \"1s\"", "keepalive_interval = \"5s\"")
    .replace("keepalive_count = 2", "keepalive_count = 3")
    .replace("connect_timeout = \"2s\"", "connect_timeout = \"15s\"")
    .replace("failover_after = 2", "failover_after = 3")
    .replace("reconnect_max = \"1s\"", "reconnect_max = \"30s\"")
}

/// The same profile for group `oma`, for the coordinator.
fn group_profile(o: &Omas, name: &str, p: &Ports, vma_api: u16) -> anyhow::Result<ProfileSpec> {
    let cfg = AgentConfig::parse(
        &profile_text(o, name, p, vma_api, "30s", "10s"),
        Path::new("bench.toml"),
    )?;
    let mut spec = cfg.profiles[0].clone();
    spec.group = Some("oma".into());
    spec.endpoints.clear();
    Ok(spec)
}

/// Seconds until `cond` holds (polled every 20 ms), or an error naming `what` after `limit`.
async fn until<F, Fut>(what: &str, limit: u64, mut cond: F) -> anyhow::Result<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !cond().await {
        if t0.elapsed() > Duration::from_secs(limit) {
            bail!("not within {limit} s: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The API's answer through `port` (its body names the OMA), from this namespace.
async fn api_via(port: u16) -> Option<String> {
    tokio::time::timeout(Duration::from_millis(500), http_get(port, "/health"))
        .await
        .ok()
        .and_then(Result::ok)
        .filter(|(code, _)| *code == 200)
        .map(|(_, body)| body)
}

async fn quick_echo(port: u16) -> bool {
    tokio::time::timeout(
        Duration::from_millis(500),
        echo_roundtrip(port, b"failover"),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// The reverse forward answers on `host`'s own loopback.
fn reverse_ok(host: &NetHost, port: u16) -> bool {
    host.http_get(port, "/health")
        .is_ok_and(|(code, body)| code == 200 && body == "vma-api ok")
}

fn deliveries(sink: &WebhookSink, kind: &str, status: &str) -> Vec<Received> {
    sink.delivered()
        .into_iter()
        .filter(|r| r.json()["alert"]["kind"] == kind && r.json()["status"] == status)
        .collect()
}

async fn active(c: &FullCoordinator, endpoint: &str) -> bool {
    c.api
        .get::<Vec<tunnelfleet_coordinator::monitor::EndpointView>>("/v1/oma")
        .await
        .is_ok_and(|v| v.iter().any(|e| e.endpoint == endpoint && e.active))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut agents = 1_000usize;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agents" => agents = args.next().context("--agents N")?.parse()?,
            // Skips the seed's ssh settings (about two minutes of waiting).
            "--quick" => quick = true,
            other => bail!("unknown argument {other} (use --agents N, --quick)"),
        }
    }
    if !NetHost::available("bench-failover") {
        bail!("bench-failover needs root, iproute2, nftables, python3 and openssh-server");
    }
    let agent_bin = dist_binary("tunnelfleet-agent", "tunnelfleet-agent")?;
    let o = omas();
    let site = NetHost::create();
    let site_to_primary = site.link_to(&o.h1);
    let _site_to_standby = site.link_to(&o.h2);
    let vma_api = http_service("vma-api").await;
    let site_vma_api = NsHttp::start(&site, "vma-api");
    let sink = WebhookSink::start(0).await?;
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("webhook.secret");
    write_secret(&secret, b"bench-webhook-secret");
    let c = FullCoordinator::start_on(
        dir.path(),
        Duration::from_secs(5),
        vec![HookConfig::webhook(
            "bench",
            format!("http://127.0.0.1:{}/alerts", sink.port),
            secret,
        )],
        site.peer,
    )
    .await;
    let group = OmaGroup::probed(
        "oma",
        vec![o.primary.endpoint(), o.standby.endpoint()],
        Duration::from_secs(1),
        Duration::from_millis(800),
        Duration::from_secs(5),
    );
    let _: Changed = c.api.call("PUT", "/v1/groups/oma", Some(&group)).await?;

    // Three coordinated agents: two here, one in the site host.
    let mut real = Vec::new();
    for id in ["vma-1", "vma-2", "vma-3"] {
        let section = c.agent_section(dir.path(), id, "site = \"real\"");
        let agent = if id == "vma-3" {
            TestAgent::start_binary_in(&site, &agent_bin, "", &section).await
        } else {
            TestAgent::start(&section).await
        };
        let ports = Ports {
            api: free_port(),
            echo: free_port(),
            r: free_port(),
        };
        let target = if id == "vma-3" {
            site_vma_api.port
        } else {
            vma_api.port
        };
        let spec = group_profile(&o, id, &ports, target)?;
        let _: Changed = c
            .api
            .call("PUT", &format!("/v1/profiles/{id}"), Some(&spec))
            .await?;
        let _: Changed = c
            .api
            .call(
                "POST",
                "/v1/assignments",
                Some(&serde_json::json!({"profile": id, "agent": id})),
            )
            .await?;
        real.push((agent, ports));
    }
    let p1 = &real[0].1;
    let p3 = &real[2].1;
    let on = |port: u16, oma: &'static str| async move {
        api_via(port)
            .await
            .is_some_and(|b| b == format!("{oma} api ok"))
    };
    let all_on_primary = || async {
        let mut ok = on(p1.api, "oma-a").await && on(real[1].1.api, "oma-a").await;
        ok &= site
            .http_get(p3.api, "/health")
            .is_ok_and(|(_, b)| b == "oma-a api ok");
        ok && active(&c, &o.primary.endpoint()).await
    };
    until("every agent through the primary", 60, all_on_primary).await?;

    // Blackhole.
    eprintln!("bench-failover: blackholing the primary host (nftables drop-all)");
    o.h1.blackhole();
    let blackhole_s = until("vma-1's L and R through the standby", 60, || async {
        on(p1.api, "oma-b").await && quick_echo(p1.echo).await && reverse_ok(&o.h2, p1.r)
    })
    .await?;
    eprintln!("  L and R through the standby after {blackhole_s:.2} s");
    until("oma_down at the webhook", 30, || async {
        !deliveries(&sink, "oma_down", "firing").is_empty()
    })
    .await?;
    let fired = &deliveries(&sink, "oma_down", "firing")[0];
    let alert_latency_ms = fired
        .received_unix_ms
        .saturating_sub(fired.json()["alert"]["fired_unix_ms"].as_u64().unwrap_or(0))
        as f64;
    eprintln!("  alert at the webhook {alert_latency_ms:.0} ms after the decision");
    // Down for longer than the drop-in's 15 s: the primary's sshd dropped its dead sessions.
    tokio::time::sleep(Duration::from_secs(16)).await;
    o.h1.restore();
    let primary_ep = o.primary.endpoint();
    until("the group's failback", 60, || active(&c, &primary_ep)).await?;
    let reverse_after_failback_s = until("vma-1's R on the primary again", 60, || async {
        reverse_ok(&o.h1, p1.r) && on(p1.api, "oma-a").await
    })
    .await?;
    eprintln!("  R bound on the primary {reverse_after_failback_s:.2} s after the failback");
    until("every agent back on the primary", 60, all_on_primary).await?;

    // SIGSTOP of the primary's sshd and every session child.
    eprintln!("bench-failover: SIGSTOP of the primary's sshd");
    let frozen = o.primary.freeze();
    let freeze_s = until("vma-1 through the standby", 60, || async {
        on(p1.api, "oma-b").await && quick_echo(p1.echo).await
    })
    .await?;
    eprintln!("  through the standby after {freeze_s:.2} s");
    tokio::time::sleep(Duration::from_secs(16)).await;
    Sshd::thaw(&frozen);
    until("every agent back on the primary", 90, all_on_primary).await?;

    // The API down, sshd up.
    eprintln!("bench-failover: the primary's API answering 503, its sshd up");
    o.api1.set_failing(true);
    let t0 = Instant::now();
    let service_down_failover_s = until("vma-1 through the standby's API", 90, || {
        on(p1.api, "oma-b")
    })
    .await?;
    let fired = |kind: &str| {
        deliveries(&sink, kind, "firing")
            .iter()
            .map(|r| r.received_unix_ms)
            .min()
    };
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64
        - (t0.elapsed().as_millis() as u64);
    until("tunnel_health at the webhook", 60, || async {
        fired("tunnel_health").is_some()
    })
    .await?;
    let service_down_alert_s = fired("tunnel_health")
        .unwrap_or(since)
        .saturating_sub(since) as f64
        / 1000.0;
    until("oma_unhealthy at the webhook", 60, || async {
        fired("oma_unhealthy").is_some()
    })
    .await?;
    let service_down_incident_s = fired("oma_unhealthy")
        .unwrap_or(since)
        .saturating_sub(since) as f64
        / 1000.0;
    eprintln!(
        "  tunnel_health after {service_down_alert_s:.2} s, data through the standby after {service_down_failover_s:.2} s, oma_unhealthy after {service_down_incident_s:.2} s"
    );
    o.api1.set_failing(false);
    until("every agent back on the primary", 90, all_on_primary).await?;

    // Partition: only the site's link to the primary.
    eprintln!("bench-failover: the site host cut off from the primary");
    o.h1.cut(&site_to_primary);
    let partition_s = until("vma-3 through the standby", 60, || async {
        site.http_get(p3.api, "/health")
            .is_ok_and(|(_, b)| b == "oma-b api ok")
    })
    .await?;
    eprintln!("  through the standby after {partition_s:.2} s");
    o.h1.restore();
    until("every agent back on the primary", 90, all_on_primary).await?;
    for (a, _) in real {
        a.shutdown().await;
    }

    // Simulated agents on the same coordinator.
    let simulated_failover_s = simulated(&c, &o, dir.path(), agents).await?;
    o.h1.restore();
    c.stop().await;

    // Standalone, defaults.
    eprintln!("bench-failover: a standalone agent, the primary host blackholed");
    let ps = Ports {
        api: free_port(),
        echo: free_port(),
        r: free_port(),
    };
    // Standalone with the defaults: health every 10 s, failback after 30 s.
    let alone = TestAgent::start(&profile_text(&o, "alone", &ps, vma_api.port, "30s", "10s")).await;
    until("the standalone agent through the primary", 30, || {
        on(ps.api, "oma-a")
    })
    .await?;
    o.h1.blackhole();
    let standalone_blackhole_s = until("the standalone agent through the standby", 60, || async {
        on(ps.api, "oma-b").await && reverse_ok(&o.h2, ps.r)
    })
    .await?;
    eprintln!("  L and R through the standby after {standalone_blackhole_s:.2} s");
    o.h1.restore();
    alone.shutdown().await;

    // The competitors, the same blackhole.
    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        std::fs::read_to_string(&o.primary.known_hosts)?
            + &std::fs::read_to_string(&o.standby.known_hosts)?,
    )?;
    let ssh_loop_blackhole_s = competitor(&o, &known, 5, 5).await?;
    let seed_blackhole_s = if quick {
        None
    } else {
        Some(competitor(&o, &known, 30, 30).await?)
    };

    let seed = seed_blackhole_s.map_or("null".to_string(), |v| format!("{v:.3}"));
    let seed_ratio = seed_blackhole_s.map_or("null".to_string(), |v| {
        format!("{:.1}", v / standalone_blackhole_s)
    });
    let loop_ratio = ssh_loop_blackhole_s / standalone_blackhole_s;
    eprintln!(
        "bench-failover: coordinated blackhole {blackhole_s:.2} s, freeze {freeze_s:.2} s, API down: alert {service_down_alert_s:.2} s / standby {service_down_failover_s:.2} s / incident {service_down_incident_s:.2} s, partition {partition_s:.2} s, R after failback {reverse_after_failback_s:.2} s; standalone blackhole {standalone_blackhole_s:.2} s vs ssh loop 5x3 {ssh_loop_blackhole_s:.2} s ({loop_ratio:.2}x) and the seed's settings {seed} s; {agents} simulated agents {simulated_failover_s:.2} s; alert {alert_latency_ms:.0} ms"
    );
    println!(
        "{{\"blackhole_s\":{blackhole_s:.3},\"real_sshd_failover_s\":{blackhole_s:.3},\"freeze_s\":{freeze_s:.3},\"service_down_alert_s\":{service_down_alert_s:.3},\"service_down_failover_s\":{service_down_failover_s:.3},\"service_down_incident_s\":{service_down_incident_s:.3},\"partition_s\":{partition_s:.3},\"standalone_blackhole_s\":{standalone_blackhole_s:.3},\"reverse_after_failback_s\":{reverse_after_failback_s:.3},\"simulated_agents\":{agents},\"simulated_failover_s\":{simulated_failover_s:.3},\"alert_latency_ms\":{alert_latency_ms:.0},\"ssh_loop_blackhole_s\":{ssh_loop_blackhole_s:.3},\"seed_blackhole_s\":{seed},\"ratio_ssh_loop_vs_standalone\":{loop_ratio:.2},\"ratio_seed_vs_standalone\":{seed_ratio}}}"
    );
    Ok(())
}

/// `agents` protocol-level agents on `c`; the primary host blackholed; seconds until every one
/// was pushed the standby first. Leaves the primary blackholed.
async fn simulated(
    c: &FullCoordinator,
    o: &Omas,
    dir: &Path,
    agents: usize,
) -> anyhow::Result<f64> {
    eprintln!("bench-failover: {agents} simulated agents");
    let mut spec = integration_tests::profile_spec("sim", &["L 18082:localhost:8082"]);
    spec.group = Some("oma".into());
    spec.endpoints.clear();
    let _: Changed = c.api.call("PUT", "/v1/profiles/sim", Some(&spec)).await?;
    let _: Changed = c
        .api
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({"profile": "sim", "labels": {"site": "sim"}})),
        )
        .await?;
    let endpoints = integration_tests::sim_endpoints(8)?;
    let (push_tx, mut push_rx) = mpsc::unbounded_channel();
    let (up_tx, mut up_rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(128));
    for i in 0..agents {
        let id = format!("s{i:05}");
        let f =
            tunnelfleet_coordinator::pki::issue_agent(&dir.join("pki"), &id, 1, &dir.join("sim"))?;
        let client = tunnelfleet_agent::link::client_config(&f.ca, &f.cert, &f.key)?;
        let hello = sim_hello(id, &[("site", "sim")]);
        spawn_sim_agent(
            i,
            hello,
            client,
            endpoints[i % endpoints.len()].clone(),
            vec![c.control],
            Duration::from_secs(5),
            gate.clone(),
            up_tx.clone(),
            push_tx.clone(),
            integration_tests::SimReports::Nothing,
        );
    }
    drop(up_tx);
    for n in 0..agents {
        if tokio::time::timeout(Duration::from_secs(60), up_rx.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            bail!("only {n} of {agents} simulated agents connected");
        }
    }
    let primary_ep = o.primary.endpoint();
    let mut on_primary = vec![false; agents];
    while on_primary.iter().any(|x| !x) {
        let (i, set, _) = tokio::time::timeout(Duration::from_secs(60), push_rx.recv())
            .await?
            .context("pushes ended")?;
        on_primary[i] = first_endpoint(&set) == Some(primary_ep.as_str());
    }
    o.h1.blackhole();
    let t0 = Instant::now();
    let standby_ep = o.standby.endpoint();
    let mut moved = vec![false; agents];
    let mut last = t0;
    while moved.iter().any(|x| !x) {
        let (i, set, at) = tokio::time::timeout(Duration::from_secs(60), push_rx.recv())
            .await
            .context("simulated agents not all moved within 60 s")?
            .context("pushes ended")?;
        if first_endpoint(&set) == Some(standby_ep.as_str()) && !moved[i] {
            moved[i] = true;
            last = last.max(at);
        }
    }
    let s = last.saturating_duration_since(t0).as_secs_f64();
    eprintln!("  all {agents} simulated agents sent to the standby after {s:.2} s");
    Ok(s)
}

fn first_endpoint(set: &tunnelfleet_protocol::ProfileSet) -> Option<&str> {
    set.profiles
        .first()
        .and_then(|p| p.endpoints.first())
        .map(String::as_str)
}

/// The seed's way with a standby added: `ssh -N -L` in a bash loop over both hosts with
/// `ServerAliveInterval=alive` × 3 and `ConnectTimeout=connect`. Seconds from the blackhole of
/// the primary host to data through the standby.
async fn competitor(o: &Omas, known_hosts: &Path, alive: u32, connect: u32) -> anyhow::Result<f64> {
    let l = free_port();
    // Both servers accept the primary's client key.
    let ssh = |s: &Sshd| {
        format!(
            "ssh -N -i {key} -p {port} -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={kh} \
             -o ServerAliveInterval={alive} -o ServerAliveCountMax=3 -o ConnectTimeout={connect} -o ExitOnForwardFailure=yes \
             -L {l}:localhost:{api} {user}@{host}",
            key = o.primary.client_key.display(),
            port = s.port,
            kh = known_hosts.display(),
            api = o.api_port,
            user = s.user,
            host = s
                .endpoint()
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default(),
        )
    };
    let script = format!(
        "while true; do {}; {}; sleep 0.1; done",
        ssh(&o.primary),
        ssh(&o.standby)
    );
    use std::os::unix::process::CommandExt;
    let _loop = Group(
        integration_tests::children::owned("bash")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn_owned()?,
    );
    until("the ssh loop through the primary", 30, || async {
        api_via(l).await.is_some_and(|b| b == "oma-a api ok")
    })
    .await?;
    eprintln!(
        "bench-failover: blackholing the primary host under the ssh loop (ServerAliveInterval={alive} x 3, ConnectTimeout={connect})"
    );
    o.h1.blackhole();
    let result = until("the ssh loop through the standby", 300, || async {
        api_via(l).await.is_some_and(|b| b == "oma-b api ok")
    })
    .await;
    o.h1.restore();
    if let Ok(s) = &result {
        eprintln!("  through the standby after {s:.2} s");
    }
    result
}

/// A process group killed when dropped (the loop and its ssh children).
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        integration_tests::signal_group(self.0.id(), libc::SIGKILL);
        let _ = self.0.wait();
    }
}
