//! The rules at their edges: each test here kills mutants that `cargo mutants` found the suite
//! let live (DEVELOPERS.md, "Mutation testing").

use super::impaired::{impaired_a_then_on_b, moved_away};
use super::*;

/// An `oma_down` that was firing when the coordinator stopped holds its endpoint down after a
/// restart (no failover onto it) until a probe passes there, which resolves it; another kind of
/// alert restored marks no endpoint.
#[tokio::test(start_paused = true)]
async fn a_restored_oma_down_keeps_its_endpoint_out_until_a_probe_passes() {
    let mut m = monitor();
    let now = Instant::now();
    m.restore_firing(AlertKind::OmaDown, B);
    m.restore_firing(AlertKind::AgentOffline, A);
    assert!(m.is_firing(AlertKind::OmaDown, B));
    assert!(!m.is_firing(AlertKind::OmaDown, A));
    m.probe(A, fail(), now);
    m.probe(A, fail(), now);
    let actions = m.probe(A, fail(), now);
    assert_eq!(fired(&actions, AlertKind::OmaDown).len(), 1, "{actions:?}");
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::SetActive { endpoint, .. } if endpoint == B)),
        "failed over onto an endpoint still down: {actions:?}"
    );
    let actions = m.probe(B, pass(), now);
    assert!(
        actions.contains(&Action::Resolve {
            kind: AlertKind::OmaDown,
            subject: B.into()
        }),
        "{actions:?}"
    );
}

/// An alert the rules raised but the store did not record is raised again while it holds.
#[tokio::test(start_paused = true)]
async fn an_alert_not_recorded_is_raised_again() {
    let mut m = monitor();
    let now = Instant::now();
    m.probe(A, fail(), now);
    m.probe(A, fail(), now);
    assert_eq!(fired(&m.probe(A, fail(), now), AlertKind::OmaDown).len(), 1);
    assert!(m.is_firing(AlertKind::OmaDown, A));
    m.not_fired(AlertKind::OmaDown, A);
    assert!(!m.is_firing(AlertKind::OmaDown, A));
    assert_eq!(fired(&m.probe(A, fail(), now), AlertKind::OmaDown).len(), 1);
}

/// Error counters are read as differences: a counter that first appears after the baseline
/// counts whole, and one that went down (the agent restarted) counts from zero again.
#[tokio::test(start_paused = true)]
async fn refused_keys_count_from_a_new_counter_and_across_an_agent_restart() {
    let mut m = monitor();
    let now = Instant::now();
    assert!(
        m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Backoff, 0)]), now)
            .is_empty()
    );
    let a = m.heartbeat("vma-1", &with_auth(3, TunnelState::Backoff), now);
    assert_eq!(fired(&a, AlertKind::SshAuth).len(), 1, "{a:?}");

    let mut m = monitor();
    m.heartbeat("vma-2", &with_auth(7, TunnelState::Backoff), now);
    let a = m.heartbeat("vma-2", &with_auth(9, TunnelState::Backoff), now);
    assert!(fired(&a, AlertKind::SshAuth).is_empty(), "{a:?}");
    // Restarted: its counter starts again at 1, which is one more refusal, the third.
    let a = m.heartbeat("vma-2", &with_auth(1, TunnelState::Backoff), now);
    assert_eq!(fired(&a, AlertKind::SshAuth).len(), 1, "{a:?}");
}

fn moved_on_its_own(at: &[u64]) -> Heartbeat {
    let mut r = report(B, TunnelState::Up, 0);
    r.failover_log = at
        .iter()
        .map(|&at_unix_ms| tunnelfleet_protocol::FailoverRecord {
            at_unix_ms,
            from: A.into(),
            to: B.into(),
            reason: "connect: refused".into(),
        })
        .collect();
    hb(vec![r])
}

fn events(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Event(e) if e.contains("moved on its own")))
        .count()
}

