//! `bench-fleet`: N protocol-level agents (real QUIC and mutual TLS, no SSH) against one
//! `tunnelfleet-coordinator` process: time to connect all, heartbeats absorbed per second, time
//! until a profile change is acknowledged by every agent (p50, p99, max), and the coordinator's
//! CPU and peak RSS. Ends with one JSON line.
//!
//! `--hostile` adds one enrolled agent gone bad (issue 13): after the honest push is measured,
//! four connections with its one certificate flood heartbeats of 255 made-up failing profiles,
//! send `Applied` frames for versions never pushed and, now and then, a heartbeat over the
//! profile bound (closed as malformed, reconnected); a second push to the honest agents is
//! measured under that; then the hostile agent is revoked. The JSON line then carries
//! `honest_push_p99_ms`, `baseline_push_p99_ms`, `coordinator_rss_kb`, `hostile_alerts_raised`
//! and `hostile_links_open_after_revoke`.
//!
//! Run: `cargo run --release -p integration-tests --bin bench-fleet [-- --agents 10000] [--hostile]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Semaphore, mpsc};
use tunnelfleet_coordinator::pki;
use tunnelfleet_ops::api::ApiClient;
use tunnelfleet_protocol::{Hello, PROTOCOL_VERSION};

const HEARTBEAT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut agents = 10_000usize;
    let mut hostile = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--agents" => agents = args.next().context("--agents N")?.parse()?,
            "--hostile" => hostile = true,
            other => bail!("unknown argument {other} (use --agents N, --hostile)"),
        }
    }
    let dir = tempfile::tempdir()?;
    let c = integration_tests::BenchCoordinator::start(dir.path(), "heartbeat_interval = \"5s\"\n")
        .await?;
    let (pid, api, udp, pki_dir) = (c.pid, c.api.clone(), c.control, c.pki_dir.clone());

    eprintln!("bench-fleet: issuing {agents} agent certificates");
    let certs_dir = dir.path().join("agents");
    let configs = c.issue_agents(agents, &certs_dir)?;
    let endpoints = integration_tests::sim_endpoints(8)?;

    eprintln!("bench-fleet: connecting {agents} agents to {udp}");
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let (up_tx, mut up_rx) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(Semaphore::new(256));
    let t0 = Instant::now();
    for (i, (id, client)) in configs.into_iter().enumerate() {
        let ep = endpoints[i % endpoints.len()].clone();
        let (acks, up, gate) = (acks_tx.clone(), up_tx.clone(), gate.clone());
        let hello = integration_tests::sim_hello(id.clone(), &[("site", "bench")]);
        integration_tests::spawn_sim_agent(
            i,
            hello,
            client,
            ep,
            vec![udp],
            HEARTBEAT,
            gate,
            up,
            acks,
            integration_tests::SimReports::Nothing,
        );
    }
    drop(up_tx);
    let mut connected = 0;
    while connected < agents {
        match tokio::time::timeout(Duration::from_secs(60), up_rx.recv()).await {
            Ok(Some(())) => connected += 1,
            _ => bail!("only {connected} of {agents} agents connected"),
        }
    }
    let connect_all_s = t0.elapsed().as_secs_f64();
    eprintln!("  connected all in {connect_all_s:.2}s");
    // Drain the on-connect pushes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while acks_rx.try_recv().is_ok() {}

    // Heartbeats absorbed by the coordinator over a 10 s window, and its CPU meanwhile.
    let cpu0 = cpu_ticks(pid)?;
    let w0 = Instant::now();
    let hb0 = heartbeats(&api).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let hb1 = heartbeats(&api).await?;
    let window = w0.elapsed().as_secs_f64();
    let heartbeats_per_s = (hb1 - hb0) as f64 / window;

    // A profile change to every agent, timed until each agent received it (and acknowledged).
    let spec =
        integration_tests::profile_spec("oma", &["L 8082:localhost:8082", "R 9081:localhost:8081"]);
    let _: serde_json::Value = api.call("PUT", "/v1/profiles/oma", Some(&spec)).await?;
    let tp = Instant::now();
    let (cpu_c0, cpu_s0) = (cpu_ticks(pid)?, cpu_ticks(std::process::id())?);
    let drops0 = udp_rcvbuf_errors();
    let changed: serde_json::Value = api
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({ "profile": "oma", "labels": { "site": "bench" } })),
        )
        .await?;
    let version = changed["version"].as_u64().context("version")?;
    // The coordinator answers once the change is durable and every frame is queued.
    let queued_ms = tp.elapsed().as_secs_f64() * 1000.0;
    let mut lat = received(&mut acks_rx, agents, version, tp).await?;
    let push_s = tp.elapsed().as_secs_f64();
    let (cpu_c1, cpu_s1) = (cpu_ticks(pid)?, cpu_ticks(std::process::id())?);
    eprintln!(
        "  during the push ({push_s:.2} s): coordinator CPU {:.0}%, simulated agents' CPU {:.0}% (of one core; the machine has {}); UDP datagrams dropped for want of buffer (whole host): {}",
        (cpu_c1 - cpu_c0) as f64 / push_s,
        (cpu_s1 - cpu_s0) as f64 / push_s,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        udp_rcvbuf_errors()
            .zip(drops0)
            .map_or("unknown".to_string(), |(b, a)| (b - a).to_string())
    );
    let cpu1 = cpu_ticks(pid)?;
    let busy_s = (cpu1 - cpu0) as f64 / 100.0; // USER_HZ is 100 on Linux
    let coordinator_cpu_pct = 100.0 * busy_s / w0.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| percentile(&lat, p);
    if hostile {
        let h = attack(&api, &pki_dir, &certs_dir, udp, &mut acks_rx, agents).await?;
        let rss = integration_tests::status_kb(pid, "VmHWM")?;
        drop(c);
        eprintln!(
            "  honest push p99 {:.1} ms under attack vs {:.1} ms before ({:+.0} %); the hostile agent sent {} heartbeats and {} Applied frames over {} connections ({} closed as malformed); alerts raised under its name: {}; its links open 3 s after revoke: {}; coordinator peak RSS {rss} kB",
            h.honest_p99,
            pct(0.99),
            100.0 * (h.honest_p99 / pct(0.99) - 1.0),
            h.heartbeats,
            h.applied,
            h.connections,
            h.malformed,
            h.alerts,
            h.open_after_revoke
        );
        println!(
            "{{\"agents\":{agents},\"honest_push_p99_ms\":{:.1},\"baseline_push_p99_ms\":{:.1},\"coordinator_rss_kb\":{rss},\"hostile_alerts_raised\":{},\"hostile_links_open_after_revoke\":{},\"hostile_heartbeats_sent\":{},\"hostile_applied_sent\":{},\"hostile_connections\":{}}}",
            h.honest_p99,
            pct(0.99),
            h.alerts,
            h.open_after_revoke,
            h.heartbeats,
            h.applied,
            h.connections
        );
        return Ok(());
    }
    let rss = integration_tests::status_kb(pid, "VmHWM")?;
    drop(c);
    eprintln!(
        "  heartbeats {heartbeats_per_s:.0}/s; push durable and queued for all in {queued_ms:.1} ms; received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; coordinator CPU {coordinator_cpu_pct:.1}%, peak RSS {rss} kB",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "{{\"agents\":{agents},\"connect_all_s\":{connect_all_s:.3},\"heartbeats_per_s\":{heartbeats_per_s:.1},\"push_ack_p50_ms\":{:.1},\"push_ack_p99_ms\":{:.1},\"push_ack_max_ms\":{:.1},\"coordinator_cpu_pct\":{coordinator_cpu_pct:.1},\"coordinator_rss_kb\":{rss}}}",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}

