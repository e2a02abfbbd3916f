//! The rules under tokio's paused clock.

use super::*;
use tokio::time::Instant;
use tunnelfleet_protocol::{ErrorCount, ErrorKind, Heartbeat, ProfileReport, TunnelState};

const A: &str = "10.0.0.1:22";
const B: &str = "10.0.0.2:22";

fn group(failback: Duration) -> OmaGroup {
    OmaGroup {
        name: "oma".into(),
        endpoints: vec![A.into(), B.into()],
        probe: true,
        probe_interval: Duration::from_secs(1),
        probe_timeout: Duration::from_millis(800),
        threshold: 3,
        failback_after: failback,
        active: None,
        drained: Default::default(),
        pinned: false,
    }
}

fn monitor() -> Monitor {
    let mut m = Monitor::new(AlertRules::default());
    m.set_groups(vec![group(Duration::from_secs(300))]);
    m
}

fn report(endpoint: &str, state: TunnelState, health_failures: u32) -> ProfileReport {
    ProfileReport {
        name: "p".into(),
        state,
        active_endpoint: endpoint.into(),
        up_since_unix_ms: None,
        reconnects: 0,
        failovers: 0,
        last_error: None,
        consecutive_failures: health_failures,
        health: vec![],
        forwards: vec![],
        errors: vec![],
        failover_log: vec![],
    }
}

fn hb(profiles: Vec<ProfileReport>) -> Heartbeat {
    Heartbeat {
        seq: 0,
        sent_unix_ms: 0,
        profiles,
    }
}

fn fail() -> Result<Duration, ProbeError> {
    Err(ProbeError::Timeout(Duration::from_millis(800)))
}

fn pass() -> Result<Duration, ProbeError> {
    Ok(Duration::from_millis(1))
}

