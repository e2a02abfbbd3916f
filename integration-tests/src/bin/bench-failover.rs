//! `bench-failover`: how long from the moment the OMA primary is blackholed (sshd and every
//! session process SIGSTOPped: no RST, no FIN) until data flows through the standby.
//!
//! 1. One real agent against a real OpenSSH pair, the coordinator probing every 1 s (800 ms
//!    timeout, 3 failures), the agent's own keepalive left at a production 5 s × 3 so the
//!    coordinator drives the move. Timed until an echo round trip through the agent's forward
//!    succeeds on the standby.
//! 2. The competitor in the same run, on the same pair: the seed's approach with aggressive
//!    settings — a bash loop alternating `ssh -N -L` between primary and standby with
//!    ServerAliveInterval=1, ServerAliveCountMax=3, ConnectTimeout=2.
//! 3. `--agents N` (default 1,000) simulated agents (real QUIC and mTLS, no SSH) on the same
//!    coordinator: timed until every one has received the profile with the standby first.
//! 4. Alert latency: from the coordinator's decision on the third failed probe (the alert's
//!    `fired_unix_ms`) to the signed webhook arriving at a local receiver.
//!
//! Ends with one JSON line. Run: `cargo run --release -p integration-tests --bin bench-failover`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::*;
use tokio::sync::{Semaphore, mpsc};
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_coordinator::admin::Changed;
use tunnelfleet_coordinator::hooks::HookConfig;
use tunnelfleet_coordinator::store::OmaGroup;
use tunnelfleet_protocol::{Hello, PROTOCOL_VERSION, ProfileSpec};

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
    if !Sshd::available("bench-failover") {
        bail!("bench-failover needs /usr/sbin/sshd (apt-get install openssh-server)");
    }
    let primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let (echo, _e) = echo_server().await;
    let sink = WebhookSink::start(0).await?;
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("webhook.secret");
    write_secret(&secret, b"bench-webhook-secret");
    let c = FullCoordinator::start(
        dir.path(),
        Duration::from_secs(5),
        vec![HookConfig::webhook(
            "bench",
            format!("http://127.0.0.1:{}/alerts", sink.port),
            secret,
        )],
    )
    .await;
    let group = OmaGroup::probed(
        "oma",
        vec![primary.endpoint(), standby.endpoint()],
        Duration::from_secs(1),
        Duration::from_millis(800),
        Duration::from_secs(300),
    );
    let _: Changed = c.api.call("PUT", "/v1/groups/oma", Some(&group)).await?;

    // 1. One real agent, production keepalive, coordinator-driven failover.
    let agent = TestAgent::start(&c.agent_section(dir.path(), "vma-1", "site = \"real\"")).await;
    let l = free_port();
    let spec = group_profile("vma-1", &primary, &standby, l, echo)?;
    let _: Changed = c.api.call("PUT", "/v1/profiles/vma-1", Some(&spec)).await?;
    let _: Changed = c
        .api
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({"profile": "vma-1", "agent": "vma-1"})),
        )
        .await?;
    agent.wait_all_active("vma-1").await;
    wait_probes_pass(&c, &primary.endpoint()).await?;
    eprintln!("bench-failover: blackholing the primary under one real agent");
    let frozen = primary.freeze();
    let t0 = Instant::now();
    loop {
        let on_standby = agent.profile("vma-1").await.active_endpoint == standby.endpoint();
        if on_standby && quick_echo(l).await {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not fail over within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let real_sshd_failover_s = t0.elapsed().as_secs_f64();
    eprintln!("  data through the standby after {real_sshd_failover_s:.2} s");
    let fired = wait_webhook(&sink).await?;
    let alert_latency_ms = fired.1.saturating_sub(fired.0) as f64;
    eprintln!("  alert at the webhook {alert_latency_ms:.0} ms after the third failed probe");
    agent.shutdown().await;
    Sshd::thaw(&frozen);
    wait_probes_pass(&c, &primary.endpoint()).await?;

    // 2. The competitor: ssh -L in a loop over both endpoints; tuned, then the seed's settings.
    let known = dir.path().join("known_hosts");
    std::fs::write(
        &known,
        std::fs::read_to_string(&primary.known_hosts)?
            + &std::fs::read_to_string(&standby.known_hosts)?,
    )?;
    let ssh_tuned_s = competitor(&primary, &standby, &known, echo, 1, 2).await?;
    let ssh_seed_s = if quick {
        None
    } else {
        Some(competitor(&primary, &standby, &known, echo, 30, 30).await?)
    };
    wait_probes_pass(&c, &primary.endpoint()).await?;
    let d: serde_json::Value = c
        .api
        .call::<(), _>("POST", "/v1/groups/oma/failback", None)
        .await?;
    eprintln!("  {}", d["message"].as_str().unwrap_or(""));

    // 3. N simulated agents on the same coordinator.
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
        let f = tunnelfleet_coordinator::pki::issue_agent(
            &dir.path().join("pki"),
            &id,
            1,
            &dir.path().join("sim"),
        )?;
        let client = tunnelfleet_agent::link::client_config(&f.ca, &f.cert, &f.key)?;
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: id,
            agent_version: "bench".into(),
            labels: [("site".to_string(), "sim".to_string())].into(),
            applied_version: None,
            started_unix_ms: 1,
        };
        spawn_sim_agent(
            i,
            hello,
            client,
            endpoints[i % endpoints.len()].clone(),
            c.control,
            Duration::from_secs(5),
            gate.clone(),
            up_tx.clone(),
            push_tx.clone(),
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
    // Every agent got the profile on the primary first.
    let primary_ep = primary.endpoint();
    let mut on_primary = vec![false; agents];
    while on_primary.iter().any(|x| !x) {
        let (i, set, _) = tokio::time::timeout(Duration::from_secs(60), push_rx.recv())
            .await?
            .context("pushes ended")?;
        on_primary[i] = first_endpoint(&set) == Some(primary_ep.as_str());
    }
    wait_probes_pass(&c, &primary.endpoint()).await?;
    let frozen = primary.freeze();
    let t0 = Instant::now();
    let standby_ep = standby.endpoint();
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
    let simulated_failover_s = last.saturating_duration_since(t0).as_secs_f64();
    eprintln!(
        "  all {agents} simulated agents sent to the standby after {simulated_failover_s:.2} s"
    );
    Sshd::thaw(&frozen);
    c.stop().await;

    let seed = ssh_seed_s.map_or("null".to_string(), |v| format!("{v:.3}"));
    let seed_ratio = ssh_seed_s.map_or("null".to_string(), |v| {
        format!("{:.1}", v / real_sshd_failover_s)
    });
    eprintln!(
        "bench-failover: tunnelfleet {real_sshd_failover_s:.2} s; ssh loop with ServerAliveInterval=1x3 {ssh_tuned_s:.2} s ({:.2}x); with the seed's 30x3 {seed} s; {agents} simulated agents {simulated_failover_s:.2} s; alert {alert_latency_ms:.0} ms",
        ssh_tuned_s / real_sshd_failover_s
    );
    println!(
        "{{\"real_sshd_failover_s\":{real_sshd_failover_s:.3},\"ssh_loop_1s_keepalive_failover_s\":{ssh_tuned_s:.3},\"ssh_loop_seed_settings_failover_s\":{seed},\"ratio_vs_tuned_ssh\":{:.2},\"ratio_vs_seed_ssh\":{seed_ratio},\"simulated_agents\":{agents},\"simulated_failover_s\":{simulated_failover_s:.3},\"alert_latency_ms\":{alert_latency_ms:.0}}}",
        ssh_tuned_s / real_sshd_failover_s
    );
    Ok(())
}

fn first_endpoint(set: &tunnelfleet_protocol::ProfileSet) -> Option<&str> {
    set.profiles
        .first()
        .and_then(|p| p.endpoints.first())
        .map(String::as_str)
}

/// A group profile with one L forward to the echo server, production keepalive.
fn group_profile(
    name: &str,
    primary: &Sshd,
    standby: &Sshd,
    l: u16,
    echo: u16,
) -> anyhow::Result<ProfileSpec> {
    let pins = format!(
        "host_key_fingerprints = [{:?}, {:?}]",
        primary.fingerprint, standby.fingerprint
    );
    let toml = profile_toml(
        name,
        &[primary.endpoint()],
        primary,
        &[format!("L {l}:localhost:{echo}")],
        &pins,
    )
    .replace("keepalive_interval = \"1s\"", "keepalive_interval = \"5s\"")
    .replace("keepalive_count = 2", "keepalive_count = 3")
    .replace("connect_timeout = \"2s\"", "connect_timeout = \"10s\"");
    let cfg = AgentConfig::parse(&toml, Path::new("bench.toml"))?;
    let mut spec = cfg.profiles[0].clone();
    spec.group = Some("oma".into());
    spec.endpoints.clear();
    Ok(spec)
}

/// The seed's way with a standby added: `ssh -N -L` in a bash loop over both endpoints with
/// `ServerAliveInterval=alive` × 3 and `ConnectTimeout=connect`. Returns seconds from the
/// blackhole to data through the standby.
async fn competitor(
    primary: &Sshd,
    standby: &Sshd,
    known_hosts: &Path,
    echo: u16,
    alive: u32,
    connect: u32,
) -> anyhow::Result<f64> {
    let l = free_port();
    // Both servers accept the primary's client key.
    let ssh = |s: &Sshd| {
        format!(
            "ssh -N -i {key} -p {port} -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={kh} \
             -o ServerAliveInterval={alive} -o ServerAliveCountMax=3 -o ConnectTimeout={connect} -o ExitOnForwardFailure=yes \
             -L {l}:localhost:{echo} {user}@127.0.0.1",
            key = primary.client_key.display(),
            port = s.port,
            kh = known_hosts.display(),
            user = s.user,
        )
    };
    let script = format!(
        "while true; do {}; {}; sleep 0.1; done",
        ssh(primary),
        ssh(standby)
    );
    use std::os::unix::process::CommandExt;
    let _loop = Group(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?,
    );
    let start = Instant::now();
    while !quick_echo(l).await {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the ssh loop did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "bench-failover: blackholing the primary under ssh loop (ServerAliveInterval={alive}, ConnectTimeout={connect})"
    );
    let frozen = primary.freeze();
    let t0 = Instant::now();
    let result = loop {
        if !standby.session_pids().is_empty() && quick_echo(l).await {
            break Ok(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > Duration::from_secs(300) {
            break Err(anyhow::anyhow!(
                "the ssh loop did not reach the standby within 300 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Sshd::thaw(&frozen);
    if let Ok(s) = &result {
        eprintln!("  data through the standby after {s:.2} s");
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

async fn quick_echo(port: u16) -> bool {
    tokio::time::timeout(
        Duration::from_millis(300),
        echo_roundtrip(port, b"failover"),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

async fn wait_probes_pass(c: &FullCoordinator, endpoint: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let v: Vec<tunnelfleet_coordinator::monitor::EndpointView> = c.api.get("/v1/oma").await?;
        if v.iter()
            .any(|e| e.endpoint == endpoint && e.state == "up" && e.consecutive_failures == 0)
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{endpoint} never passed its probes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (fired_unix_ms, received_unix_ms) of the first oma_down firing at the sink.
async fn wait_webhook(sink: &WebhookSink) -> anyhow::Result<(u64, u64)> {
    let start = Instant::now();
    loop {
        if let Some(r) = sink
            .delivered()
            .into_iter()
            .find(|r| r.json()["alert"]["kind"] == "oma_down" && r.json()["status"] == "firing")
        {
            let fired = r.json()["alert"]["fired_unix_ms"].as_u64().unwrap_or(0);
            return Ok((fired, r.received_unix_ms));
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!("no alert at the webhook within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
