//! `bench-rollout`: a staged rollout over N protocol-level agents (real QUIC and mutual TLS, no
//! SSH; each reports its pushed profiles in its heartbeats as a real agent does) against one
//! `tunnelfleet-coordinator` process.
//!
//! In the same run: the competitor, the change pushed to every agent at once (`profiles apply`
//! without `--canary`, what every other tool does), timed until every agent acknowledged it;
//! then the same kind of change staged as canary 5 + 3 waves with a short wait, timed from the
//! apply to every agent running it, with pushes per second and the coordinator's peak RSS; the
//! ratio of the two is the price of the safety. Then the halt: a change to a wrong OMA port,
//! staged the same way; the time from the first canary reporting the failure to every canary
//! back on the previous version. Ends with one JSON line (`agents`, `rollout_total_s`,
//! `halt_to_rollback_ms`, …).
//!
//! Run: `cargo run --release -p integration-tests --bin bench-rollout [-- --agents 1000] [--wait-ms 1000]`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Semaphore, mpsc};
use tunnelfleet_coordinator::admin::RolloutView;
use tunnelfleet_coordinator::rollout::{Canary, StartRequest};
use tunnelfleet_coordinator::store::RolloutState;
use tunnelfleet_ops::api::ApiClient;
use tunnelfleet_protocol::{Hello, PROTOCOL_VERSION, ProfileSet};

