//! `bench-ha`: three coordinators on a three-member etcd, N protocol-level agents (real QUIC
//! and mutual TLS, no SSH) spread over them, each knowing all three. kill -9 the leader while
//! profiles are applied through another: the time to a new leader, the time until every agent
//! is linked again, how many acknowledged applies were lost (must be 0), and the push p99
//! (apply to the profile set reaching each agent) during the failover and after it. In the
//! same run, the same push on one coordinator on sled with the same agents: the price of etcd.
//! Ends with one JSON line (`agents`, `new_leader_s`, `all_relinked_s`, `push_p99_ms_etcd`,
//! `push_p99_ms_sled`, `acked_writes_lost`, …).
//!
//! Run: `cargo run --release -p integration-tests --bin bench-ha [-- --agents 1000]`
//! (needs `/usr/bin/etcd`: apt-get install etcd-server).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Semaphore, mpsc};
use tunnelfleet_coordinator::admin::Changed;
use tunnelfleet_ops::api::ApiClient;
use tunnelfleet_protocol::{ProfileSet, ProfileSpec};

type Pushes = mpsc::UnboundedReceiver<(usize, ProfileSet, Instant)>;

fn spec(name: &str, port: u16) -> ProfileSpec {
    let mut p = ProfileSpec::new(name, "vma", "/etc/tunnelfleet/id");
    p.endpoints = vec!["oma-a:443".into()];
    p.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
    p.forwards = vec![format!("L {port}:localhost:8082")];
    p
}

/// Applies `name` to every agent (by the bench's label) through `api`.
async fn assign_all(api: &ApiClient, name: &str) -> anyhow::Result<()> {
    let _: Changed = api
        .call(
            "PUT",
            &format!("/v1/profiles/{name}"),
            Some(&spec(name, 18082)),
        )
        .await?;
    let _: Changed = api
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({"profile": name, "labels": {"fleet": "bench"}})),
        )
        .await?;
    Ok(())
}

/// Changes profile `name` through `api` and waits until every agent got the version: the
/// p99 (ms) of apply-to-arrival over the agents, and the version.
async fn push_p99(
    api: &ApiClient,
    name: &str,
    port: u16,
    agents: usize,
    pushes: &mut Pushes,
    deadline: Duration,
) -> anyhow::Result<f64> {
    while pushes.try_recv().is_ok() {}
    let start = Instant::now();
    let changed: Changed = api
        .call(
            "PUT",
            &format!("/v1/profiles/{name}"),
            Some(&spec(name, port)),
        )
        .await?;
    let mut seen = BTreeSet::new();
    let mut lat = Vec::with_capacity(agents);
    while seen.len() < agents {
        let left = deadline.saturating_sub(start.elapsed());
        let Ok(Some((i, set, at))) = tokio::time::timeout(left, pushes.recv()).await else {
            bail!(
                "version {}: {} of {agents} agents got it within {deadline:?}",
                changed.version,
                seen.len()
            );
        };
        if set.version >= changed.version && seen.insert(i) {
            lat.push(at.saturating_duration_since(start).as_secs_f64() * 1000.0);
        }
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat[(lat.len() * 99 / 100).min(lat.len() - 1)])
}

/// Assigns the bench's profile to every agent, then changes it five times (through each of
/// `apis` in turn): the median of the five push p99s, after one to warm up.
async fn median_p99(
    apis: &[&ApiClient],
    agents: usize,
    pushes: &mut Pushes,
) -> anyhow::Result<f64> {
    assign_all(apis[0], "bench").await?;
    push_p99(
        apis[0],
        "bench",
        18083,
        agents,
        pushes,
        Duration::from_secs(60),
    )
    .await?;
    let mut runs = Vec::new();
    for k in 0..5u16 {
        let api = apis[usize::from(k) % apis.len()];
        runs.push(
            push_p99(
                api,
                "bench",
                18100 + k,
                agents,
                pushes,
                Duration::from_secs(60),
            )
            .await?,
        );
    }
    runs.sort_by(|a, b| a.total_cmp(b));
    Ok(runs[runs.len() / 2])
}

