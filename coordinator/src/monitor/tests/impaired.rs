//! Endpoints impaired while their sshd answers: agents' checks and reports as the evidence,
//! with a quorum, a grace and a trial.

use super::*;

pub(super) fn moved_away(from: &str, to: &str) -> ProfileReport {
    let mut r = report(to, TunnelState::Up, 0);
    r.failover_log = vec![tunnelfleet_protocol::FailoverRecord {
        at_unix_ms: 1,
        from: from.into(),
        to: to.into(),
        reason: format!("session to {from} lost: keepalive timeout"),
    }];
    r
}

#[tokio::test(start_paused = true)]
async fn most_agents_failing_health_through_an_answering_sshd_is_one_incident_and_a_failover() {
    let mut m = monitor();
    let now = Instant::now();
    m.probe(A, pass(), now);
    // One agent failing alone: its own alert, never the group's move.
    let a = beat(&mut m, "vma-1", &hb(vec![failing_health(A, 3)]), now);
    assert_eq!(fired(&a, AlertKind::TunnelHealth).len(), 1, "{a:?}");
    assert!(fired(&a, AlertKind::OmaUnhealthy).is_empty(), "{a:?}");
    assert!(!a.iter().any(|x| matches!(x, Action::SetActive { .. })));
    let a = beat(
        &mut m,
        "vma-2",
        &hb(vec![report(A, TunnelState::Up, 0)]),
        now,
    );
    assert!(fired(&a, AlertKind::OmaUnhealthy).is_empty(), "{a:?}");
    // Two of three failing: the quorum and most of the agents there.
    let a = beat(&mut m, "vma-3", &hb(vec![failing_health(A, 4)]), now);
    let incident = fired(&a, AlertKind::OmaUnhealthy);
    let [
        Action::Fire {
            summary, affected, ..
        },
    ] = incident.as_slice()
    else {
        panic!("one oma_unhealthy expected: {a:?}")
    };
    assert!(
        summary.contains("health checks through the tunnel failing on 2 of 3 agents (HTTP 503)"),
        "{summary}"
    );
    assert_eq!(affected, &["vma-1", "vma-3"]);
    assert!(a.contains(&Action::SetActive {
        group: "oma".into(),
        endpoint: B.into(),
        reason: format!("failover: {A} fails its agents' tunnels"),
        pinned: false,
    }));
    // More of the same: no second incident, no second move.
    let a = beat(&mut m, "vma-1", &hb(vec![failing_health(A, 5)]), now);
    assert!(fired(&a, AlertKind::OmaUnhealthy).is_empty(), "{a:?}");
    assert!(!a.iter().any(|x| matches!(x, Action::SetActive { .. })));
}

#[tokio::test(start_paused = true)]
async fn agents_that_left_the_active_endpoint_count_against_it_after_the_grace_and_with_a_quorum() {
    let mut m = monitor();
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    // Its own move is logged (an event); nothing else may come of one agent.
    let decided = |a: &[Action]| -> Vec<Action> {
        a.iter()
            .filter(|x| !matches!(x, Action::Event(_)))
            .cloned()
            .collect()
    };
    // One agent cut off from A, on B on its own: never moves the group, however long.
    for _ in 0..3 {
        let a = beat(&mut m, "vma-1", &hb(vec![moved_away(A, B)]), Instant::now());
        assert!(decided(&a).is_empty(), "{a:?}");
        tokio::time::advance(tunnels::FOLLOW_GRACE).await;
    }
    // A second one: counted only once it has been away longer than a move takes.
    let a = beat(&mut m, "vma-2", &hb(vec![moved_away(A, B)]), Instant::now());
    assert!(decided(&a).is_empty(), "{a:?}");
    tokio::time::advance(tunnels::FOLLOW_GRACE - Duration::from_secs(1)).await;
    let a = beat(&mut m, "vma-2", &hb(vec![moved_away(A, B)]), Instant::now());
    assert!(decided(&a).is_empty(), "counted within the grace: {a:?}");
    tokio::time::advance(Duration::from_secs(1)).await;
    let a = beat(&mut m, "vma-2", &hb(vec![moved_away(A, B)]), Instant::now());
    let incident = fired(&a, AlertKind::OmaUnhealthy);
    let [Action::Fire { summary, .. }] = incident.as_slice() else {
        panic!("one oma_unhealthy expected: {a:?}")
    };
    assert!(
        summary.contains("2 of 2 agents could not stay on it")
            && summary.contains("keepalive timeout"),
        "{summary}"
    );
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::SetActive { endpoint, .. } if endpoint == B)),
        "{a:?}"
    );
}