/// Each move an agent made on its own is logged once: heartbeats repeat the agent's recent
/// moves, only the ones after the latest seen are new.
#[tokio::test(start_paused = true)]
async fn an_agents_own_moves_are_logged_once_each() {
    let mut m = monitor();
    let now = Instant::now();
    assert_eq!(
        events(&m.heartbeat("vma-1", &moved_on_its_own(&[10]), now)),
        1
    );
    assert_eq!(
        events(&m.heartbeat("vma-1", &moved_on_its_own(&[10]), now)),
        0
    );
    assert_eq!(
        events(&m.heartbeat("vma-1", &moved_on_its_own(&[10, 20, 30]), now)),
        2
    );
    assert_eq!(
        events(&m.heartbeat("vma-1", &moved_on_its_own(&[20, 30]), now)),
        0
    );
}

/// A counter the agent stopped reporting (its profile moved, the endpoint left the group) is
/// forgotten: when it comes back, what it holds is new.
#[tokio::test(start_paused = true)]
async fn a_counter_no_longer_reported_is_forgotten() {
    let mut m = monitor();
    let now = Instant::now();
    m.heartbeat("vma-1", &with_auth(7, TunnelState::Backoff), now);
    // The same profile and endpoint, another kind of failure: the refusals' counter went.
    let mut other = with_auth(1, TunnelState::Backoff);
    other.profiles[0].errors[0].kind = ErrorKind::Connect;
    m.heartbeat("vma-1", &other, now);
    let a = m.heartbeat("vma-1", &with_auth(9, TunnelState::Backoff), now);
    assert_eq!(fired(&a, AlertKind::SshAuth).len(), 1, "{a:?}");
}

/// Restarts further apart than the window never add up to an alert.
#[tokio::test(start_paused = true)]
async fn restarts_further_apart_than_the_window_raise_nothing() {
    let mut m = monitor();
    for started in 1..8 {
        let a = m.hello("vma-1", started, Instant::now());
        assert!(fired(&a, AlertKind::AgentRestarting).is_empty(), "{a:?}");
        tokio::time::advance(Duration::from_secs(601)).await;
    }
}

/// A restart exactly one window ago is still within it.
#[tokio::test(start_paused = true)]
async fn a_restart_exactly_a_window_ago_still_counts() {
    let mut m = monitor();
    m.hello("vma-1", 1, Instant::now());
    assert!(m.hello("vma-1", 2, Instant::now()).is_empty());
    tokio::time::advance(Duration::from_secs(300)).await;
    assert!(m.hello("vma-1", 3, Instant::now()).is_empty());
    tokio::time::advance(Duration::from_secs(300)).await;
    let a = m.hello("vma-1", 4, Instant::now());
    assert_eq!(fired(&a, AlertKind::AgentRestarting).len(), 1, "{a:?}");
}

/// `agent_restarting` resolves once the last restart is more than a window old, not before,
/// and a tick meanwhile resolves nothing.
#[tokio::test(start_paused = true)]
async fn agent_restarting_resolves_only_past_the_window() {
    let mut m = monitor();
    m.hello("vma-1", 1, Instant::now());
    for started in 2..5 {
        tokio::time::advance(Duration::from_secs(30)).await;
        m.hello("vma-1", started, Instant::now());
    }
    assert!(m.is_firing(AlertKind::AgentRestarting, "vma-1"));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(m.tick(Instant::now()).is_empty());
    // The last restart exactly a window old: still within it.
    tokio::time::advance(Duration::from_secs(570)).await;
    assert!(m.tick(Instant::now()).is_empty());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(
        m.tick(Instant::now()),
        vec![Action::Resolve {
            kind: AlertKind::AgentRestarting,
            subject: "vma-1".into()
        }]
    );
}

/// `restarts = 0` turns the rule off.
#[tokio::test(start_paused = true)]
async fn no_restart_alert_when_the_rule_is_off() {
    let mut m = Monitor::new(AlertRules {
        restarts: 0,
        ..AlertRules::default()
    });
    for started in 1..10 {
        let a = m.hello("vma-1", started, Instant::now());
        assert!(fired(&a, AlertKind::AgentRestarting).is_empty(), "{a:?}");
    }
}