/// Push latencies (ms since `tp`) until every one of `agents` received `version`.
async fn received(
    acks_rx: &mut Acks,
    agents: usize,
    version: u64,
    tp: Instant,
) -> anyhow::Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(agents);
    while lat.len() < agents {
        match tokio::time::timeout(Duration::from_secs(60), acks_rx.recv()).await {
            Ok(Some((_, set, at))) if set.version == version => {
                lat.push(at.saturating_duration_since(tp).as_secs_f64() * 1000.0)
            }
            Ok(Some(_)) => {}
            _ => bail!(
                "only {} of {agents} agents received version {version}",
                lat.len()
            ),
        }
    }
    Ok(lat)
}

/// Where the simulated agents report each push they received.
type Acks = mpsc::UnboundedReceiver<(usize, tunnelfleet_protocol::ProfileSet, Instant)>;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// What the hostile agent did and achieved.
struct Attack {
    honest_p99: f64,
    heartbeats: u64,
    applied: u64,
    connections: u64,
    malformed: u64,
    alerts: usize,
    open_after_revoke: usize,
}

/// The hostile agent's attacks while a push to the honest agents is measured; then its revoke.
async fn attack(
    api: &ApiClient,
    pki_dir: &std::path::Path,
    certs_dir: &std::path::Path,
    udp: std::net::SocketAddr,
    acks_rx: &mut Acks,
    agents: usize,
) -> anyhow::Result<Attack> {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
    use tunnelfleet_protocol::{
        Applied, ErrorCount, ErrorKind, Heartbeat, ProfileReport, TunnelState,
    };
    let f = pki::issue_agent(pki_dir, "hostile", 1, certs_dir)?;
    let client = tunnelfleet_agent::link::client_config(&f.ca, &f.cert, &f.key)?;
    let ep = integration_tests::sim_endpoints(1)?.remove(0);
    let report = |i: usize| ProfileReport {
        reconnects: i as u64,
        last_error: Some("health check failed: HTTP 503".into()),
        consecutive_failures: 99,
        errors: vec![ErrorCount {
            endpoint: format!("victim-{i}:22"),
            kind: ErrorKind::Auth,
            count: 1_000,
            last_detail: "refused".into(),
            last_unix_ms: 1,
        }],
        ..ProfileReport::new(
            &format!("made-up-{i}"),
            TunnelState::Backoff,
            &format!("victim-{i}:22"),
        )
    };
    let invented: Vec<ProfileReport> = (0..255).map(report).collect();
    let oversized: Vec<ProfileReport> = (0..1_000).map(report).collect();
    let open = Arc::new(AtomicUsize::new(0));
    let counts = Arc::new([
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ]);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (client, ep, open, counts, stop) = (
            client.clone(),
            ep.clone(),
            open.clone(),
            counts.clone(),
            stop.clone(),
        );
        let (invented, oversized) = (invented.clone(), oversized.clone());
        tasks.push(tokio::spawn(async move {
            let hello = Hello {
                protocol: PROTOCOL_VERSION,
                agent_id: "hostile".into(),
                agent_version: "\u{1b}[31mpwned".into(),
                labels: [("site".to_string(), "bench".to_string())].into(),
                applied_version: None,
                started_unix_ms: 1,
            };
            while !stop.is_cancelled() {
                let Ok(mut l) = tunnelfleet_agent::link::connect(
                    &ep,
                    client.clone(),
                    udp,
                    "localhost",
                    hello.clone(),
                )
                .await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                counts[2].fetch_add(1, Relaxed);
                open.fetch_add(1, Relaxed);
                for n in 1u64.. {
                    if stop.is_cancelled() {
                        break;
                    }
                    let sent = if n % 500 == 0 {
                        counts[3].fetch_add(1, Relaxed);
                        l.heartbeat(Heartbeat {
                            seq: n,
                            sent_unix_ms: 0,
                            profiles: oversized.clone(),
                        })
                        .await
                    } else if n % 10 == 0 {
                        counts[1].fetch_add(1, Relaxed);
                        l.applied(Applied {
                            version: 1_000_000 + n,
                            ok: false,
                            results: vec![],
                        })
                        .await
                    } else {
                        counts[0].fetch_add(1, Relaxed);
                        l.heartbeat(Heartbeat {
                            seq: n,
                            sent_unix_ms: 0,
                            profiles: invented.clone(),
                        })
                        .await
                    };
                    if sent.is_err() {
                        break;
                    }
                }
                open.fetch_sub(1, Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The honest push, under attack.
    let spec = integration_tests::profile_spec("oma2", &["L 8083:localhost:8082"]);
    let _: serde_json::Value = api.call("PUT", "/v1/profiles/oma2", Some(&spec)).await?;
    let tp = Instant::now();
    let changed: serde_json::Value = api
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({ "profile": "oma2", "labels": { "site": "bench" } })),
        )
        .await?;
    let version = changed["version"].as_u64().context("version")?;
    let mut lat = received(acks_rx, agents, version, tp).await?;
    lat.sort_by(|a, b| a.total_cmp(b));
    let _: serde_json::Value = api
        .call(
            "POST",
            "/v1/agents/hostile/revoke",
            Some(&serde_json::json!({ "reason": "bench: stolen" })),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open_after_revoke = open.load(Relaxed);
    stop.cancel();
    for t in tasks {
        t.abort();
    }
    let alerts: serde_json::Value = api.get("/v1/alerts?all=true").await?;
    let alerts = alerts
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| {
                    x["subject"]
                        .as_str()
                        .is_some_and(|s| s.contains("made-up") || s.contains("victim"))
                })
                .count()
        })
        .unwrap_or(0);
    Ok(Attack {
        honest_p99: percentile(&lat, 0.99),
        heartbeats: counts[0].load(Relaxed),
        applied: counts[1].load(Relaxed),
        connections: counts[2].load(Relaxed),
        malformed: counts[3].load(Relaxed),
        alerts,
        open_after_revoke,
    })
}

async fn heartbeats(api: &ApiClient) -> anyhow::Result<u64> {
    let list: serde_json::Value = api.get("/v1/agents").await?;
    Ok(list
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["heartbeats"].as_u64()).sum())
        .unwrap_or(0))
}

/// The host's UDP `RcvbufErrors` counter (datagrams dropped on a full receive buffer).
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    // After the command: state is [0]; utime is [11], stime [12].
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}