/// Group `oma` (failback after 60 s) moved off A because both agents' checks failed there;
/// both on B and passing, A's sshd still answering.
pub(super) fn impaired_a_then_on_b() -> Monitor {
    let mut m = Monitor::new(AlertRules::default());
    m.set_groups(vec![group(Duration::from_secs(60))]);
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    both_agents_fail_on_a(&mut m);
    // On the standby, passing. The primary's sshd keeps answering its probes.
    for agent in ["vma-1", "vma-2"] {
        beat(
            &mut m,
            agent,
            &hb(vec![report(B, TunnelState::Up, 0)]),
            Instant::now(),
        );
    }
    m
}

#[tokio::test(start_paused = true)]
async fn an_impaired_endpoint_gets_a_trial_after_failback_after_and_resolves_when_its_agents_pass()
{
    let mut m = impaired_a_then_on_b();
    tokio::time::advance(Duration::from_secs(59)).await;
    m.probe(A, pass(), Instant::now());
    assert!(
        m.tick(Instant::now()).is_empty(),
        "back before failback_after"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let a = m.tick(Instant::now());
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::SetActive { endpoint, .. } if endpoint == A)),
        "no trial after failback_after: {a:?}"
    );
    // The trial works: the agents pass on A, the incident resolves.
    let mut resolved = Vec::new();
    for agent in ["vma-1", "vma-2"] {
        resolved.extend(beat(
            &mut m,
            agent,
            &hb(vec![report(A, TunnelState::Up, 0)]),
            Instant::now(),
        ));
    }
    assert!(
        resolved.contains(&Action::Resolve {
            kind: AlertKind::OmaUnhealthy,
            subject: A.into()
        }),
        "{resolved:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_down_endpoint_moves_its_group_onto_one_still_impaired_but_two_impaired_do_not_swap() {
    let moves = |a: &[Action]| -> Vec<(String, String)> {
        a.iter()
            .filter_map(|x| match x {
                Action::SetActive {
                    endpoint, reason, ..
                } => Some((endpoint.clone(), reason.clone())),
                _ => None,
            })
            .collect()
    };
    // B's sshd stops answering well within A's failback_after: A, whose sshd answers, is
    // better than a dead B, and the move says why it is taken anyway.
    let mut m = impaired_a_then_on_b();
    tokio::time::advance(Duration::from_secs(10)).await;
    let mut a = Vec::new();
    for _ in 0..3 {
        a.extend(m.probe(A, pass(), Instant::now()));
        a.extend(m.probe(B, fail(), Instant::now()));
        a.extend(m.tick(Instant::now()));
    }
    let moved = moves(&a);
    assert_eq!(moved.len(), 1, "{a:?}");
    assert_eq!(moved[0].0, A);
    assert!(
        moved[0].1.contains(&format!("{B} down"))
            && moved[0].1.contains(&format!("{A} is the only one up")),
        "{}",
        moved[0].1
    );
    // Drained likewise.
    let mut m = impaired_a_then_on_b();
    m.groups
        .get_mut("oma")
        .unwrap()
        .drained
        .insert(B.to_string());
    let moved = moves(&m.tick(Instant::now()));
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0].0, A);
    // B failing its agents' checks too, A still impaired: the group stays; two impaired
    // endpoints never swap.
    let mut m = impaired_a_then_on_b();
    tokio::time::advance(Duration::from_secs(10)).await;
    let mut a = Vec::new();
    for agent in ["vma-1", "vma-2"] {
        a.extend(beat(
            &mut m,
            agent,
            &hb(vec![failing_health(B, 3)]),
            Instant::now(),
        ));
    }
    a.extend(m.tick(Instant::now()));
    assert_eq!(fired(&a, AlertKind::OmaUnhealthy).len(), 1, "{a:?}");
    assert!(moves(&a).is_empty(), "{a:?}");
    assert_eq!(m.groups().next().unwrap().active(), Some(B));
}

#[test]
fn placement_says_who_follows_the_group_and_why_not() {
    let groups = vec![group(Duration::from_secs(60))];
    let on_active = placement(&groups, &report(A, TunnelState::Up, 0));
    assert!(on_active.follows);
    assert_eq!(on_active.group.as_deref(), Some("oma"));
    let away = placement(&groups, &moved_away(A, B));
    assert!(!away.follows);
    assert_eq!(away.group_active.as_deref(), Some(A));
    assert!(away.reason.unwrap().contains("keepalive timeout"));
    // A refused move is the better reason: it is why it is still there.
    let mut refused = moved_away(A, B);
    refused.last_error = Some(format!("staying on {B}: R 9081 on {A}: refused"));
    assert!(
        placement(&groups, &refused)
            .reason
            .unwrap()
            .starts_with("staying on")
    );
    // Not in any group: nothing to diverge from.
    let alone = placement(&groups, &report("10.9.9.9:22", TunnelState::Up, 0));
    assert!(alone.follows && alone.group.is_none());
}