fn tunnel_health_summary(r: ProfileReport) -> String {
    let mut m = monitor();
    let now = Instant::now();
    m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 0)]), now);
    let a = m.heartbeat("vma-1", &hb(vec![r]), now);
    match fired(&a, AlertKind::TunnelHealth).as_slice() {
        [Action::Fire { summary, .. }] => summary.clone(),
        other => panic!("{other:?} in {a:?}"),
    }
}

/// `tunnel_health` says why: the failing check's own detail, else the session's last error.
#[tokio::test(start_paused = true)]
async fn tunnel_health_names_the_failing_checks_detail_or_the_last_error() {
    let s = tunnel_health_summary(failing_health(A, 3));
    assert!(
        s.ends_with("failing for 3 checks in a row (HTTP 503)"),
        "{s}"
    );
    let mut r = failing_health(A, 3);
    r.health[0].ok = true;
    r.health[0].detail = "HTTP 200".into();
    r.last_error = Some("connection reset".into());
    let s = tunnel_health_summary(r);
    assert!(s.ends_with("(connection reset)"), "{s}");
}

/// Onboarding lasts `ONBOARDING_GRACE` from the certificate, not a moment longer.
#[tokio::test(start_paused = true)]
async fn onboarding_ends_at_its_grace() {
    let mut m = monitor();
    let t0 = Instant::now();
    m.onboarding("vma-new", ["p".to_string()].into(), t0);
    let grace = super::certs::ONBOARDING_GRACE;
    assert!(m.is_onboarding("vma-new", "p", t0 + grace - Duration::from_millis(1)));
    assert!(!m.is_onboarding("vma-new", "p", t0 + grace));
}

/// An endpoint's threshold is its own group's, not another group's.
#[tokio::test(start_paused = true)]
async fn an_endpoints_threshold_and_probing_are_its_own_groups() {
    let mut m = Monitor::new(AlertRules::default());
    let mut other = group(Duration::from_secs(300));
    other.name = "other".into();
    other.endpoints = vec![C.into()];
    other.threshold = 1;
    m.set_groups(vec![group(Duration::from_secs(300)), other]);
    let now = Instant::now();
    assert!(fired(&m.probe(A, fail(), now), AlertKind::OmaDown).is_empty());
    assert!(fired(&m.probe(A, fail(), now), AlertKind::OmaDown).is_empty());
    assert_eq!(fired(&m.probe(A, fail(), now), AlertKind::OmaDown).len(), 1);
    assert!(m.probed(A) && m.probed(C));
    assert!(!m.probed("10.0.0.9:22"));
}

fn row<'a>(view: &'a [EndpointView], endpoint: &str) -> &'a EndpointView {
    view.iter().find(|v| v.endpoint == endpoint).unwrap()
}

/// What `oma list` shows: state, the active endpoint, who is where, latency in milliseconds.
#[tokio::test(start_paused = true)]
async fn the_group_view_says_what_each_endpoint_is() {
    let mut m = monitor();
    let now = Instant::now();
    m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 0)]), now);
    m.heartbeat("vma-2", &hb(vec![report(B, TunnelState::Up, 0)]), now);
    // Heard of through agents, never probed yet: unknown.
    assert_eq!(row(&m.view(now), A).state, "unknown");
    for _ in 0..3 {
        m.probe(A, fail(), now);
    }
    m.probe(B, Ok(Duration::from_millis(2)), now);
    let view = m.view(now);
    let (a, b) = (row(&view, A), row(&view, B));
    assert_eq!((a.state.as_str(), b.state.as_str()), ("down", "up"));
    assert_eq!((a.active, b.active), (false, true));
    assert_eq!((a.priority, b.priority), (0, 1));
    assert_eq!(a.agents, ["vma-1"]);
    assert_eq!(b.agents, ["vma-2"]);
    assert_eq!(b.last_latency_ms, Some(2.0));
    // Only the active endpoint lists the agents that are elsewhere.
    assert!(a.diverged.is_empty(), "{a:?}");
    assert_eq!(
        b.diverged,
        [format!("vma-1/p on {A}: no reason reported")],
        "{b:?}"
    );
}

