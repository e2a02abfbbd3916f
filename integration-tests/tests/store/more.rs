//! The rest of this target's tests (helpers in `main.rs`).

use super::*;

/// Two coordinators on one etcd: each sees the other's changes, and versions come from etcd,
/// so the two never hand out one version twice, however their writes interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_on_one_etcd_share_the_state_and_never_repeat_a_version() {
    let Some(b) = Backend::etcd().await else {
        return;
    };
    let (one, two) = (b.open().await, b.open().await);
    assert_eq!(one.id(), two.id(), "one store, one identity");
    let writers: Vec<_> = [one.clone(), two.clone()]
        .into_iter()
        .enumerate()
        .map(|(w, s)| {
            tokio::spawn(async move {
                let mut versions = Vec::new();
                for i in 0..40 {
                    versions.push(s.put_profile(&spec(&format!("p{w}-{i}"))).await.unwrap());
                }
                versions
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await.unwrap());
    }
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 80, "a version handed out twice: {all:?}");
    assert_eq!(sorted, (1..=80).collect::<Vec<u64>>());
    // Each sees all eighty, whoever wrote them (the watch carries the other's).
    integration_tests::wait_until(10, "both see every profile", || async {
        one.profiles().unwrap().len() == 80 && two.profiles().unwrap().len() == 80
    })
    .await;
    assert_eq!(one.fleet_version().unwrap(), 80);
    integration_tests::wait_until(10, "the other sees the version", || async {
        two.fleet_version().unwrap() == 80
    })
    .await;
    // Plain writes (an agent's record) reach the other too.
    let rec = tunnelfleet_coordinator::store::AgentRecord {
        id: "vma-7".into(),
        ..Default::default()
    };
    one.record_agent(&rec).await.unwrap();
    integration_tests::wait_until(10, "the other sees the agent", || async {
        two.agent("vma-7").unwrap().is_some()
    })
    .await;
    // Ids (events, alerts) never collide either.
    let (a, b) = tokio::join!(
        one.fire_alert(
            tunnelfleet_coordinator::store::Alert::firing(
                tunnelfleet_coordinator::store::AlertKind::OmaDown,
                "oma-a:443".into(),
                "down".into(),
                vec![],
            ),
            &[],
        ),
        two.fire_alert(
            tunnelfleet_coordinator::store::Alert::firing(
                tunnelfleet_coordinator::store::AlertKind::OmaDown,
                "oma-b:443".into(),
                "down".into(),
                vec![],
            ),
            &[],
        )
    );
    assert_ne!(a.unwrap().id, b.unwrap().id);
}

/// A coordinator starting on a store bigger than one gRPC message (4 MiB: a fleet whose
/// profiles and their history add up) loads it whole: its pages shrink until each fits. (Found
/// by bench-chaos: a coordinator killed -9 could not start again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_larger_than_one_grpc_message_loads_in_pages_that_fit() {
    let Some(b) = Backend::etcd().await else {
        return;
    };
    let first = b.open().await;
    // Twelve profiles of 100 kB: 1.2 MB of profiles, and their history (each revision holds
    // every profile after it) 7.8 MB more.
    let big = "x".repeat(100_000);
    for i in 0..12 {
        let mut p = spec(&format!("big-{i}"));
        p.description = big.clone();
        first.put_profile(&p).await.unwrap();
    }
    let second = b.second(&first).await;
    let names: Vec<String> = second
        .profiles()
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names.len(), 12, "{names:?}");
    assert_eq!(second.history(100).unwrap().len(), 12);
}

