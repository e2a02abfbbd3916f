//! The admin's writes and staged rollouts, all along.

use super::*;

/// What the simulated agents run (an endpoint in no group: their reports judge no OMA).
pub(crate) fn sim_profile(name: &str, port: u16) -> ProfileSpec {
    let mut p = ProfileSpec::new(name, "vma", "/etc/tunnelfleet/id");
    p.endpoints = vec!["sim-oma.example:443".into()];
    p.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
    p.forwards = vec![format!("L {port}:localhost:8082")];
    p
}

/// Aborts the current rollout if it halted (what an operator does): asked of each coordinator
/// in turn until one takes it (only the leader does: a follower says so); true if one did.
pub(crate) async fn abort_halted(apis: &[ApiClient]) -> bool {
    let mut current = None;
    for api in apis {
        if let Ok(v) = api.get::<serde_json::Value>("/v1/rollouts/current").await {
            current = Some(v);
            break;
        }
    }
    let Some(v) = current.filter(|v| v["state"] == "halted") else {
        return false;
    };
    let mut said = Vec::new();
    for api in apis {
        let r: Result<serde_json::Value, _> = api
            .call::<(), _>("POST", "/v1/rollouts/current/abort", None)
            .await;
        match r {
            Ok(_) => {
                eprintln!(
                    "  rollout {} halted ({}); aborted",
                    v["version"], v["reasons"]
                );
                return true;
            }
            Err(e) => said.push(e.to_string()),
        }
    }
    eprintln!(
        "  rollout {} halted ({}); not aborted: {}",
        v["version"],
        v["reasons"],
        said.join("; ")
    );
    false
}

/// Profiles the admin writes go to, over and over.
pub(crate) const WRITTEN: u32 = 10;

/// The port of write `i`: higher with every write, so a profile's final port tells which
/// write it holds.
pub(crate) fn write_port(i: u32) -> u16 {
    20_000 + i.min(40_000) as u16
}

/// Admin writes every 5 s through the next coordinator in turn (each acknowledged one recorded
/// in `acked`), and a staged rollout every three minutes, until `stop`; returns the writes
/// made, the rollouts started and those that halted (aborted, as an operator would).
pub(crate) async fn writes_and_rollouts(
    apis: Vec<ApiClient>,
    acked: Arc<Mutex<Vec<(u32, u16)>>>,
    stop: tokio_util::sync::CancellationToken,
) -> (u32, u32, u32) {
    let mut i = 0u32;
    let mut rollouts = 0u32;
    let mut halted = 0u32;
    let mut refused: Vec<String> = Vec::new();
    let mut last_rollout = Instant::now();
    while !stop.is_cancelled() {
        let api = &apis[i as usize % apis.len()];
        let name = format!("chaos-w{}", i % WRITTEN);
        let port = write_port(i);
        let r: Result<Changed, _> = api
            .call(
                "PUT",
                &format!("/v1/profiles/{name}"),
                Some(&sim_profile(&name, port)),
            )
            .await;
        match r {
            Ok(_) => acked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((i % WRITTEN, port)),
            Err(e) => refused.push(e.to_string()),
        }
        i += 1;
        if last_rollout.elapsed() >= Duration::from_secs(180) {
            last_rollout = Instant::now();
            rollouts += 1;
            // A rollout that halted (a canary on a coordinator killed meanwhile, say)
            // is what an operator aborts before the next one.
            if abort_halted(&apis).await {
                halted += 1;
            }
            let req = StartRequest {
                profiles: vec![sim_profile("chaos-sim", 18000 + (rollouts % 100) as u16)],
                canary: Canary::Count(5),
                waves: 2,
                wait_ms: 2_000,
                settle_ms: 30_000,
            };
            // Started where it is taken: the leader (a follower that stopped leading
            // says so), as an operator retries on another coordinator.
            let mut said = Vec::new();
            for api in &apis {
                let r: Result<serde_json::Value, _> =
                    api.call("POST", "/v1/rollouts", Some(&req)).await;
                match r {
                    Ok(_) => {
                        said.push("started".to_string());
                        break;
                    }
                    Err(e) => said.push(format!("not started: {e}")),
                }
            }
            eprintln!("  rollout {rollouts}: {}", said.join("; "));
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    if abort_halted(&apis).await {
        halted += 1;
    }
    // Refusals happen while a coordinator or an etcd member is down: how many, and
    // the first few, for the record.
    eprintln!(
        "  writes refused: {}{}",
        refused.len(),
        refused
            .iter()
            .take(3)
            .map(|e| format!("; {e}"))
            .collect::<String>()
    );
    (i, rollouts, halted)
}
