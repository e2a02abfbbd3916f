//! `bench-chaos`: a field day of random faults, with nothing lost.
//!
//! Three coordinators (the `dist` build) on three real etcd members; 500 simulated agents (real
//! QUIC and mutual TLS, reporting their pushed profiles as real agents do) spread over them; and
//! three real agents (the `dist` agent binary), each in an appliance host of its own (a network
//! namespace with its own links to every OMA), running the seed's profile — `L 8082` to the
//! OMA's API, `L 10809` and `L 10808` to its NBD service, `R 908x` back to the appliance's API —
//! on two OMA groups of two hosts each (network namespaces, real sshd with the OMA drop-in, the
//! API and NBD on each host's own `localhost`). Everything with the README's defaults (health
//! every 10 s, threshold 3, keepalive 5 s × 3, probes 1 s × 3, heartbeats every 5 s), except
//! the groups' failback after 60 s instead of 5 min, so a healed OMA gets its fleet back within
//! the run.
//!
//! One fault at a time, chosen at random, held 10–30 s, then healed, then 5–15 s of calm:
//! - `blackhole`: a group's active OMA host drops every packet (nftables);
//! - `freeze`: its sshd and every session child SIGSTOPped;
//! - `api_down`: its API answers 503 while its sshd answers;
//! - `partition`: one appliance's own link to its active OMA cut (the rest of the world still
//!   reaches that OMA);
//! - `coordinator_kill`: a coordinator killed -9 (the leader too, when it is the one drawn),
//!   restarted after the hold;
//! - `etcd_kill`: an etcd member killed -9, restarted after the hold.
//!
//! All along: an admin write every 5 s through the next coordinator in turn (ten profiles
//! changed over and over, each write with a higher port: the last acknowledged write of each
//! must be there at the end, or a later one), and a staged rollout of the simulated agents'
//! profile every three minutes (canary 5, two waves).
//!
//! Invariants, checked as it runs and printed at the end (each must be 0):
//! - `acked_writes_lost`: acknowledged writes missing at the end;
//! - `alerts_unresolved`: alerts that fired and were not resolved once every fault had healed
//!   (two minutes of calm at the end);
//! - `faults_without_alert`: OMA faults (blackhole, freeze, API down) with agents on the OMA
//!   and no alert naming it at the webhook;
//! - `duplicate_incidents`: a second alert of the same kind and subject within one fault (from
//!   its start to 30 s after its heal or the next fault's start);
//! - `agents_not_up_40s`: real agents without every forward carrying data 40 s after a fault
//!   healed;
//!
//! and `coordinator_rss_growth_pct` (with `coordinator_links_at_5` / `_at_end`: the agents
//! linked to it then, which change as killed coordinators' agents relink and are handed back)
//! / `agent_rss_growth_pct` (from minute 5 to the end of the two minutes of calm, of the
//! processes that lived through it: one coordinator is never killed), `failover_p99_s` per
//! fault kind (from the fault to every affected appliance's forwards carrying data again).
//!
//! `--minutes N` (default 30), `--agents N` (default 500), `--seed N`. Needs root (network
//! namespaces) and etcd. Ends with one JSON line. Run:
//! `cargo run --release -p integration-tests --bin bench-chaos -- --minutes 30`.

use integration_tests::SpawnOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use integration_tests::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tunnelfleet_coordinator::admin::Changed;
use tunnelfleet_coordinator::rollout::{Canary, StartRequest};
use tunnelfleet_coordinator::store::OmaGroup;
use tunnelfleet_ops::api::ApiClient;
use tunnelfleet_protocol::ProfileSpec;

