//! Where a session goes next, row by row: failover, failback, the health rule's table.
use super::*;

fn two() -> Placement {
    Placement::new(2, 3, Duration::from_secs(30), false)
}

#[test]
fn a_lost_session_moves_to_the_next_endpoint_at_once() {
    let mut p = two();
    let next = p.session_ended(Ended::Lost, Duration::from_secs(600));
    assert_eq!(next, Next::Move { from: 0, to: 1 });
    assert_eq!(p.current(), 1);
    // And from the standby to the next one (round robin).
    let next = p.session_ended(Ended::Lost, Duration::from_secs(1));
    assert_eq!(next, Next::Move { from: 1, to: 0 });
}

#[test]
fn a_single_endpoint_is_retried_and_a_short_session_counts_as_a_failure() {
    let mut p = Placement::new(1, 3, Duration::from_secs(30), false);
    assert_eq!(
        p.session_ended(Ended::Lost, Duration::from_secs(1)),
        Next::Retry
    );
    assert_eq!(p.failures(), 1);
    assert_eq!(
        p.session_ended(Ended::Lost, Duration::from_secs(2)),
        Next::Retry
    );
    assert_eq!(p.failures(), 2);
    // A stable session wipes the slate, then the loss itself counts once.
    p.session_ended(Ended::Lost, STABLE_SESSION);
    assert_eq!(p.failures(), 1);
}

#[test]
fn endpoints_that_all_throw_us_out_are_tried_after_the_backoff() {
    let mut p = two();
    let short = Duration::from_secs(2);
    // The first short session moves at once; the next (on the standby) waits.
    assert_eq!(
        p.session_ended(Ended::Lost, short),
        Next::Move { from: 0, to: 1 }
    );
    assert_eq!(
        p.session_ended(Ended::Lost, short),
        Next::MoveLater { from: 1, to: 0 }
    );
    assert_eq!(
        p.session_ended(Ended::Lost, short),
        Next::MoveLater { from: 0, to: 1 }
    );
    // A stable session ends the streak: its loss moves at once again.
    assert_eq!(
        p.session_ended(Ended::Lost, STABLE_SESSION),
        Next::Move { from: 1, to: 0 }
    );
    // A long session's loss followed by a short one: still one short loss, at once.
    assert_eq!(
        p.session_ended(Ended::Lost, short),
        Next::Move { from: 0, to: 1 }
    );
}

#[test]
fn connect_failures_move_after_failover_after_in_a_row() {
    let mut p = two();
    assert_eq!(p.connect_failed(ErrorKind::Timeout), Next::Retry);
    assert_eq!(p.connect_failed(ErrorKind::Connect), Next::Retry);
    assert_eq!(
        p.connect_failed(ErrorKind::Timeout),
        Next::Move { from: 0, to: 1 }
    );
    assert_eq!(p.failures(), 0);
}

#[test]
fn a_bastion_failure_never_counts_against_the_endpoint() {
    let mut p = Placement::new(2, 3, Duration::from_secs(30), true);
    for _ in 0..50 {
        assert_eq!(p.connect_failed(ErrorKind::Jump), Next::Retry);
        assert_eq!(
            p.session_ended(Ended::Lost, Duration::from_secs(1)),
            Next::Retry
        );
    }
    assert_eq!((p.current(), p.failures()), (0, 0));
    // The endpoint's own refusal behind the bastion still counts.
    p.connect_failed(ErrorKind::Connect);
    p.connect_failed(ErrorKind::Auth);
    assert_eq!(
        p.connect_failed(ErrorKind::Connect),
        Next::Move { from: 0, to: 1 }
    );
}

use HealthStep::{Fresh, Move, Stay};
const NONE: Evidence = Evidence::Unknown;

/// `n` others pass, none fail.
fn pass(n: u32) -> Evidence {
    Evidence::Others {
        passing: n,
        failing: 0,
    }
}

#[test]
fn health_one_endpoint_always_gets_a_fresh_session() {
    for threshold in [1, 2, 3, 5] {
        for failed in [threshold, 2 * threshold, 7 * threshold] {
            for refused in [false, true] {
                for ev in [NONE, pass(4)] {
                    assert_eq!(health_step(1, 0, failed, threshold, refused, ev), Fresh);
                }
            }
        }
    }
}

#[test]
fn health_first_crossing_tries_one_fresh_session_on_the_same_endpoint() {
    for threshold in [1, 2, 3, 5] {
        for failed in [threshold, 2 * threshold - 1] {
            assert_eq!(health_step(2, 0, failed, threshold, false, NONE), Fresh);
            // Evidence does not skip it: a fresh session may be all this appliance needs.
            let ev = pass(3);
            assert_eq!(health_step(3, 1, failed, threshold, false, ev), Fresh);
        }
    }
}