/// Spawns `n` simulated agents knowing `addrs`; returns their pushes and relinks.
fn spawn_fleet(
    configs: Vec<(String, quinn::ClientConfig)>,
    addrs: Vec<std::net::SocketAddr>,
) -> anyhow::Result<(Pushes, mpsc::UnboundedReceiver<()>)> {
    let endpoints = integration_tests::sim_endpoints(8)?;
    let (push_tx, pushes) = mpsc::unbounded_channel();
    let (up_tx, up_rx) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(Semaphore::new(256));
    for (i, (id, client)) in configs.into_iter().enumerate() {
        let hello = integration_tests::sim_hello(id, &[("fleet", "bench")]);
        integration_tests::spawn_sim_agent(
            i,
            hello,
            client,
            endpoints[i % endpoints.len()].clone(),
            addrs.clone(),
            Duration::from_secs(1),
            gate.clone(),
            up_tx.clone(),
            push_tx.clone(),
            integration_tests::SimReports::Nothing,
        );
    }
    Ok((pushes, up_rx))
}

/// Agents linked to coordinator `name`, as its API lists them.
async fn linked_to(api: &ApiClient, name: &str) -> usize {
    api.get::<Vec<serde_json::Value>>("/v1/agents")
        .await
        .map(|a| {
            a.iter()
                .filter(|x| x["connected"] == true && x["coordinator"] == name)
                .count()
        })
        .unwrap_or(0)
}