/// `oma failback` goes to the best endpoint that is up: none better while the preferred one is
/// down, and back to it once it is up again.
#[tokio::test(start_paused = true)]
async fn operator_failback_goes_to_the_best_endpoint_that_is_up() {
    let mut m = monitor();
    let now = Instant::now();
    for _ in 0..3 {
        m.probe(A, fail(), now);
    }
    assert!(matches!(
        m.failback("oma"),
        Err(Refusal::AlreadyBest { .. })
    ));
    m.probe(A, pass(), now);
    assert_eq!(
        m.failback("oma").unwrap(),
        Action::SetActive {
            group: "oma".into(),
            endpoint: A.into(),
            reason: "operator failback".into(),
            pinned: false,
        }
    );
}

fn unhealthy(a: &[Action]) -> usize {
    fired(a, AlertKind::OmaUnhealthy).len()
}

/// A tunnel last heard of more than `FRESH` ago is no evidence; one exactly that old still is.
#[tokio::test(start_paused = true)]
async fn a_tunnel_is_evidence_for_as_long_as_it_is_fresh() {
    for (first_heard, counts) in [
        (tunnels::FRESH, true),
        (tunnels::FRESH + Duration::from_secs(1), false),
    ] {
        let mut m = monitor();
        m.probe(A, pass(), Instant::now());
        m.probe(B, pass(), Instant::now());
        beat(&mut m, "vma-1", &hb(vec![moved_away(A, B)]), Instant::now());
        tokio::time::advance(first_heard - tunnels::FOLLOW_GRACE).await;
        beat(&mut m, "vma-2", &hb(vec![moved_away(A, B)]), Instant::now());
        tokio::time::advance(tunnels::FOLLOW_GRACE).await;
        let a = beat(&mut m, "vma-2", &hb(vec![moved_away(A, B)]), Instant::now());
        assert_eq!(unhealthy(&a), usize::from(counts), "{first_heard:?}: {a:?}");
    }
}

/// An agent that went offline takes its tunnels out of the evidence and of the group view.
#[tokio::test(start_paused = true)]
async fn an_offline_agents_tunnels_are_forgotten() {
    let mut m = monitor();
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    beat(&mut m, "vma-1", &hb(vec![moved_away(A, B)]), Instant::now());
    let diverged = |m: &Monitor| {
        m.view(Instant::now())
            .into_iter()
            .find(|v| v.endpoint == A)
            .map(|v| v.diverged.len())
    };
    assert_eq!(diverged(&m), Some(1));
    m.agent_offline("vma-1", 3);
    assert_eq!(diverged(&m), Some(0));
    // Its old word does not make a quorum with a second agent's.
    beat(&mut m, "vma-2", &hb(vec![moved_away(A, B)]), Instant::now());
    tokio::time::advance(tunnels::FOLLOW_GRACE).await;
    let a = beat(&mut m, "vma-2", &hb(vec![moved_away(A, B)]), Instant::now());
    assert_eq!(unhealthy(&a), 0, "{a:?}");
}

/// What was said against an endpoint the group left stays in the view while the endpoint is
/// kept out of use, and goes with that.
#[tokio::test(start_paused = true)]
async fn a_left_endpoints_words_last_as_long_as_it_is_kept_out() {
    let mut m = impaired_a_then_on_b();
    let said = |m: &Monitor| {
        m.view(Instant::now())
            .into_iter()
            .find(|v| v.endpoint == A)
            .and_then(|v| v.degraded)
    };
    assert!(said(&m).is_some());
    m.tick(Instant::now());
    assert!(said(&m).is_some(), "cleared while still kept out");
    tokio::time::advance(Duration::from_secs(61)).await;
    m.tick(Instant::now());
    assert_eq!(said(&m), None);
}