/// A session-lost counter growing against `endpoint` (the agent failing to reach it).
pub(super) fn losing(endpoint: &str, other: &str, count: u64) -> ProfileReport {
    let mut r = report(other, TunnelState::Backoff, 0);
    r.errors = vec![ErrorCount {
        endpoint: endpoint.into(),
        kind: ErrorKind::Timeout,
        count,
        last_detail: "timeout".into(),
        last_unix_ms: 0,
    }];
    r
}

/// Without probes, agents' reports are the checks — but one agent (a stolen one, or one cut
/// off on its own) neither takes an endpoint down and the group with it, nor brings a down one
/// back: it takes the group's quorum of agents agreeing.
#[tokio::test(start_paused = true)]
async fn without_probes_one_agent_neither_fails_a_group_over_nor_resolves_it() {
    let mut m = Monitor::new(AlertRules::default());
    let mut g = group(Duration::from_secs(300));
    g.probe = false;
    // Another group's larger quorum is its own.
    let mut other = group(Duration::from_secs(300));
    other.name = "other".into();
    other.endpoints = vec![C.into()];
    other.quorum = 5;
    m.set_groups(vec![g, other]);
    // Heartbeats a tenth of a second apart.
    let start = Instant::now();
    let mut ticks = 0u64;
    let mut now = move || {
        ticks += 1;
        start + Duration::from_millis(100 * ticks)
    };
    for agent in ["vma-1", "vma-2"] {
        m.heartbeat(agent, &hb(vec![report(A, TunnelState::Up, 0)]), now());
    }
    // One agent, failing against A heartbeat after heartbeat.
    for n in 1..=10 {
        let a = m.heartbeat("vma-1", &hb(vec![losing(A, B, n)]), now());
        assert!(fired(&a, AlertKind::OmaDown).is_empty(), "{a:?}");
        assert!(
            !a.iter().any(|x| matches!(x, Action::SetActive { .. })),
            "one agent moved the group: {a:?}"
        );
    }
    // A second agent agrees: that is the quorum, and the endpoint goes down.
    let mut all = Vec::new();
    for n in 1..=4 {
        all.extend(m.heartbeat("vma-2", &hb(vec![losing(A, B, n)]), now()));
        all.extend(m.heartbeat("vma-1", &hb(vec![losing(A, B, 10 + n)]), now()));
    }
    assert_eq!(fired(&all, AlertKind::OmaDown).len(), 1, "{all:?}");
    assert!(all.iter().any(|x| matches!(x, Action::SetActive { .. })));
    // One agent claiming to be up on A again resolves nothing…
    let a = m.heartbeat("vma-1", &hb(vec![report(A, TunnelState::Up, 0)]), now());
    assert!(
        !a.iter().any(|x| matches!(
            x,
            Action::Resolve {
                kind: AlertKind::OmaDown,
                ..
            }
        )),
        "one agent's word resolved the incident: {a:?}"
    );
    // …the quorum does.
    let a = m.heartbeat("vma-2", &hb(vec![report(A, TunnelState::Up, 0)]), now());
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Resolve {
                kind: AlertKind::OmaDown,
                ..
            }
        )),
        "{a:?}"
    );
}

/// What the rules remember of an agent is what its last heartbeat still reports: endpoints and
/// profiles that went take their counters with them.
#[tokio::test(start_paused = true)]
async fn an_agents_remembered_counters_follow_its_last_report() {
    let mut m = monitor();
    let now = Instant::now();
    for round in 0..50u64 {
        let ep = format!("10.9.{round}.1:22");
        let mut r = losing(&ep, A, 1);
        r.name = format!("p{round}");
        m.heartbeat("vma-1", &hb(vec![r]), now);
    }
    let remembered = m.agents.get("vma-1").unwrap().remembered();
    assert!(
        remembered <= 2,
        "{remembered} counters kept for one reported profile"
    );
}