fn fired(actions: &[Action], kind: AlertKind) -> Vec<&Action> {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Fire { kind: k, .. } if *k == kind))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn three_failed_probes_raise_one_incident_naming_the_agents_and_a_pass_resolves_it() {
    let mut m = monitor();
    let now = Instant::now();
    for agent in ["vma-1", "vma-2"] {
        m.heartbeat(agent, &hb(vec![report(A, TunnelState::Up, 0)]), now);
    }
    // Two failures and a pass: the count starts again.
    assert!(m.probe(A, fail(), now).is_empty());
    assert!(m.probe(A, fail(), now).is_empty());
    assert!(m.probe(A, pass(), now).is_empty());
    assert!(m.probe(A, fail(), now).is_empty());
    assert!(m.probe(A, fail(), now).is_empty());
    // Meanwhile the agents' health checks fail too: held, the incident covers them.
    for agent in ["vma-1", "vma-2"] {
        let a = m.heartbeat(agent, &hb(vec![report(A, TunnelState::Up, 5)]), now);
        assert!(a.is_empty(), "{a:?}");
    }
    let actions = m.probe(A, fail(), now);
    let incidents = fired(&actions, AlertKind::OmaDown);
    assert_eq!(incidents.len(), 1, "{actions:?}");
    let Action::Fire { affected, .. } = incidents[0] else {
        unreachable!()
    };
    assert_eq!(affected, &["vma-1", "vma-2"]);
    // And the group fails over to the standby in the same step.
    assert!(actions.contains(&Action::SetActive {
        group: "oma".into(),
        endpoint: B.into(),
        reason: format!("failover: {A} down"),
        pinned: false,
    }));
    // More failures: no second incident, no second move.
    assert!(m.probe(A, fail(), now).is_empty());
    let resolved = m.probe(A, pass(), now);
    assert_eq!(
        resolved,
        vec![Action::Resolve {
            kind: AlertKind::OmaDown,
            subject: A.into()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn failback_waits_for_a_stable_period_and_a_bounce_restarts_the_clock() {
    let mut m = Monitor::new(AlertRules::default());
    m.set_groups(vec![group(Duration::from_secs(60))]);
    for _ in 0..3 {
        m.probe(A, fail(), Instant::now());
    }
    assert_eq!(m.groups().next().unwrap().active(), Some(B));
    m.probe(A, pass(), Instant::now());
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        m.tick(Instant::now()).is_empty(),
        "failback before the period"
    );
    // The primary bounces: one failed probe (not enough to be down) restarts the clock.
    assert!(m.probe(A, fail(), Instant::now()).is_empty());
    m.probe(A, pass(), Instant::now());
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(
        m.tick(Instant::now()).is_empty(),
        "flapped back after a bounce"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        m.tick(Instant::now()),
        vec![Action::SetActive {
            group: "oma".into(),
            endpoint: A.into(),
            reason: format!("failback: {A} healthy for 1m"),
            pinned: false,
        }]
    );
    assert!(m.tick(Instant::now()).is_empty());
}

#[tokio::test(start_paused = true)]
async fn one_agent_failing_against_a_healthy_oma_gets_its_own_alert() {
    let mut m = monitor();
    let now = Instant::now();
    m.probe(A, pass(), now);
    let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 2)]), now);
    assert!(a.is_empty());
    let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 3)]), now);
    assert_eq!(fired(&a, AlertKind::TunnelHealth).len(), 1, "{a:?}");
    let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 4)]), now);
    assert!(a.is_empty(), "fired twice: {a:?}");
    let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 0)]), now);
    assert_eq!(
        a,
        vec![Action::Resolve {
            kind: AlertKind::TunnelHealth,
            subject: "vma-1/p".into()
        }]
    );
    // A tunnel that cannot come up counts as failing, one check per heartbeat.
    for i in 0..3 {
        let a = m.heartbeat("vma-2", &hb(vec![report(A, TunnelState::Backoff, 0)]), now);
        assert_eq!(
            fired(&a, AlertKind::TunnelHealth).len(),
            usize::from(i == 2)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn refused_keys_raise_ssh_auth_and_a_session_resolves_it() {
    let mut m = monitor();
    let now = Instant::now();
    let with_auth = |count: u64, state| {
        let mut r = report(A, state, 0);
        r.errors = vec![ErrorCount {
            endpoint: A.into(),
            kind: ErrorKind::Auth,
            count,
            last_detail: "refused".into(),
            last_unix_ms: 0,
        }];
        hb(vec![r])
    };
    // The first heartbeat is a baseline: old failures are not new checks.
    assert!(
        m.heartbeat("vma-1", &with_auth(7, TunnelState::Backoff), now)
            .is_empty()
    );
    let a = m.heartbeat("vma-1", &with_auth(9, TunnelState::Backoff), now);
    assert!(fired(&a, AlertKind::SshAuth).is_empty());
    let a = m.heartbeat("vma-1", &with_auth(10, TunnelState::Backoff), now);
    assert_eq!(fired(&a, AlertKind::SshAuth).len(), 1, "{a:?}");
    let a = m.heartbeat("vma-1", &with_auth(10, TunnelState::Up), now);
    assert!(a.contains(&Action::Resolve {
        kind: AlertKind::SshAuth,
        subject: "vma-1/p".into()
    }));
}

#[tokio::test(start_paused = true)]
async fn restarts_within_the_window_raise_an_alert_that_resolves_after_a_quiet_window() {
    let mut m = monitor();
    assert!(m.hello("vma-1", 1, Instant::now()).is_empty());
    for started in 2..4 {
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(m.hello("vma-1", started, Instant::now()).is_empty());
    }
    tokio::time::advance(Duration::from_secs(30)).await;
    let a = m.hello("vma-1", 4, Instant::now());
    assert_eq!(fired(&a, AlertKind::AgentRestarting).len(), 1);
    // A reconnect of the same process is not a restart.
    assert!(m.hello("vma-1", 4, Instant::now()).is_empty());
    tokio::time::advance(Duration::from_secs(601)).await;
    assert_eq!(
        m.tick(Instant::now()),
        vec![Action::Resolve {
            kind: AlertKind::AgentRestarting,
            subject: "vma-1".into()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn offline_fires_once_and_a_hello_resolves_it() {
    let mut m = monitor();
    assert_eq!(
        fired(&m.agent_offline("vma-1", 3), AlertKind::AgentOffline).len(),
        1
    );
    assert!(m.agent_offline("vma-1", 3).is_empty());
    assert!(
        m.hello("vma-1", 1, Instant::now())
            .contains(&Action::Resolve {
                kind: AlertKind::AgentOffline,
                subject: "vma-1".into()
            })
    );
}

#[tokio::test(start_paused = true)]
async fn an_operator_failover_is_not_undone_by_automatic_failback() {
    let mut m = Monitor::new(AlertRules::default());
    m.set_groups(vec![group(Duration::from_secs(60))]);
    m.probe(A, pass(), Instant::now());
    assert!(matches!(
        m.failover("oma"),
        Ok(Action::SetActive { pinned: true, .. })
    ));
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert!(
        m.tick(Instant::now()).is_empty(),
        "failed back over an operator's move"
    );
    // A down standby still fails over, pinned or not.
    for _ in 0..3 {
        m.probe(B, fail(), Instant::now());
    }
    assert_eq!(m.groups().next().unwrap().active(), Some(A));
}

#[tokio::test(start_paused = true)]
async fn operator_moves_skip_drained_and_down_endpoints() {
    let mut m = monitor();
    assert!(matches!(m.failover("oma"), Ok(Action::SetActive { endpoint, .. }) if endpoint == B));
    assert!(matches!(m.failback("oma"), Ok(Action::SetActive { endpoint, .. }) if endpoint == A));
    assert!(m.failback("oma").is_err(), "already on the best endpoint");
    for _ in 0..3 {
        m.probe(B, fail(), Instant::now());
    }
    assert!(
        m.failover("oma").is_err(),
        "the only other endpoint is down"
    );
    assert!(m.failover("nope").is_err());
}

#[tokio::test(start_paused = true)]
async fn an_incident_restored_after_a_restart_resolves_on_the_first_pass() {
    let mut m = monitor();
    m.restore_firing(AlertKind::OmaDown, A);
    assert_eq!(
        m.probe(A, pass(), Instant::now()),
        vec![Action::Resolve {
            kind: AlertKind::OmaDown,
            subject: A.into()
        }]
    );
}
