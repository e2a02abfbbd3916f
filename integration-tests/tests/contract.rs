//! Contracts between the two crates' rules: what the agent's real producer emits is fed, as the
//! heartbeat carries it, to the coordinator's real consumer. A rule tested only with values the
//! other side never sends (the `consecutive_failures` of 3 that the agent used to reset at its
//! threshold) proves nothing; these run both ends, under tokio's paused clock.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::health::{HealthMonitor, HealthTracker};
use tunnelfleet_agent::status::{AgentStatus, HealthResult, HealthStatus, ProfileShared};
use tunnelfleet_coordinator::monitor::{Action, AlertRules, Monitor};
use tunnelfleet_coordinator::store::AlertKind;

fn shared(endpoint: &str) -> Arc<ProfileShared> {
    let shared = Arc::new(ProfileShared::new(
        "oma",
        "",
        vec![endpoint.into()],
        &[],
        Some(HealthStatus {
            target: "GET http://127.0.0.1:8082/health".into(),
            threshold: 3,
            consecutive_failures: 0,
            healthy: true,
            checks: 0,
            failures: 0,
            last: None,
        }),
    ));
    shared.set_state(tunnelfleet_agent::status::TunnelState::Up, "test");
    shared
}

/// The agent's health monitor with scripted results, its shared status read after every check
/// into a heartbeat (the agent's own `fleet::heartbeat`), each heartbeat into the coordinator's
/// `Monitor::heartbeat`. Returns the coordinator's decisions per check.
async fn run(script: &[bool]) -> Vec<Vec<Action>> {
    let endpoint = "10.0.0.1:22";
    let shared = shared(endpoint);
    let results = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
    let (_up_tx, up_rx) = watch::channel(true);
    let (down_tx, _down_rx) = tokio::sync::mpsc::channel(16);
    let cancel = CancellationToken::new();
    let r = results.clone();
    let interval = Duration::from_secs(10);
    let monitor = HealthMonitor {
        interval,
        tracker: HealthTracker::new(3),
        shared: shared.clone(),
        session_up: up_rx,
        check: move || {
            let ok = r.lock().unwrap().pop_front().unwrap_or(true);
            async move {
                HealthResult {
                    at_unix_ms: tunnelfleet_runtime::clock::now_unix_ms(),
                    ok,
                    latency_ms: 1.0,
                    detail: if ok {
                        "HTTP 200".into()
                    } else {
                        "HTTP 503".into()
                    },
                }
            }
        },
        on_down: down_tx,
        cancel: cancel.clone(),
    };
    let task = tokio::spawn(monitor.run());
    let mut coordinator = Monitor::new(AlertRules::default());
    let mut decisions = Vec::new();
    let mut since = 0;
    for seq in 0..script.len() as u64 {
        // Half an interval after each check: the check has run, the next has not.
        tokio::time::sleep(if seq == 0 {
            interval + interval / 2
        } else {
            interval
        })
        .await;
        let status = AgentStatus {
            version: "test".into(),
            pid: 1,
            started_unix_ms: 1,
            profiles: vec![shared.snapshot()],
        };
        let hb = tunnelfleet_agent::fleet::heartbeat(seq, &status, since);
        since = hb.sent_unix_ms;
        decisions.push(coordinator.heartbeat("vma-1", &hb, tokio::time::Instant::now()));
    }
    cancel.cancel();
    task.await.unwrap();
    decisions
}

fn fired(actions: &[Action], kind: AlertKind) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Fire { kind: k, .. } if *k == kind))
        .count()
}

#[tokio::test(start_paused = true)]
async fn three_failed_checks_in_a_row_on_the_agent_are_one_tunnel_health_alert_on_the_coordinator()
{
    let d = run(&[false, false, false, false, false, false, false, true]).await;
    let per_check: Vec<usize> = d
        .iter()
        .map(|a| fired(a, AlertKind::TunnelHealth))
        .collect();
    // Fired at the third failure, once, however long it goes on (a restart of the count at the
    // agent's threshold would fire never, or again at every third).
    assert_eq!(per_check, vec![0, 0, 1, 0, 0, 0, 0, 0], "{d:?}");
    assert!(
        d[7].iter().any(|a| matches!(
            a,
            Action::Resolve {
                kind: AlertKind::TunnelHealth,
                ..
            }
        )),
        "the pass did not resolve it: {:?}",
        d[7]
    );
}

#[tokio::test(start_paused = true)]
async fn two_failures_and_a_pass_never_alert() {
    let d = run(&[false, false, true, false, false, true, false, false, true]).await;
    assert!(
        d.iter().all(|a| fired(a, AlertKind::TunnelHealth) == 0),
        "{d:?}"
    );
}
