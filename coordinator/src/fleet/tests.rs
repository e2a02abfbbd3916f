//! The registry's rules: offline and back, coalesced heartbeats, the hello rate.
#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use super::*;

#[tokio::test(start_paused = true)]
async fn offline_after_three_missed_heartbeats_and_back_on_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _events) = Fleet::new(Store::open(dir.path()).unwrap(), Duration::from_secs(5));
    fleet.links.lock().insert(
        "vma-1".into(),
        (
            AgentLink::connected(
                "vma-1",
                SocketAddr::from(([127, 0, 0, 1], 1)),
                BTreeMap::new(),
            ),
            None,
        ),
    );
    tokio::time::advance(Duration::from_secs(15)).await;
    assert!(
        fleet.sweep(Instant::now()).is_empty(),
        "three intervals exactly is not yet three missed"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(fleet.sweep(Instant::now()), vec!["vma-1"]);
    assert!(fleet.sweep(Instant::now()).is_empty(), "reported once");
    fleet.heard(
        "vma-1",
        Some(Heartbeat {
            seq: 1,
            sent_unix_ms: 0,
            profiles: vec![],
        }),
    );
    let l = fleet.links.get("vma-1").unwrap();
    assert!(l.online && l.heartbeats == 1);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(fleet.sweep(Instant::now()).is_empty());
}

fn link(fleet: &Fleet, id: &str) {
    fleet.links.lock().insert(
        id.into(),
        (
            AgentLink::connected(id, SocketAddr::from(([127, 0, 0, 1], 1)), BTreeMap::new()),
            None,
        ),
    );
}

/// One agent's heartbeat flood can neither crowd out another agent's lifecycle events (a
/// bounded queue of both used to drop them once full) nor make the watcher judge every
/// one of its heartbeats: they are coalesced per agent, the latest kept.
#[tokio::test]
async fn a_heartbeat_flood_is_coalesced_and_never_drops_another_agents_events() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, mut events) = Fleet::new(Store::open(dir.path()).unwrap(), Duration::from_secs(5));
    link(&fleet, "hostile");
    link(&fleet, "honest");
    fleet.links.lock().get_mut("honest").unwrap().0.online = false;
    for seq in 1..=70_000 {
        fleet.heard(
            "hostile",
            Some(Heartbeat {
                seq,
                sent_unix_ms: 0,
                profiles: vec![],
            }),
        );
    }
    fleet.heard("honest", None);
    let mut lifecycle = Vec::new();
    while let Ok(ev) = events.try_recv() {
        lifecycle.push(ev);
    }
    assert!(
        matches!(&lifecycle[..], [FleetEvent::Online { agent }] if agent == "honest"),
        "{} events, last {:?}",
        lifecycle.len(),
        lifecycle.last()
    );
    let fresh = fleet.take_heartbeats();
    assert_eq!(fresh.len(), 1);
    assert_eq!((fresh[0].0.as_str(), fresh[0].1.seq), ("hostile", 70_000));
    assert!(fleet.take_heartbeats().is_empty(), "taken once");
    assert_eq!(fleet.links.get("hostile").unwrap().heartbeats, 70_000);
}

#[tokio::test(start_paused = true)]
async fn hellos_come_in_a_burst_then_one_every_two_seconds_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, _events) = Fleet::new(Store::open(dir.path()).unwrap(), Duration::from_secs(5));
    let t = Instant::now();
    for _ in 0..5 {
        assert!(fleet.hello_allowed("vma-1", t));
    }
    assert!(!fleet.hello_allowed("vma-1", t), "a sixth at once");
    assert!(
        fleet.hello_allowed("vma-2", t),
        "another agent is not held back"
    );
    assert!(!fleet.hello_allowed("vma-1", t + Duration::from_secs(1)));
    assert!(fleet.hello_allowed("vma-1", t + Duration::from_secs(3)));
    // Quiet for a while: the burst is back, no more.
    let later = t + Duration::from_secs(600);
    for _ in 0..5 {
        assert!(fleet.hello_allowed("vma-1", later));
    }
    assert!(!fleet.hello_allowed("vma-1", later));
}