async fn leader(api: &ApiClient) -> Option<String> {
    let v: serde_json::Value = api.get("/v1/coordinators").await.ok()?;
    (v["standing"] == "leader").then(|| v["this"].as_str().map(str::to_string))?
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let [agents] = integration_tests::bench_options([("--agents", 1000)])?;
    let agents = agents as usize;
    if !std::path::Path::new(integration_tests::etcd::ETCD).exists() {
        bail!(
            "bench-ha needs {} (apt-get install etcd-server)",
            integration_tests::etcd::ETCD
        );
    }
    let bin = integration_tests::dist_binary("tunnelfleet-coordinator", "tunnelfleet-coordinator")?;
    let dir = tempfile::tempdir()?;

    // The baseline: one coordinator on sled, the same agents, the same push.
    let sled_p99 = {
        let d = dir.path().join("sled");
        let c = integration_tests::BenchCoordinator::start_binary(
            &bin,
            &d,
            "heartbeat_interval = \"1s\"\n",
        )
        .await?;
        eprintln!("bench-ha: {agents} agents on one coordinator on sled");
        let configs = c.issue_agents(agents, &d.join("agents"))?;
        let (mut pushes, mut up) = spawn_fleet(configs, vec![c.control])?;
        for _ in 0..agents {
            up.recv().await.context("agents gone")?;
        }
        median_p99(&[&c.api], agents, &mut pushes).await?
    };
    eprintln!("  sled: push p99 {sled_p99:.0} ms (median of 5)");

    // Three coordinators on three etcd members.
    let cluster = integration_tests::EtcdCluster::start(3).await;
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    let names = ["c1", "c2", "c3"];
    let dirs: Vec<_> = names.iter().map(|n| dir.path().join(n)).collect();
    integration_tests::share_pki(&dirs)?;
    let mut coords = Vec::new();
    for (n, d) in names.iter().zip(&dirs) {
        let extra = format!(
            "heartbeat_interval = \"1s\"\nname = \"{n}\"\nstore = \"etcd\"\n[etcd]\nendpoints = [{}]\nlease_ttl = \"3s\"\n",
            endpoints.join(", ")
        );
        coords.push(integration_tests::BenchCoordinator::start_binary(&bin, d, &extra).await?);
    }
    eprintln!("bench-ha: {agents} agents over three coordinators on etcd");
    let configs = coords[0].issue_agents(agents, &dir.path().join("agents"))?;
    let addrs: Vec<_> = coords.iter().map(|c| c.control).collect();
    let (mut pushes, mut up) = spawn_fleet(configs, addrs)?;
    for _ in 0..agents {
        up.recv().await.context("agents gone")?;
    }
    let apis: Vec<&ApiClient> = coords.iter().map(|c| &c.api).collect();
    let etcd_p99 = median_p99(&apis, agents, &mut pushes).await?;
    eprintln!("  etcd: push p99 {etcd_p99:.0} ms (median of 5)");

    // Who leads, and the agents on each.
    let mut lead = None;
    for (i, c) in coords.iter().enumerate() {
        if leader(&c.api).await.is_some() {
            lead = Some(i);
        }
    }
    let lead = lead.context("no leader")?;
    let survivor = (lead + 1) % 3;
    let on_leader = linked_to(&coords[lead].api, names[lead]).await;
    eprintln!("  {} leads with {on_leader} agents; kill -9", names[lead]);

    // A stream of applies through the survivor while the leader dies.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (api, acked, stop) = (coords[survivor].api.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.is_cancelled() {
                let name = format!("stream-{i}");
                let r: Result<Changed, _> = api
                    .call(
                        "PUT",
                        &format!("/v1/profiles/{name}"),
                        Some(&spec(&name, 19000)),
                    )
                    .await;
                if r.is_ok() {
                    acked.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    while up.try_recv().is_ok() {}
    let killed = Instant::now();
    coords[lead].kill9();
    // The push during the failover: through the survivor, at once.
    let during = push_p99(
        &coords[survivor].api,
        "bench",
        18200,
        agents,
        &mut pushes,
        Duration::from_secs(120),
    );
    let relinked = async {
        for _ in 0..on_leader {
            up.recv().await?;
        }
        Some(killed.elapsed())
    };
    let new_leader = async {
        loop {
            for (i, c) in coords.iter().enumerate() {
                if i != lead && leader(&c.api).await.is_some() {
                    return killed.elapsed();
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // The three at once: the push runs while the agents relink.
    let (during, new_leader, relinked) = tokio::join!(
        during,
        tokio::time::timeout(Duration::from_secs(60), new_leader),
        tokio::time::timeout(Duration::from_secs(120), relinked)
    );
    let new_leader = new_leader.context("no new leader within 60 s")?;
    let relinked = relinked
        .ok()
        .flatten()
        .context("agents not relinked within 120 s")?;
    let during = during?;
    let after = push_p99(
        &coords[survivor].api,
        "bench",
        18201,
        agents,
        &mut pushes,
        Duration::from_secs(60),
    )
    .await?;
    stop.cancel();
    writer.await?;
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let present: BTreeSet<String> = coords[survivor]
        .api
        .get::<Vec<ProfileSpec>>("/v1/profiles")
        .await?
        .into_iter()
        .map(|p| p.name)
        .collect();
    let lost = acked.iter().filter(|n| !present.contains(*n)).count();
    eprintln!(
        "  new leader after {:.2} s; the {on_leader} agents of the dead one relinked after {:.2} s",
        new_leader.as_secs_f64(),
        relinked.as_secs_f64()
    );
    eprintln!(
        "  push p99: {during:.0} ms during the failover, {after:.0} ms after (sled: {sled_p99:.0} ms); {} applies acknowledged during it, {lost} lost",
        acked.len()
    );
    eprintln!("  machine: {}", integration_tests::machine());
    println!(
        "{}",
        serde_json::json!({
            "agents": agents,
            "new_leader_s": (new_leader.as_secs_f64() * 100.0).round() / 100.0,
            "all_relinked_s": (relinked.as_secs_f64() * 100.0).round() / 100.0,
            "push_p99_ms_etcd": etcd_p99.round(),
            "push_p99_ms_sled": sled_p99.round(),
            "push_p99_ms_during_failover": during.round(),
            "push_p99_ms_after_failover": after.round(),
            "etcd_vs_sled": ((etcd_p99 / sled_p99.max(1.0)) * 100.0).round() / 100.0,
            "acked_writes": acked.len(),
            "acked_writes_lost": lost,
            "agents_on_dead_leader": on_leader,
        })
    );
    Ok(())
}