#[test]
fn health_fresh_refused_moves_to_the_others_in_priority_order() {
    // Threshold 2 (not 3): the first crossing is at 2, the next at 4.
    assert_eq!(health_step(2, 0, 2, 2, true, NONE), Move(vec![1]));
    assert_eq!(health_step(3, 0, 2, 2, true, NONE), Move(vec![1, 2]));
    assert_eq!(health_step(4, 2, 5, 5, true, NONE), Move(vec![3, 0, 1]));
    // No other agent passes: the same as no evidence.
    let none_pass = Evidence::Others {
        passing: 0,
        failing: 0,
    };
    assert_eq!(health_step(3, 1, 2, 2, true, none_pass), Move(vec![2, 0]));
}

#[test]
fn health_fresh_refused_stays_when_others_pass_through_the_endpoint() {
    let ev = pass(7);
    assert_eq!(
        health_step(3, 0, 4, 4, true, ev),
        Stay { others_passing: 7 }
    );
    assert_eq!(
        health_step(2, 1, 1, 1, true, pass(1)),
        Stay { others_passing: 1 }
    );
}

#[test]
fn health_moves_when_as_many_others_fail_there_as_pass() {
    // One agent claiming to pass (a stolen one, say) holds nobody who fails with others.
    let one_of_many = Evidence::Others {
        passing: 1,
        failing: 9,
    };
    assert_eq!(health_step(2, 0, 3, 3, true, one_of_many), Move(vec![1]));
    let even = Evidence::Others {
        passing: 2,
        failing: 2,
    };
    assert_eq!(health_step(3, 0, 6, 3, false, even), Move(vec![1, 2]));
    let most_pass = Evidence::Others {
        passing: 3,
        failing: 2,
    };
    assert_eq!(
        health_step(3, 0, 6, 3, false, most_pass),
        Stay { others_passing: 3 }
    );
}

#[test]
fn health_later_crossings_skip_the_fresh_session() {
    // Threshold 4: the first crossing is at 4, the later ones at 8, 12, …
    for failed in [8, 12, 40] {
        assert_eq!(health_step(3, 0, failed, 4, false, NONE), Move(vec![1, 2]));
        assert_eq!(
            health_step(3, 0, failed, 4, false, pass(2)),
            Stay { others_passing: 2 }
        );
    }
    // Threshold 1: every failure is a crossing, the second one is a later one.
    assert_eq!(health_step(2, 0, 1, 1, false, NONE), Fresh);
    assert_eq!(health_step(2, 0, 2, 1, false, NONE), Move(vec![1]));
}

#[tokio::test(start_paused = true)]
async fn evidence_counts_while_linked_and_fresh() {
    let c = Coordinated::default();
    c.evidence_heard("oma-a:443", 2, 0, Instant::now());
    // Not linked: the word of a coordinator that is gone does not count.
    assert_eq!(c.evidence("oma-a:443", Instant::now()), NONE);
    c.set(true);
    assert_eq!(c.evidence("oma-a:443", Instant::now()), pass(2));
    assert_eq!(c.evidence("oma-b:443", Instant::now()), NONE);
    tokio::time::advance(EVIDENCE_FRESH).await;
    assert_eq!(c.evidence("oma-a:443", Instant::now()), NONE);
    // Bounded: past the cap, new endpoints are not kept while the old are fresh.
    for i in 0..MAX_EVIDENCE + 10 {
        c.evidence_heard(&format!("e{i}:22"), 1, 0, Instant::now());
    }
    assert_eq!(c.0.evidence.lock().unwrap().len(), MAX_EVIDENCE);
    assert_eq!(c.evidence("e0:22", Instant::now()), pass(1));
    assert_eq!(
        c.evidence(&format!("e{MAX_EVIDENCE}:22"), Instant::now()),
        NONE
    );
}

#[test]
fn describe_says_the_profiles_own_numbers() {
    let toml = r#"
        name = "oma"
        endpoints = ["oma-a:443", "oma-b:443"]
        user = "vma"
        identity_file = "/k"
        known_hosts = "/kh"
        forwards = ["L 8082:localhost:8082"]
        keepalive_interval = "4s"
        failover_after = 2
        [health]
        http = "http://localhost:8082/health"
        interval = "7s"
        threshold = 5
    "#;
    let p: tunnelfleet_protocol::ProfileSpec = toml::from_str(toml).unwrap();
    let text = describe(&p);
    assert!(
        text.contains("dropped after 12s (keepalive 4s x 3)"),
        "{text}"
    );
    assert!(text.contains("connect failures: 2 in a row"), "{text}");
    assert!(
        text.contains("GET http://localhost:8082/health every 7s (timeout 5s); 5 failures in a row (about 35s)"),
        "{text}"
    );
    assert!(text.contains("answered for 30s"), "{text}");
}

#[test]
fn health_step_of_a_placement_is_from_where_it_is() {
    let mut p = Placement::new(3, 3, Duration::from_secs(30), false);
    p.moved(2);
    assert_eq!(p.health_step(3, 3, true, NONE), Move(vec![0, 1]));
    assert_eq!(p.health_step(3, 3, false, NONE), Fresh);
}