mod checks;
mod hosts;
mod writes;
use checks::*;
use hosts::*;
use writes::*;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let [minutes, sims, seed] =
        bench_options([("--minutes", 30), ("--agents", 500), ("--seed", 0)])?;
    if !NetHost::available("bench-chaos") {
        bail!("bench-chaos needs root, iproute2, nftables, python3 and openssh-server");
    }
    if !Path::new(etcd::ETCD).exists() {
        bail!(
            "bench-chaos needs {} (apt-get install etcd-server)",
            etcd::ETCD
        );
    }
    let seed = if seed == 0 { now_ms() } else { seed };
    let mut rng = StdRng::seed_from_u64(seed);
    let coord_bin = dist_binary("tunnelfleet-coordinator", "tunnelfleet-coordinator")?;
    let agent_bin = dist_binary("tunnelfleet-agent", "tunnelfleet-agent")?;
    let dir = tempfile::tempdir()?;
    eprintln!("bench-chaos: {minutes} minutes, seed {seed}, {sims} simulated agents");

    // Two OMA groups of two hosts each.
    let drop_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/oma/tunnelfleet.conf");
    let include = format!("Include {}\n", drop_in.display());
    let mut omas: Vec<Oma> = Vec::new();
    for _ in 0..4 {
        let host = NetHost::create();
        let mut sshd = match omas.first() {
            None => Sshd::start_in(&host),
            Some(first) => Sshd::start_sharing_client_key_in(&first.sshd, &host),
        };
        sshd.restart_with(&include);
        let api = NsHttp::start_on(&host, &format!("{} api", host.name), API);
        let nbd = NsHttp::start_on(&host, &format!("{} nbd", host.name), NBD);
        let prober = Prober::start(&host, &[9081, 9082, 9083])?;
        omas.push(Oma {
            host,
            sshd,
            api,
            _nbd: nbd,
            prober,
        });
    }
    let groups = [("g1", [0usize, 1]), ("g2", [2, 3])];
    let fingerprints: Vec<String> = omas.iter().map(|o| o.sshd.fingerprint.clone()).collect();

    // etcd and the coordinators.
    let mut cluster = EtcdCluster::start(3).await;
    let etcd_endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    let sink = WebhookSink::start(0).await?;
    let secret = dir.path().join("webhook.secret");
    write_secret(&secret, b"bench-chaos webhook secret");
    let names = ["c1", "c2", "c3"];
    let dirs: Vec<PathBuf> = names.iter().map(|n| dir.path().join(n)).collect();
    share_pki(&dirs)?;
    let mut coords = Vec::new();
    for (n, d) in names.iter().zip(&dirs) {
        let extra = format!(
            "name = \"{n}\"\nstore = \"etcd\"\n[etcd]\nendpoints = [{}]\n\n[[hook]]\nname = \"bench\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{}/alerts\"\nsecret_file = \"{}\"\n",
            etcd_endpoints.join(", "),
            sink.port,
            secret.display()
        );
        coords.push(
            BenchCoordinator::start_binary_on(&coord_bin, d, &extra, [0, 0, 0, 0].into()).await?,
        );
    }
    let apis: Vec<ApiClient> = coords.iter().map(|c| c.api.clone()).collect();
    for (name, members) in &groups {
        let g = OmaGroup::probed(
            name,
            members.iter().map(|&i| omas[i].sshd.endpoint()).collect(),
            Duration::from_secs(1),
            Duration::from_millis(800),
            Duration::from_secs(60),
        );
        let _: Changed = apis[0]
            .call("PUT", &format!("/v1/groups/{name}"), Some(&g))
            .await?;
    }

    // Three appliances, each in a host of its own with a link to every OMA.
    let mut apps: Vec<Appliance> = Vec::new();
    for (i, group) in [0usize, 0, 1].into_iter().enumerate() {
        let id = format!("vma-{}", i + 1);
        let host = NetHost::create();
        let links: Vec<String> = omas.iter().map(|o| host.link_to(&o.host)).collect();
        let api = NsHttp::start_on(&host, &format!("{} api", host.name), 8081);
        let files = tunnelfleet_coordinator::pki::issue_agent(
            &dirs[0].join("pki"),
            &id,
            1,
            &dir.path().join(&id),
        )?;
        let addrs: Vec<String> = coords
            .iter()
            .map(|c| format!("\"{}:{}\"", host.peer, c.control.port()))
            .collect();
        let section = format!(
            "[coordinator]\naddress = [{}]\nserver_name = \"localhost\"\nagent_id = \"{id}\"\nlabels = {{ site = \"chaos\" }}\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\n",
            addrs.join(", "),
            files.ca.display(),
            files.cert.display(),
            files.key.display(),
            dir.path().join(&id).join("state").display()
        );
        // The agent logs in with the OMAs' shared test key.
        let spec = seed_profile(
            &id,
            groups[group].0,
            9081 + i as u16,
            &omas[0].sshd,
            &fingerprints,
        );
        let _: Changed = apis[0]
            .call("PUT", &format!("/v1/profiles/{id}"), Some(&spec))
            .await?;
        let _: Changed = apis[0]
            .call(
                "POST",
                "/v1/assignments",
                Some(&serde_json::json!({"profile": id, "agent": id})),
            )
            .await?;
        let agent = TestAgent::start_binary_in(&host, &agent_bin, "", &section).await;
        let prober = Prober::start(&host, &[API, NBD, 10808])?;
        apps.push(Appliance {
            id,
            prober,
            host,
            agent,
            links,
            _api: api,
        });
    }

    // The simulated agents, over the three coordinators.
    let _: Changed = apis[0]
        .call(
            "PUT",
            "/v1/profiles/chaos-sim",
            Some(&sim_profile("chaos-sim", 18000)),
        )
        .await?;
    let _: Changed = apis[0]
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({"profile": "chaos-sim", "labels": {"fleet": "chaos"}})),
        )
        .await?;
    let configs = coords[0].issue_agents(sims as usize, &dir.path().join("sims"))?;
    let endpoints = sim_endpoints(8)?;
    let (push_tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let (up_tx, mut up) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (fail_tx, mut fails) = tokio::sync::mpsc::unbounded_channel();
    let gate = Arc::new(tokio::sync::Semaphore::new(128));
    let addrs: Vec<std::net::SocketAddr> = coords
        .iter()
        .map(|c| ([127, 0, 0, 1], c.control.port()).into())
        .collect();
    for (i, (id, client)) in configs.into_iter().enumerate() {
        let hello = sim_hello(id, &[("fleet", "chaos")]);
        spawn_sim_agent(
            i,
            hello,
            client,
            endpoints[i % endpoints.len()].clone(),
            addrs.clone(),
            Duration::from_secs(5),
            gate.clone(),
            up_tx.clone(),
            push_tx.clone(),
            SimReports::Profiles(fail_tx.clone()),
        );
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(_) = pushes.recv() => {}
                Some(_) = up.recv() => {}
                Some(_) = fails.recv() => {}
                else => return,
            }
        }
    });

    let started = Instant::now();
    let limit = Duration::from_secs(120);
    let t = Instant::now();
    while all_up(&apps, &omas).iter().any(Option::is_none) {
        if t.elapsed() > limit {
            bail!("the appliances' forwards not up within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "  every appliance's four forwards carry data after {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Writes and rollouts, all along.
    let acked = Arc::new(Mutex::new(Vec::<(u32, u16)>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(writes_and_rollouts(
        apis.clone(),
        acked.clone(),
        stop.clone(),
    ));

    // RSS: one coordinator never killed; the agents all along.
    let witness = rng.random_range(0..3usize);
    let agent_pids: Vec<u32> = apps.iter().filter_map(|a| a.agent.pid()).collect();
    let mut rss_at_5: Option<(u64, u64)> = None;
    let mut links_at_5 = 0usize;
    let sample = |coords: &[BenchCoordinator]| -> (u64, u64) {
        let c = rss_kb(coords[witness].pid).unwrap_or(0);
        let a: u64 = agent_pids.iter().filter_map(|&p| rss_kb(p)).sum();
        (c, a)
    };

    let deadline = started + Duration::from_secs(minutes * 60);
    let mut faults: Vec<Fault> = Vec::new();
    let mut times: BTreeMap<Kind, Vec<f64>> = BTreeMap::new();
    let mut not_up_40s = 0u32;
    while Instant::now() < deadline {
        let (c_kb, a_kb) = sample(&coords);
        let linked = links(&coords[witness]).await;
        eprintln!(
            "  RSS at {} s: coordinator (pid {}, {linked} agents linked) {c_kb} kB, agents {a_kb} kB",
            started.elapsed().as_secs(),
            coords[witness].pid
        );
        if rss_at_5.is_none() && started.elapsed() >= Duration::from_secs(300) {
            rss_at_5 = Some((c_kb, a_kb));
            links_at_5 = linked;
        }
        let kind = Kind::ALL[rng.random_range(0..Kind::ALL.len())];
        let hold = Duration::from_secs(rng.random_range(10..=30));
        let g = rng.random_range(0..groups.len());
        let (gname, members) = groups[g];
        let on = active(&apis, gname).await;
        let target_oma = members
            .iter()
            .copied()
            .find(|&i| Some(omas[i].sshd.endpoint()) == on)
            .unwrap_or(members[0]);
        let before = all_up(&apps, &omas);
        let affected: Vec<usize> = (0..apps.len())
            .filter(|&a| before[a] == Some(target_oma))
            .collect();
        let start_ms = now_ms();
        let t0 = Instant::now();
        let mut fault = Fault {
            kind,
            target: String::new(),
            endpoint: None,
            affected: Vec::new(),
            start_ms,
            healed_ms: 0,
        };
        let mut frozen = Vec::new();
        match kind {
            Kind::Blackhole => omas[target_oma].host.blackhole(),
            Kind::Freeze => frozen = omas[target_oma].sshd.freeze(),
            Kind::ApiDown => omas[target_oma].api.set_failing(true),
            Kind::Partition => {
                // One appliance on that OMA, cut off from it alone.
                let victims: Vec<usize> = affected.clone();
                if let Some(&a) = victims.get(rng.random_range(0..victims.len().max(1))) {
                    omas[target_oma].host.cut(&apps[a].links[target_oma]);
                    fault.target = format!("{} from {}", apps[a].id, omas[target_oma].host.name);
                    fault.affected = vec![a];
                }
            }
            Kind::CoordinatorKill => {
                let mut victim = rng.random_range(0..2usize);
                if victim >= witness {
                    victim += 1;
                }
                coords[victim].kill9();
                fault.target = names[victim].to_string();
            }
            Kind::EtcdKill => {
                let m = rng.random_range(0..3usize);
                cluster.kill(m);
                fault.target = format!("etcd member {m}");
            }
        }
        if matches!(kind, Kind::Blackhole | Kind::Freeze | Kind::ApiDown) {
            fault.target = omas[target_oma].host.name.clone();
            fault.endpoint = Some(omas[target_oma].sshd.endpoint());
            fault.affected = affected.clone();
        }
        eprintln!(
            "  {:>5.0} s: {} {} (hold {} s; appliances on it: {:?})",
            started.elapsed().as_secs_f64(),
            kind.name(),
            fault.target,
            hold.as_secs(),
            fault
                .affected
                .iter()
                .map(|&a| apps[a].id.as_str())
                .collect::<Vec<_>>()
        );
        // Until the hold ends: when every affected appliance carries data elsewhere.
        let mut moved: Option<f64> = None;
        let watch_move = matches!(
            kind,
            Kind::Blackhole | Kind::Freeze | Kind::ApiDown | Kind::Partition
        ) && !fault.affected.is_empty();
        while t0.elapsed() < hold
            || (watch_move && moved.is_none() && t0.elapsed() < hold + Duration::from_secs(60))
        {
            if watch_move && moved.is_none() {
                let now = all_up(&apps, &omas);
                if fault
                    .affected
                    .iter()
                    .all(|&a| now[a].is_some_and(|o| o != target_oma))
                {
                    moved = Some(t0.elapsed().as_secs_f64());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if watch_move {
            match moved {
                Some(s) => {
                    eprintln!("         affected appliances on another OMA after {s:.2} s");
                    times.entry(kind).or_default().push(s);
                }
                None => {
                    eprintln!(
                        "         affected appliances NOT on another OMA within the hold + 60 s"
                    );
                    times.entry(kind).or_default().push(f64::INFINITY);
                }
            }
        }
        // Heal.
        match kind {
            Kind::Blackhole => omas[target_oma].host.restore(),
            // Cut only when an appliance was on that OMA to cut off.
            Kind::Partition if !fault.affected.is_empty() => omas[target_oma].host.restore(),
            Kind::Partition => {}
            Kind::Freeze => Sshd::thaw(&frozen),
            Kind::ApiDown => omas[target_oma].api.set_failing(false),
            Kind::CoordinatorKill => {
                let victim = names
                    .iter()
                    .position(|n| *n == fault.target)
                    .context("victim")?;
                coords[victim].restart().await?;
            }
            Kind::EtcdKill => {
                let m: usize = fault
                    .target
                    .trim_start_matches("etcd member ")
                    .parse()
                    .unwrap_or(0);
                cluster.restart(m);
            }
        }
        fault.healed_ms = now_ms();
        let healed = Instant::now();
        let mut up_after = None;
        while healed.elapsed() < Duration::from_secs(120) {
            if all_up(&apps, &omas).iter().all(Option::is_some) {
                up_after = Some(healed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match up_after {
            Some(d) if d <= Duration::from_secs(40) => {}
            other => {
                not_up_40s += 1;
                eprintln!("         NOT every forward up 40 s after the heal ({other:?})");
            }
        }
        faults.push(fault);
        tokio::time::sleep(Duration::from_secs(rng.random_range(5..=15))).await;
    }
    stop.cancel();
    let (writes, rollouts, halted) = writer.await.unwrap_or((0, 0, 0));

    // Calm: every alert of the day resolves.
    eprintln!("bench-chaos: faults over; two minutes of calm for every alert to resolve");
    let calm = Instant::now();
    let unresolved = loop {
        let all = deliveries(&sink);
        let fired: BTreeSet<u64> = all.iter().filter(|d| d.firing).map(|d| d.id).collect();
        let resolved: BTreeSet<u64> = all.iter().filter(|d| !d.firing).map(|d| d.id).collect();
        let open: Vec<u64> = fired.difference(&resolved).copied().collect();
        if open.is_empty() || calm.elapsed() > Duration::from_secs(120) {
            break open;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let all = deliveries(&sink);
    for id in &unresolved {
        if let Some(d) = all.iter().find(|d| d.id == *id) {
            eprintln!(
                "  unresolved: #{id} {} {}: {}",
                d.kind, d.subject, d.summary
            );
        }
    }

    // RSS at the end: after the full two minutes of calm, the hand-over settled (a coordinator
    // killed near the end has its agents back, as at minute 5 after the first one), so that
    // minute 5 and the end compare the same load.
    tokio::time::sleep_until((calm + Duration::from_secs(120)).into()).await;
    let end_sample = sample(&coords);
    let links_at_end = links(&coords[witness]).await;
    eprintln!(
        "  RSS at the end: coordinator ({links_at_end} agents linked) {} kB, agents {} kB",
        end_sample.0, end_sample.1
    );

    // Acknowledged writes: each profile's last acknowledged port, or a later one.
    let mut now_held: Option<BTreeMap<String, u16>> = None;
    for api in &apis {
        if let Ok(v) = api.get::<Vec<ProfileSpec>>("/v1/profiles").await {
            now_held = Some(
                v.into_iter()
                    .filter_map(|p| match p.forward_specs().ok()?.first()? {
                        tunnelfleet_protocol::forward::ForwardSpec::Local { port, .. } => {
                            Some((p.name, *port))
                        }
                        _ => None,
                    })
                    .collect(),
            );
            break;
        }
    }
    let now_held = now_held.context("no coordinator answers /v1/profiles")?;
    let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let lost = lost_writes(&acked, &now_held);

    let (without_alert, duplicates) = alerts_per_fault(&faults, &all);

    let growth = |at5: u64, end: u64| -> Option<f64> {
        (at5 > 0).then(|| (end as f64 - at5 as f64) * 100.0 / at5 as f64)
    };
    let (c5, a5) = rss_at_5.unwrap_or((0, 0));
    let coord_growth = growth(c5, end_sample.0);
    let agent_growth = growth(a5, end_sample.1);
    let fmt = |v: Option<f64>| {
        v.map_or("null".to_string(), |v| {
            if v.is_finite() {
                format!("{v:.2}")
            } else {
                "null".to_string()
            }
        })
    };
    let mut p99s = Vec::new();
    for k in [
        Kind::Blackhole,
        Kind::Freeze,
        Kind::ApiDown,
        Kind::Partition,
    ] {
        let v = times.get(&k).cloned().unwrap_or_default();
        p99s.push(format!("\"{}\":{}", k.name(), fmt(p99(&v))));
    }
    let counts: BTreeMap<&str, usize> = faults.iter().fold(BTreeMap::new(), |mut m, f| {
        *m.entry(f.kind.name()).or_default() += 1;
        m
    });
    let never_moved: usize = times.values().flatten().filter(|t| !t.is_finite()).count();
    eprintln!(
        "bench-chaos: {} faults {counts:?}; {writes} writes, {} acknowledged, {lost} lost; {rollouts} rollouts, {halted} halted (aborted); {} alerts unresolved, {without_alert} faults without an alert, {duplicates} duplicate incidents, {not_up_40s} times not up within 40 s of a heal, {never_moved} faults whose appliances never moved; RSS growth from minute 5: coordinator {} % ({links_at_5} agents linked to it at minute 5, {links_at_end} at the end), agents {} %",
        faults.len(),
        acked.len(),
        unresolved.len(),
        fmt(coord_growth),
        fmt(agent_growth),
    );
    println!(
        "{{\"minutes\":{minutes},\"seed\":{seed},\"simulated_agents\":{sims},\"real_agents\":{},\"faults\":{},\"acked_writes\":{},\"acked_writes_lost\":{lost},\"rollouts\":{rollouts},\"rollouts_halted\":{halted},\"alerts_unresolved\":{},\"faults_without_alert\":{without_alert},\"duplicate_incidents\":{duplicates},\"agents_not_up_40s\":{not_up_40s},\"failovers_not_done\":{never_moved},\"coordinator_rss_growth_pct\":{},\"coordinator_links_at_5\":{links_at_5},\"coordinator_links_at_end\":{links_at_end},\"agent_rss_growth_pct\":{},\"failover_p99_s\":{{{}}}}}",
        apps.len(),
        faults.len(),
        acked.len(),
        unresolved.len(),
        fmt(coord_growth),
        fmt(agent_growth),
        p99s.join(",")
    );
    for a in apps {
        a.agent.shutdown().await;
    }
    drop(coords);
    Ok(())
}
