//! The rules under tokio's paused clock.

use super::*;
use tokio::time::Instant;
use tunnelfleet_protocol::{
    ErrorCount, ErrorKind, ForwardState, Heartbeat, ProfileReport, TunnelState,
};

const A: &str = "10.0.0.1:22";
const B: &str = "10.0.0.2:22";
const C: &str = "10.0.0.3:22";

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
        quorum: 2,
    }
}

fn monitor() -> Monitor {
    let mut m = Monitor::new(AlertRules::default());
    m.set_groups(vec![group(Duration::from_secs(300))]);
    m
}

fn report(endpoint: &str, state: TunnelState, health_failures: u32) -> ProfileReport {
    ProfileReport {
        consecutive_failures: health_failures,
        ..ProfileReport::new("p", state, endpoint)
    }
}

/// A heartbeat of profile `p` on `A` in `state`, its key refused `count` times so far.
fn with_auth(count: u64, state: TunnelState) -> Heartbeat {
    let mut r = report(A, state, 0);
    r.errors = vec![ErrorCount {
        endpoint: A.into(),
        kind: ErrorKind::Auth,
        count,
        last_detail: "refused".into(),
        last_unix_ms: 0,
    }];
    hb(vec![r])
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

/// A tunnel's "not up" streak counts heartbeats in a row: one up in between starts it again.
#[tokio::test(start_paused = true)]
async fn a_tunnel_up_between_failures_starts_its_count_again() {
    let mut m = monitor();
    let now = Instant::now();
    m.probe(A, pass(), now);
    let beat_in =
        |m: &mut Monitor, state| m.heartbeat("vma-3", &hb(vec![report(A, state, 0)]), now);
    for state in [
        TunnelState::Backoff,
        TunnelState::Backoff,
        TunnelState::Up,
        TunnelState::Backoff,
        TunnelState::Connecting,
    ] {
        let a = beat_in(&mut m, state);
        assert!(
            fired(&a, AlertKind::TunnelHealth).is_empty(),
            "{state:?}: {a:?}"
        );
    }
    // The third in a row.
    let a = beat_in(&mut m, TunnelState::Backoff);
    assert_eq!(fired(&a, AlertKind::TunnelHealth).len(), 1, "{a:?}");
}

/// A group of three moves to the first usable endpoint in its order: off a down primary to
/// the second (not the third), off a down second to the third, and back to the primary (not
/// the second) once it is healthy for `failback_after`.
#[tokio::test(start_paused = true)]
async fn a_group_of_three_moves_to_the_first_usable_endpoint_in_its_order() {
    let mut m = group_of_three();
    let active = |m: &Monitor| m.groups().next().unwrap().active().map(str::to_string);
    for _ in 0..3 {
        m.probe(A, fail(), Instant::now());
    }
    assert_eq!(active(&m).as_deref(), Some(B));
    for _ in 0..3 {
        m.probe(B, fail(), Instant::now());
    }
    assert_eq!(active(&m).as_deref(), Some(C));
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    tokio::time::advance(Duration::from_secs(60)).await;
    m.tick(Instant::now());
    assert_eq!(active(&m).as_deref(), Some(A));
}

/// A group of three whose primary fails its agents' checks while its sshd answers moves to
/// the second endpoint, the first usable one, not the third.
#[tokio::test(start_paused = true)]
async fn a_group_of_three_leaves_an_impaired_primary_for_the_second() {
    let mut m = group_of_three();
    both_agents_fail_on_a(&mut m);
}

/// Group `oma` of A, B and C (failback after 60 s), every endpoint's sshd answering.
fn group_of_three() -> Monitor {
    let mut m = Monitor::new(AlertRules::default());
    let mut g = group(Duration::from_secs(60));
    g.endpoints.push(C.into());
    m.set_groups(vec![g]);
    for e in [A, B, C] {
        m.probe(e, pass(), Instant::now());
    }
    m
}

/// Both agents' checks fail through A three times: the group leaves A for B (the first usable
/// endpoint after it).
fn both_agents_fail_on_a(m: &mut Monitor) {
    for agent in ["vma-1", "vma-2"] {
        beat(m, agent, &hb(vec![failing_health(A, 3)]), Instant::now());
    }
    assert_eq!(m.groups().next().unwrap().active(), Some(B));
}

#[tokio::test(start_paused = true)]
async fn refused_keys_raise_ssh_auth_and_a_session_resolves_it() {
    let mut m = monitor();
    let now = Instant::now();
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
async fn a_profile_assigned_after_the_first_certificate_is_looked_up_once_and_onboards_too() {
    let mut m = monitor();
    // Its first certificate came before any profile was assigned to it.
    m.onboarding("vma-new", Default::default(), Instant::now());
    let hb = with_auth(1, TunnelState::Backoff);
    assert!(m.onboarding_lookup("vma-new", &hb, Instant::now()));
    m.onboarding_profiles("vma-new", ["p".to_string()].into(), &hb);
    // Looked up once: the same names ask nothing more.
    assert!(!m.onboarding_lookup("vma-new", &hb, Instant::now()));
    for n in 1..8 {
        tokio::time::advance(Duration::from_secs(5)).await;
        let a = m.heartbeat(
            "vma-new",
            &with_auth(n, TunnelState::Backoff),
            Instant::now(),
        );
        assert!(fired(&a, AlertKind::SshAuth).is_empty(), "{a:?}");
        assert!(fired(&a, AlertKind::TunnelHealth).is_empty(), "{a:?}");
    }
    // A name looked up and found not to use the certificate is not onboarding.
    m.onboarding("vma-static", Default::default(), Instant::now());
    assert!(m.onboarding_lookup("vma-static", &hb, Instant::now()));
    m.onboarding_profiles("vma-static", Default::default(), &hb);
    assert!(!m.onboarding_lookup("vma-static", &hb, Instant::now()));
    let alerts: usize = (0..4)
        .map(|n| {
            fired(
                &m.heartbeat(
                    "vma-static",
                    &with_auth(n, TunnelState::Backoff),
                    Instant::now(),
                ),
                AlertKind::SshAuth,
            )
            .len()
        })
        .sum();
    assert_eq!(alerts, 1);
    // Past the grace nothing is looked up.
    tokio::time::advance(ONBOARDING_GRACE).await;
    m.onboarding(
        "vma-late",
        Default::default(),
        Instant::now() - ONBOARDING_GRACE,
    );
    assert!(!m.onboarding_lookup("vma-late", &hb, Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn an_onboarding_agent_refused_until_the_omas_sync_raises_nothing_then_it_counts() {
    let mut m = monitor();
    let refused = |count: u64| with_auth(count, TunnelState::Backoff);
    // Its static-key profile's refusals count at once: nothing about them waits for a sync.
    m.onboarding("vma-static", ["other".to_string()].into(), Instant::now());
    let ssh_auth_alerts = |m: &mut Monitor, agent: &str, counts: std::ops::Range<u64>| {
        counts
            .map(|n| {
                fired(
                    &m.heartbeat(agent, &refused(n), Instant::now()),
                    AlertKind::SshAuth,
                )
                .len()
            })
            .sum::<usize>()
    };
    assert_eq!(ssh_auth_alerts(&mut m, "vma-static", 0..4), 1);
    m.onboarding("vma-new", ["p".to_string()].into(), Instant::now());
    assert!(
        m.heartbeat("vma-new", &refused(0), Instant::now())
            .is_empty()
    );
    // Refused again and again, tunnels down, within the grace: no alert of either kind.
    for n in 1..8 {
        tokio::time::advance(Duration::from_secs(5)).await;
        let a = m.heartbeat("vma-new", &refused(n), Instant::now());
        assert!(fired(&a, AlertKind::SshAuth).is_empty(), "{a:?}");
        assert!(fired(&a, AlertKind::TunnelHealth).is_empty(), "{a:?}");
    }
    // Past it, a key still refused is an alert as for any agent.
    tokio::time::advance(ONBOARDING_GRACE).await;
    assert_eq!(ssh_auth_alerts(&mut m, "vma-new", 8..11), 1);
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

#[tokio::test(start_paused = true)]
async fn a_held_reverse_port_alert_names_the_stale_session_and_the_fix() {
    let mut m = monitor();
    let now = Instant::now();
    m.probe(A, pass(), now);
    let held = |state| {
        let mut r = report(A, TunnelState::Up, 0);
        r.forwards = vec![tunnelfleet_protocol::ForwardReport {
            spec: "R localhost:9081:localhost:8080".into(),
            state,
            detail: Some("the server refused to listen on localhost:9081".into()),
            bytes_out: 0,
            bytes_in: 0,
            connections_open: 0,
        }];
        hb(vec![r])
    };
    let mut fires = Vec::new();
    for _ in 0..3 {
        fires.extend(m.heartbeat("vma-1", &held(ForwardState::Retrying), now));
    }
    let fired = fired(&fires, AlertKind::PortConflict);
    let [Action::Fire { summary, .. }] = fired.as_slice() else {
        panic!("one port_conflict expected: {fires:?}")
    };
    for part in [
        "stale session",
        "ops/deploy/oma/tunnelfleet.conf",
        "reclaim_remote_ports = true",
        "ss -ltnp 'sport = :9081'",
    ] {
        assert!(summary.contains(part), "{part:?} missing from {summary}");
    }
    let a = m.heartbeat("vma-1", &held(ForwardState::Active), now);
    assert!(
        matches!(
            a.as_slice(),
            [Action::Resolve {
                kind: AlertKind::PortConflict,
                ..
            }]
        ),
        "{a:?}"
    );
}

/// A heartbeat and the watcher's next tick (where agents' tunnels are judged).
fn beat(m: &mut Monitor, agent: &str, hb: &Heartbeat, now: Instant) -> Vec<Action> {
    let mut a = m.heartbeat(agent, hb, now);
    a.extend(m.tick(now));
    a
}

fn failing_health(endpoint: &str, n: u32) -> ProfileReport {
    let mut r = report(endpoint, TunnelState::Up, n);
    r.health = vec![tunnelfleet_protocol::HealthSample {
        at_unix_ms: 1,
        ok: false,
        latency_us: 900,
        detail: "HTTP 503".into(),
    }];
    r
}

mod edges;
mod impaired;