#[test]
fn an_operator_restart_is_not_a_failure() {
    let mut p = two();
    p.connect_failed(ErrorKind::Timeout);
    p.connect_failed(ErrorKind::Timeout);
    assert_eq!(
        p.session_ended(Ended::Restart, Duration::from_secs(1)),
        Next::Now
    );
    assert_eq!((p.current(), p.failures()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn failback_needs_the_preferred_endpoint_reachable_for_the_whole_stable_period() {
    let mut p = two();
    p.session_ended(Ended::Lost, Duration::from_secs(100));
    assert!(p.away());
    let probe = Duration::from_secs(5);
    // Reachable at 0, 5, 10, 15, 20, 25 s: not yet.
    for _ in 0..6 {
        assert!(!p.probed(true, Instant::now()));
        tokio::time::advance(probe).await;
    }
    // One miss restarts the period.
    assert!(!p.probed(false, Instant::now()));
    tokio::time::advance(probe).await;
    for _ in 0..6 {
        assert!(!p.probed(true, Instant::now()));
        tokio::time::advance(probe).await;
    }
    // Thirty seconds of answers in a row.
    assert!(p.probed(true, Instant::now()));
    // A refused move back starts the period again.
    p.failback_refused();
    assert!(!p.probed(true, Instant::now()));
    tokio::time::advance(Duration::from_secs(30)).await;
    assert!(p.probed(true, Instant::now()));
    p.moved(0);
    assert!(!p.away());
    // On the preferred endpoint nothing is probed.
    assert!(!p.probed(true, Instant::now()));
}

#[test]
fn a_retarget_keeps_the_session_where_it_is_listed() {
    let mut p = two();
    p.connect_failed(ErrorKind::Timeout);
    // The coordinator put our endpoint second: we are away now, with our count.
    p.retargeted(2, Some(1));
    assert!(p.away());
    assert_eq!(p.failures(), 1);
    // Our endpoint left the list: start on the first, afresh.
    p.retargeted(3, None);
    assert_eq!((p.current(), p.failures()), (0, 0));
}

/// A profile whose health went down asks the link for a heartbeat now: an ask made before the
/// link waits is still heard, and several asks before it sends are one heartbeat.
#[tokio::test(start_paused = true)]
async fn an_asked_heartbeat_is_not_lost_and_many_asks_are_one() {
    let c = Coordinated::default();
    c.report_now();
    c.report_now();
    tokio::time::timeout(Duration::from_secs(1), c.report_asked())
        .await
        .expect("asked before the link waited: still heard");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), c.report_asked())
            .await
            .is_err(),
        "two asks are one heartbeat"
    );
}

fn full_evidence(now: Instant) -> Coordinated {
    let c = Coordinated::default();
    c.set(true);
    for i in 0..MAX_EVIDENCE {
        c.evidence_heard(&format!("oma-{i}:22"), 1, 0, now);
    }
    c
}

/// With the table full, what the coordinator says of an endpoint already in it still replaces
/// the old word; a new endpoint waits for room.
#[test]
fn a_full_evidence_table_still_takes_news_of_its_endpoints() {
    let now = Instant::now();
    let c = full_evidence(now);
    c.evidence_heard("oma-7:22", 0, 5, now);
    assert_eq!(
        c.evidence("oma-7:22", now),
        Evidence::Others {
            passing: 0,
            failing: 5
        }
    );
    c.evidence_heard("new:22", 4, 0, now);
    assert_eq!(c.evidence("new:22", now), Evidence::Unknown);
}

/// Evidence as old as `EVIDENCE_FRESH` no longer counts, and makes room for a new endpoint.
#[test]
fn stale_evidence_makes_room() {
    let then = Instant::now();
    let c = full_evidence(then);
    let now = then + EVIDENCE_FRESH;
    assert_eq!(c.evidence("oma-1:22", now), Evidence::Unknown);
    c.evidence_heard("new:22", 4, 0, now);
    assert_eq!(
        c.evidence("new:22", now),
        Evidence::Others {
            passing: 4,
            failing: 0
        }
    );
}

/// A reconnect on the standby does not restart the preferred endpoint's stable period.
#[test]
fn a_reconnect_away_keeps_the_failback_clock() {
    let mut p = two();
    p.moved(1);
    let t0 = Instant::now();
    assert!(!p.probed(true, t0));
    p.connected();
    assert!(p.probed(true, t0 + Duration::from_secs(30)));
}

/// An index beyond the list (a shorter list pushed meanwhile) lands on the last endpoint.
#[test]
fn an_index_beyond_the_list_lands_on_its_last_endpoint() {
    let mut p = two();
    p.moved(5);
    assert_eq!(p.current(), 1);
    let mut p = Placement::new(4, 3, Duration::from_secs(30), false);
    p.retargeted(2, Some(7));
    assert_eq!(p.current(), 1);
}

/// With one endpoint there is nowhere to go: failures are counted, never a move.
#[test]
fn one_endpoint_only_retries() {
    let mut p = Placement::new(1, 3, Duration::from_secs(30), false);
    for _ in 0..10 {
        assert_eq!(p.connect_failed(ErrorKind::Timeout), Next::Retry);
    }
    assert_eq!(p.failures(), 10);
}