type Pushes = mpsc::UnboundedReceiver<(usize, ProfileSet, Instant)>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let [agents, wait_ms] =
        integration_tests::bench_options([("--agents", 1000), ("--wait-ms", 1000)])?;
    let agents = agents as usize;
    let dir = tempfile::tempdir()?;
    let c = integration_tests::BenchCoordinator::start(dir.path(), "heartbeat_interval = \"1s\"\n")
        .await?;
    eprintln!("bench-rollout: issuing {agents} agent certificates");
    let configs = c.issue_agents(agents, &dir.path().join("agents"))?;
    let endpoints = integration_tests::sim_endpoints(8)?;
    let (push_tx, mut pushes) = mpsc::unbounded_channel();
    let (fail_tx, mut failures) = mpsc::unbounded_channel();
    let (up_tx, mut up_rx) = mpsc::unbounded_channel::<()>();
    let gate = Arc::new(Semaphore::new(256));
    for (i, (id, client)) in configs.into_iter().enumerate() {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            agent_id: id,
            agent_version: "bench".into(),
            // Five sites: the canaries are spread over them.
            labels: [
                ("site".to_string(), format!("dc{}", i % 5)),
                ("fleet".to_string(), "bench".to_string()),
            ]
            .into(),
            applied_version: None,
            started_unix_ms: 1,
        };
        integration_tests::spawn_sim_agent(
            i,
            hello,
            client,
            endpoints[i % endpoints.len()].clone(),
            vec![c.control],
            Duration::from_secs(1),
            gate.clone(),
            up_tx.clone(),
            push_tx.clone(),
            integration_tests::SimReports::Profiles(fail_tx.clone()),
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
            bail!("only {n} of {agents} agents connected");
        }
    }
    eprintln!("  {agents} agents connected");

    // Version 1 everywhere, then the competitor: a change pushed to all at once.
    let profile = |port: u16, fw: u16| {
        let mut p = integration_tests::profile_spec("oma", &[&format!("L {fw}:localhost:8082")]);
        p.endpoints = vec![format!("oma-a:{port}"), format!("oma-b:{port}")];
        p
    };
    let _: serde_json::Value = c
        .api
        .call("PUT", "/v1/profiles/oma", Some(&profile(443, 8082)))
        .await?;
    let v: serde_json::Value = c
        .api
        .call(
            "POST",
            "/v1/assignments",
            Some(&serde_json::json!({ "profile": "oma", "labels": { "fleet": "bench" } })),
        )
        .await?;
    all_running(
        &mut pushes,
        agents,
        v["version"].as_u64().context("version")?,
    )
    .await?;
    let t = Instant::now();
    let v: serde_json::Value = c
        .api
        .call("PUT", "/v1/profiles/oma", Some(&profile(443, 8083)))
        .await?;
    all_running(
        &mut pushes,
        agents,
        v["version"].as_u64().context("version")?,
    )
    .await?;
    let at_once_s = t.elapsed().as_secs_f64();
    eprintln!("  at once (no staging): every agent has it in {at_once_s:.2}s");

    // Staged: canary 5 + 3 waves, each waited on.
    let staged = |port, fw| StartRequest {
        profiles: vec![profile(port, fw)],
        canary: Canary::Count(5),
        waves: 3,
        wait_ms,
        settle_ms: 30_000,
    };
    while pushes.try_recv().is_ok() {}
    let t = Instant::now();
    let r: tunnelfleet_coordinator::store::Rollout = c
        .api
        .call("POST", "/v1/rollouts", Some(&staged(443, 8084)))
        .await?;
    let done = wait_state(&c.api, RolloutState::Done, 120).await?;
    let rollout_total_s = t.elapsed().as_secs_f64();
    let mut received = 0usize;
    let mut last = BTreeSet::new();
    while let Ok((i, set, _)) = pushes.try_recv() {
        received += 1;
        if set
            .profiles
            .iter()
            .any(|p| p.forwards[0].starts_with("L 8084"))
        {
            last.insert(i);
        }
    }
    if last.len() != agents {
        bail!("{} of {agents} agents run the staged version", last.len());
    }
    let pushes_per_s = received as f64 / rollout_total_s;
    let rss = integration_tests::status_kb(c.pid, "VmHWM")?;
    eprintln!(
        "  staged (version {}, {} stages, {wait_ms} ms wait each): every agent has it in {rollout_total_s:.2}s ({:.1}x the push at once); {received} pushes ({pushes_per_s:.0}/s); coordinator peak RSS {rss} kB",
        r.version,
        done.rollout.stages.len(),
        rollout_total_s / at_once_s
    );

    // The halt: a wrong OMA port; the canaries fail, get the previous version back.
    while failures.try_recv().is_ok() {}
    while pushes.try_recv().is_ok() {}
    let bad: tunnelfleet_coordinator::store::Rollout = c
        .api
        .call("POST", "/v1/rollouts", Some(&staged(1, 8084)))
        .await?;
    let canaries: BTreeSet<usize> = bad.stages[0]
        .agents
        .iter()
        .map(|a| a[1..].parse().context("agent id"))
        .collect::<anyhow::Result<_>>()?;
    let halted = wait_state(&c.api, RolloutState::Halted, 60).await?;
    let (_, first_failure) = tokio::time::timeout(Duration::from_secs(10), failures.recv())
        .await?
        .context("no failure reported")?;
    // Every canary back on the previous version (port 443) after the bad one (port 1).
    let mut back = BTreeSet::new();
    let mut last_back = first_failure;
    let deadline = Instant::now() + Duration::from_secs(30);
    while back.len() < canaries.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some((i, set, at))) = tokio::time::timeout(left, pushes.recv()).await else {
            bail!(
                "only {} of {} canaries got the previous version back",
                back.len(),
                canaries.len()
            );
        };
        if canaries.contains(&i)
            && set
                .profiles
                .iter()
                .all(|p| p.endpoints[0].ends_with(":443"))
        {
            back.insert(i);
            last_back = last_back.max(at);
        }
    }
    let halt_to_rollback_ms = last_back
        .saturating_duration_since(first_failure)
        .as_secs_f64()
        * 1000.0;
    let others_touched = {
        let mut n = 0;
        while let Ok((i, set, _)) = pushes.try_recv() {
            if !canaries.contains(&i) && set.profiles.iter().any(|p| p.endpoints[0].ends_with(":1"))
            {
                n += 1;
            }
        }
        n
    };
    eprintln!(
        "  halt: {} canaries failed ({}); all back on the previous version {halt_to_rollback_ms:.0} ms after the first failure; agents beyond the canaries given the bad version: {others_touched}",
        halted.rollout.reasons.len(),
        halted
            .rollout
            .reasons
            .values()
            .next()
            .map(String::as_str)
            .unwrap_or("")
    );
    let _: serde_json::Value = c
        .api
        .call::<(), _>("POST", "/v1/rollouts/current/abort", None)
        .await?;
    println!(
        "{{\"agents\":{agents},\"rollout_total_s\":{rollout_total_s:.2},\"halt_to_rollback_ms\":{halt_to_rollback_ms:.0},\"at_once_s\":{at_once_s:.2},\"staged_vs_at_once\":{:.2},\"pushes_per_s\":{pushes_per_s:.0},\"coordinator_rss_kb\":{rss},\"stages\":{},\"wait_ms\":{wait_ms},\"others_given_bad\":{others_touched}}}",
        rollout_total_s / at_once_s,
        done.rollout.stages.len()
    );
    Ok(())
}

/// Waits until every one of `agents` received `version` (or later).
async fn all_running(pushes: &mut Pushes, agents: usize, version: u64) -> anyhow::Result<()> {
    let mut have = BTreeSet::new();
    while have.len() < agents {
        match tokio::time::timeout(Duration::from_secs(60), pushes.recv()).await {
            Ok(Some((i, set, _))) if set.version >= version => {
                have.insert(i);
            }
            Ok(Some(_)) => {}
            _ => bail!(
                "only {} of {agents} agents received version {version}",
                have.len()
            ),
        }
    }
    Ok(())
}

/// Polls the staged rollout until it is in `state`.
async fn wait_state(
    api: &ApiClient,
    state: RolloutState,
    secs: u64,
) -> anyhow::Result<RolloutView> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v: Option<RolloutView> = api.get("/v1/rollouts/current").await?;
        match v {
            Some(v) if v.rollout.state == state => return Ok(v),
            Some(v) if Instant::now() > deadline => {
                bail!(
                    "the rollout is {:?} after {secs}s, not {state:?}: {:?}",
                    v.rollout.state,
                    v.rollout.reasons
                )
            }
            None if Instant::now() > deadline => bail!("no rollout after {secs}s"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}