/// Three etcd members: losing one changes nothing; losing two refuses writes with an error
/// that says etcd is the reason, while reads go on from what was committed; with quorum back,
/// writes go through again and everything acknowledged is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_store_refuses_writes_without_quorum_and_resumes_with_it() {
    if !integration_tests::EtcdCluster::available("etcd quorum") {
        return;
    }
    let mut cluster = integration_tests::EtcdCluster::start(3).await;
    let mut cfg = cluster.store_config("/q/");
    // Long enough for etcd to elect a new leader when the one lost led (under a second with
    // the test members' timings), short enough to see a refusal without waiting long.
    cfg.timeout = std::time::Duration::from_secs(3);
    let s = Store::open_etcd(&cfg).await.unwrap();
    assert_eq!(s.put_profile(&spec("oma")).await.unwrap(), 1);

    // One member lost: nothing stops. (If it led, etcd elects another first: a write in
    // that moment can time out, its outcome unknown; the next goes through.)
    cluster.kill(2);
    let two = std::sync::Mutex::new(0);
    integration_tests::wait_until(20, "writes go on with one member lost", || async {
        match s.put_profile(&spec("nbd")).await {
            Ok(v) => {
                *two.lock().unwrap() = v;
                true
            }
            Err(_) => false,
        }
    })
    .await;
    let two = *two.lock().unwrap();
    assert!(two >= 2, "{two}");
    assert!(s.agents().is_ok(), "reads answer");

    // Two lost: no quorum. The change is refused, naming etcd; reads still answer.
    cluster.kill(1);
    let e = s.put_profile(&spec("api")).await.unwrap_err();
    assert!(matches!(e, StoreError::Etcd { .. }), "{e}");
    assert!(
        e.to_string().contains("etcd") && e.to_string().contains("127.0.0.1"),
        "{e}"
    );
    assert_eq!(s.profiles().unwrap().len(), 2);
    assert_eq!(s.fleet_version().unwrap(), two);

    // Quorum back: writes resume, and what was acknowledged is all there. (The refused change
    // may still be applied: a member that took it before it lost the others keeps it in its
    // log; its caller was told the outcome is unknown, never that it was made.)
    cluster.restart(1);
    cluster.restart(2);
    cluster.wait_healthy().await;
    let v = std::sync::Mutex::new(None);
    integration_tests::wait_until(30, "writes accepted again", || async {
        match s.put_profile(&spec("after")).await {
            Ok(version) => {
                *v.lock().unwrap() = Some(version);
                true
            }
            Err(_) => false,
        }
    })
    .await;
    let v = v.lock().unwrap().unwrap();
    assert!(v > two, "{v} after {two}");
    assert_eq!(s.fleet_version().unwrap(), v);
    let names: Vec<_> = s.profiles().unwrap().into_iter().map(|p| p.name).collect();
    for acked in ["oma", "nbd", "after"] {
        assert!(names.iter().any(|n| n == acked), "{acked} lost: {names:?}");
    }
}

// What only sled has: stores written by older and newer coordinators (the schema check,
// migrations, indexes built at open), made with sled itself.

#[tokio::test]
async fn a_store_from_a_newer_coordinator_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"schema_version", &99u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    // The handle above lets go of sled's file lock a moment after its drop.
    let e = integration_tests::retry_until(10, "the store's file lock", || {
        let e = Store::open(dir.path()).err().unwrap().to_string();
        (!e.contains("could not acquire lock")).then_some(e)
    });
    assert!(
        e.contains("schema version 99") && e.contains(&dir.path().display().to_string()),
        "{e}"
    );
}

/// A profile as a protocol-3 coordinator stored it (durations as `*_ms`).
const V3_PROFILE: &str = r#"{"name":"oma","group":null,"description":"","endpoints":["oma-a:443"],"user":"vma","identity_file":"/etc/tunnelfleet/id","known_hosts":"/etc/tunnelfleet/known_hosts","host_key_fingerprints":[],"trust_on_first_use":false,"forwards":["L 8082:localhost:8082"],"connect_timeout_ms":15000,"keepalive_interval_ms":2000,"keepalive_count":3,"reconnect_min_ms":500,"reconnect_max_ms":30000,"failover_after":3,"health":{"http":"http://localhost:8082/health","tcp":null,"interval_ms":60000,"timeout_ms":5000,"threshold":3},"jump":[]}"#;