/// Tunnels that are down are no word on any endpoint; agents that left the active endpoint for
/// something other than their health get the grace to follow a move, even those seen on it.
#[tokio::test(start_paused = true)]
async fn down_tunnels_say_nothing_and_a_move_not_for_health_waits_for_the_grace() {
    let mut m = monitor();
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    for _ in 0..3 {
        for agent in ["vma-1", "vma-2"] {
            let a = beat(
                &mut m,
                agent,
                &hb(vec![report(B, TunnelState::Backoff, 0)]),
                Instant::now(),
            );
            assert_eq!(unhealthy(&a), 0, "{a:?}");
        }
        tokio::time::advance(tunnels::FOLLOW_GRACE).await;
    }

    let mut m = monitor();
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    for agent in ["vma-1", "vma-2"] {
        beat(
            &mut m,
            agent,
            &hb(vec![report(A, TunnelState::Up, 0)]),
            Instant::now(),
        );
    }
    for agent in ["vma-1", "vma-2"] {
        let a = beat(&mut m, agent, &hb(vec![moved_away(A, B)]), Instant::now());
        assert_eq!(unhealthy(&a), 0, "counted within the grace: {a:?}");
    }
}

/// The endpoint is impaired when a quorum and more than half of its agents fail there: half is
/// not enough, four of seven is.
#[tokio::test(start_paused = true)]
async fn impaired_takes_more_than_half_of_the_agents() {
    for (bad, total, incident) in [(2, 4, false), (4, 7, true), (3, 5, true)] {
        let mut m = monitor();
        m.probe(A, pass(), Instant::now());
        m.probe(B, pass(), Instant::now());
        let mut all = Vec::new();
        for round in 0..2 {
            // The passing agents are heard of first.
            for i in (0..total).rev() {
                let r = if i < bad {
                    failing_health(A, 3 + round)
                } else {
                    report(A, TunnelState::Up, 0)
                };
                all.extend(beat(
                    &mut m,
                    &format!("vma-{i}"),
                    &hb(vec![r]),
                    Instant::now(),
                ));
            }
        }
        assert_eq!(
            unhealthy(&all),
            usize::from(incident),
            "{bad} of {total}: {all:?}"
        );
    }
}

/// A trial failback resolves the incident only once fewer than half its agents fail there.
#[tokio::test(start_paused = true)]
async fn a_trial_resolves_only_with_fewer_than_half_failing() {
    let mut m = impaired_a_then_on_b();
    tokio::time::advance(Duration::from_secs(60)).await;
    m.probe(A, pass(), Instant::now());
    let resolve = Action::Resolve {
        kind: AlertKind::OmaUnhealthy,
        subject: A.into(),
    };
    // The trial starts; nobody has passed there yet.
    let t = m.tick(Instant::now());
    assert!(
        !t.contains(&resolve),
        "resolved with no agent passing: {t:?}"
    );
    let mut a = beat(
        &mut m,
        "vma-2",
        &hb(vec![failing_health(A, 9)]),
        Instant::now(),
    );
    a.extend(beat(
        &mut m,
        "vma-1",
        &hb(vec![report(A, TunnelState::Up, 0)]),
        Instant::now(),
    ));
    assert!(!a.contains(&resolve), "one of two still failing: {a:?}");
    let a = beat(
        &mut m,
        "vma-2",
        &hb(vec![report(A, TunnelState::Up, 0)]),
        Instant::now(),
    );
    assert!(a.contains(&resolve), "{a:?}");
}

/// An endpoint is kept out for its own group's `failback_after`, not another group's.
#[tokio::test(start_paused = true)]
async fn an_endpoint_is_kept_out_for_its_own_groups_failback_after() {
    let mut m = impaired_a_then_on_b();
    let mut groups: Vec<OmaGroup> = m.groups().cloned().collect();
    let mut other = group(Duration::from_secs(600));
    other.name = "other".into();
    other.endpoints = vec![C.into()];
    groups.push(other);
    m.set_groups(groups);
    assert!(m.impaired(A, Instant::now()));
    tokio::time::advance(Duration::from_secs(61)).await;
    assert!(!m.impaired(A, Instant::now()));
}