/// One agent that left the active endpoint for its health (its sshd answers the probes): the
/// group stays (one agent never moves it), and the endpoint reads degraded with what the agent
/// says, in `oma list` and on the fleet page; the words go once nobody fails there.
#[tokio::test(start_paused = true)]
async fn one_agent_leaving_for_its_health_marks_the_endpoint_degraded_not_the_group_moved() {
    let mut m = monitor();
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    let degraded = |m: &Monitor| -> Vec<(String, Option<String>)> {
        m.view(Instant::now())
            .into_iter()
            .map(|e| (e.endpoint, e.degraded))
            .collect()
    };
    let a = beat(
        &mut m,
        "vma-1",
        &hb(vec![failing_health(A, 3)]),
        Instant::now(),
    );
    assert!(!a.iter().any(|x| matches!(x, Action::SetActive { .. })));
    let view = degraded(&m);
    let why = view[0].1.clone().unwrap_or_default();
    assert!(
        why.contains("failing on 1 of 1 agents (HTTP 503)"),
        "{view:?}"
    );
    assert_eq!(view[1].1, None, "{view:?}");
    // It moved to B on its own: after the grace, that is what A's entry says; its own alert
    // holds while it is off its group's endpoint, though its check passes on B.
    let mut left = moved_away(A, B);
    left.failover_log[0].reason =
        tunnelfleet_protocol::FailoverRecord::health_reason(3, "HTTP 503");
    for _ in 0..2 {
        let a = beat(&mut m, "vma-1", &hb(vec![left.clone()]), Instant::now());
        assert!(
            !a.iter().any(|x| matches!(x, Action::SetActive { .. })),
            "{a:?}"
        );
        assert!(
            !a.iter().any(|x| matches!(x, Action::Resolve { .. })),
            "{a:?}"
        );
        // A move for its health is evidence at once, no grace (it follows no group move).
        let now = degraded(&m)[0].1.clone().unwrap_or_default();
        assert!(now.contains("1 of 1 agents could not stay on it"), "{now}");
        tokio::time::advance(tunnels::FOLLOW_GRACE).await;
    }
    assert!(m.is_firing(AlertKind::TunnelHealth, "vma-1/p"));
    let why = degraded(&m)[0].1.clone().unwrap_or_default();
    assert!(
        why.contains(
            "1 of 1 agents could not stay on it (health check failed 3 times in a row (HTTP 503))"
        ),
        "{why}"
    );
    assert_eq!(m.groups().next().and_then(|g| g.active()), Some(A));
    // Back on A and passing: nothing said against it any more.
    let mut back = report(A, TunnelState::Up, 0);
    back.failover_log = left.failover_log.clone();
    let a = beat(&mut m, "vma-1", &hb(vec![back]), Instant::now());
    assert_eq!(degraded(&m)[0].1, None);
    assert!(
        a.contains(&Action::Resolve {
            kind: AlertKind::TunnelHealth,
            subject: "vma-1/p".into()
        }),
        "{a:?}"
    );
}

/// A move for its health fires the agent's `tunnel_health` at once, naming where it was and
/// why, even though the check passes where it went; a move for another reason (a lost
/// session) is not a health alert.
#[tokio::test(start_paused = true)]
async fn a_move_for_health_off_the_groups_endpoint_is_the_agents_tunnel_health_alert() {
    let mut m = monitor();
    m.probe(A, pass(), Instant::now());
    m.probe(B, pass(), Instant::now());
    let lost = moved_away(A, B);
    let a = beat(&mut m, "vma-2", &hb(vec![lost]), Instant::now());
    assert!(fired(&a, AlertKind::TunnelHealth).is_empty(), "{a:?}");
    let mut left = moved_away(A, B);
    left.failover_log[0].reason =
        tunnelfleet_protocol::FailoverRecord::health_reason(3, "HTTP 503");
    let a = beat(&mut m, "vma-1", &hb(vec![left]), Instant::now());
    let [Action::Fire { summary, .. }] = fired(&a, AlertKind::TunnelHealth).as_slice() else {
        panic!("one tunnel_health expected: {a:?}")
    };
    assert!(
        summary.contains(&format!("through {A}, its group's active endpoint"))
            && summary.contains("(health check failed 3 times in a row (HTTP 503))")
            && summary.contains(&format!("on {B} until")),
        "{summary}"
    );
}

/// Without probes, an agent's failure older than the evidence window is no part of a quorum.
#[tokio::test(start_paused = true)]
async fn without_probes_a_stale_failure_makes_no_quorum() {
    let mut m = Monitor::new(AlertRules::default());
    let mut g = group(Duration::from_secs(300));
    g.probe = false;
    m.set_groups(vec![g]);
    for agent in ["vma-1", "vma-2"] {
        m.heartbeat(agent, &hb(vec![losing(A, B, 0)]), Instant::now());
    }
    for n in 1..=3 {
        m.heartbeat("vma-1", &hb(vec![losing(A, B, n)]), Instant::now());
    }
    tokio::time::advance(Duration::from_secs(61)).await;
    for n in 1..=6 {
        let a = m.heartbeat("vma-2", &hb(vec![losing(A, B, n)]), Instant::now());
        assert!(fired(&a, AlertKind::OmaDown).is_empty(), "{a:?}");
        tokio::time::advance(Duration::from_millis(100)).await;
    }
}