#[tokio::test]
async fn a_schema_1_store_is_migrated_profiles_and_history_alike() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert(b"schema_version", &1u64.to_be_bytes())
            .unwrap();
        db.open_tree("profiles")
            .unwrap()
            .insert(b"oma", V3_PROFILE.as_bytes())
            .unwrap();
        let rev = format!(
            r#"{{"version":7,"at_unix_ms":1,"what":"profile oma applied","profiles":[{V3_PROFILE}],"assignments":[]}}"#
        );
        db.open_tree("history")
            .unwrap()
            .insert(7u64.to_be_bytes(), rev.as_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let store = open_when_released(dir.path());
    let p = &store.profiles().unwrap()[0];
    assert_eq!(p.keepalive_interval, std::time::Duration::from_secs(2));
    assert_eq!(
        p.health.as_ref().unwrap().interval,
        std::time::Duration::from_secs(60)
    );
    assert_eq!(&store.revision(7).unwrap().profiles[0], p);
    drop(store);
    // Opened again: already schema 2, nothing to do, same data.
    let store = open_when_released(dir.path());
    assert_eq!(&store.profiles().unwrap()[0], p);
}

/// Firing alerts are read through their own index: resolved ones drop out of it, a reopen
/// keeps it, and a store written before the index existed gets it built at open.
#[tokio::test]
async fn firing_alerts_are_read_through_an_index_kept_across_reopen_and_built_for_old_stores() {
    use tunnelfleet_coordinator::store::{Alert, AlertKind};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let a = Alert::firing(
            AlertKind::TunnelHealth,
            format!("vma-{i}/oma"),
            "failing".into(),
            vec![format!("vma-{i}")],
        );
        ids.push(store.fire_alert(a, &[]).await.unwrap().id);
    }
    store.resolve_alert(ids[1], &[]).await.unwrap();
    store.resolve_alert(ids[3], &[]).await.unwrap();
    store.ack_alert(ids[2], "ops").await.unwrap();
    let firing =
        |s: &Store| -> Vec<u64> { s.alerts(false).unwrap().iter().map(|a| a.id).collect() };
    assert_eq!(firing(&store), vec![ids[4], ids[2], ids[0]]);
    assert_eq!(store.alerts(true).unwrap().len(), 5);
    drop(store);
    let store = open_when_released(dir.path());
    assert_eq!(firing(&store), vec![ids[4], ids[2], ids[0]]);
    drop(store);

    // As a store of the previous version left it: no index, no marker.
    {
        let db =
            integration_tests::retry_until(10, "sled's file lock", || sled::open(dir.path()).ok());
        db.drop_tree("firing").unwrap();
        db.open_tree("meta")
            .unwrap()
            .remove("firing_indexed")
            .unwrap();
        db.flush().unwrap();
    }
    let store = open_when_released(dir.path());
    assert_eq!(firing(&store), vec![ids[4], ids[2], ids[0]]);
}

/// On sled one coordinator owns the store: a run under another name replaces the record an
/// earlier run left, and it leads from the start.
#[tokio::test]
async fn a_sled_store_lists_only_the_coordinator_running_now() {
    use tunnelfleet_coordinator::store::CoordinatorRecord;
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let me = |name: &str| CoordinatorRecord {
        name: name.into(),
        control: "127.0.0.1:4433".into(),
        admin: "127.0.0.1:4480".into(),
        web: None,
        started_unix_ms: 1,
        version: "test".into(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let m = s
        .join(
            me("old-host"),
            std::time::Duration::from_secs(3),
            stop.clone(),
        )
        .await
        .unwrap();
    assert!(m.standing().leads());
    drop(m);
    let m = s
        .join(me("new-host"), std::time::Duration::from_secs(3), stop)
        .await
        .unwrap();
    assert!(m.standing().leads());
    let names: Vec<String> = s
        .coordinators()
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["new-host".to_string()]);
    assert_eq!(s.leader().unwrap().as_deref(), Some("new-host"));
}
