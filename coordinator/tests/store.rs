//! The sled store: versions, assignments by id and label, schema check, and acknowledged
//! writes surviving kill -9 of a real process.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::collections::BTreeMap;

use tunnelfleet_coordinator::store::{Assignment, Selector, Store, StoreError};
use tunnelfleet_protocol::ProfileSpec;

fn spec(name: &str) -> ProfileSpec {
    let mut p = ProfileSpec::new(name, "vma", "/etc/tunnelfleet/id");
    p.endpoints = vec!["oma-a:443".into(), "oma-b:443".into()];
    p.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
    p.forwards = vec!["L 8082:localhost:8082".into()];
    p
}

/// Opens the store once the previous handle in this process has released sled's file lock
/// (its background flusher lets go a moment after the drop).
fn open_when_released(dir: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{}: {e}", dir.display()),
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn versions_assignments_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.fleet_version().unwrap(), 0);
    assert_eq!(s.put_profile(&spec("oma")).await.unwrap(), 1);
    assert_eq!(s.put_profile(&spec("nbd")).await.unwrap(), 2);
    let by_label = Assignment {
        profile: "oma".into(),
        selector: Selector::Labels(labels(&[("site", "dc1")])),
    };
    assert_eq!(s.assign(&by_label).await.unwrap(), 3);
    let by_id = Assignment {
        profile: "nbd".into(),
        selector: Selector::Agent("vma-9".into()),
    };
    assert_eq!(s.assign(&by_id).await.unwrap(), 4);
    let names = |set: tunnelfleet_protocol::ProfileSet| {
        set.profiles.into_iter().map(|p| p.name).collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            s.profiles_for("vma-1", &labels(&[("site", "dc1"), ("rack", "3")]))
                .unwrap()
        ),
        vec!["oma"]
    );
    assert_eq!(
        names(
            s.profiles_for("vma-9", &labels(&[("site", "dc1")]))
                .unwrap()
        ),
        vec!["nbd", "oma"]
    );
    assert!(
        names(
            s.profiles_for("vma-2", &labels(&[("site", "dc2")]))
                .unwrap()
        )
        .is_empty()
    );
    assert_eq!(s.profiles_for("x", &BTreeMap::new()).unwrap().version, 4);
    // Unknown profiles are refused and change nothing.
    let ghost = Assignment {
        profile: "ghost".into(),
        selector: Selector::Agent("a".into()),
    };
    assert!(matches!(
        s.assign(&ghost).await,
        Err(StoreError::NoProfile(_))
    ));
    assert_eq!(s.fleet_version().unwrap(), 4);
    // Deleting a profile removes its assignments.
    assert_eq!(s.delete_profile("oma").await.unwrap(), 5);
    assert_eq!(s.assignments().unwrap(), vec![by_id]);
    assert!(matches!(
        s.delete_profile("oma").await,
        Err(StoreError::NoProfile(_))
    ));
    let ev = s.events(10).unwrap();
    assert_eq!(ev.len(), 5);
    assert!(ev.last().unwrap().text.contains("profile oma deleted"));
}

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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let e = loop {
        // The handle above lets go of sled's file lock a moment after its drop.
        let e = Store::open(dir.path()).err().unwrap().to_string();
        if !e.contains("could not acquire lock") || std::time::Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
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

/// Regression: hundreds of agents connecting at once each made a durable record; sled's flush
/// pool filled with flushes waiting for writes that needed the same pool, and the store hung
/// (found by bench-fleet). Concurrent durable writes and a transaction must all finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_durable_writes_do_not_deadlock_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let rec = tunnelfleet_coordinator::store::AgentRecord {
                id: format!("a{i}"),
                ..Default::default()
            };
            s.record_agent(&rec).await.unwrap();
        }));
    }
    let writer = {
        let s = s.clone();
        tokio::spawn(async move { s.put_profile(&spec("oma")).await.unwrap() })
    };
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
        writer.await.unwrap()
    };
    let version = tokio::time::timeout(std::time::Duration::from_secs(60), all)
        .await
        .expect("store writes hung");
    assert_eq!(version, 1);
    assert_eq!(s.agents().unwrap().len(), 300);
}

#[tokio::test]
async fn a_join_token_is_spent_once_within_its_lifetime_and_only_by_its_agent() {
    use tunnelfleet_coordinator::enroll::{new_token, token_hash};
    use tunnelfleet_coordinator::store::JoinToken;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let token = |agent: Option<&str>, expires: u64| JoinToken {
        id: String::new(),
        labels: [("site".to_string(), "dc1".to_string())].into(),
        agent: agent.map(str::to_string),
        created_unix_ms: 0,
        expires_unix_ms: expires,
        used_by: None,
        used_unix_ms: None,
    };
    let refused = |r: Result<JoinToken, StoreError>| match r {
        Err(StoreError::TokenRefused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (secret, hash, id) = new_token();
    assert_eq!(token_hash(&secret), hash);
    assert!(hash.starts_with(&id));
    store
        .put_token(
            &hash,
            &JoinToken {
                id,
                ..token(None, 1_000)
            },
        )
        .await
        .unwrap();
    // The last millisecond of its life is too late.
    assert!(refused(store.spend_token(&hash, "vma-1", 1_000, false).await).contains("expired"));
    let t = store.spend_token(&hash, "vma-1", 999, false).await.unwrap();
    assert_eq!(t.used_by.as_deref(), Some("vma-1"));
    assert_eq!(
        store.agent("vma-1").unwrap().unwrap().enrolled_labels["site"],
        "dc1"
    );
    assert!(refused(store.spend_token(&hash, "vma-2", 10, false).await).contains("already used"));
    assert!(refused(store.spend_token("nope", "vma-2", 10, false).await).contains("unknown"));

    // A token for one agent is useless to another; a known agent needs a token naming it.
    let (_, h2, id2) = new_token();
    store
        .put_token(
            &h2,
            &JoinToken {
                id: id2,
                ..token(Some("vma-1"), 5_000)
            },
        )
        .await
        .unwrap();
    assert!(refused(store.spend_token(&h2, "vma-3", 10, false).await).contains("is for agent"));
    let (_, h3, id3) = new_token();
    store
        .put_token(
            &h3,
            &JoinToken {
                id: id3,
                ..token(None, 5_000)
            },
        )
        .await
        .unwrap();
    assert!(refused(store.spend_token(&h3, "vma-1", 10, false).await).contains("already enrolled"));
    store.spend_token(&h2, "vma-1", 10, false).await.unwrap();

    // Spent stays spent across a reopen.
    drop(store);
    let store = open_when_released(dir.path());
    assert!(refused(store.spend_token(&hash, "vma-9", 10, false).await).contains("already used"));
}

/// Two unrestricted tokens racing to enroll the same new id: exactly one wins, every time
/// (the id is claimed in the same transaction that spends the token).
#[test]
fn two_tokens_racing_for_one_new_id_enroll_it_once() {
    use tunnelfleet_coordinator::enroll::new_token;
    use tunnelfleet_coordinator::store::JoinToken;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for round in 0..200 {
        let id = format!("vma-race-{round}");
        let hashes: Vec<String> = ["dc1", "dc2"]
            .iter()
            .map(|site| {
                let (_, hash, token_id) = new_token();
                rt.block_on(store.put_token(
                    &hash,
                    &JoinToken {
                        id: token_id,
                        labels: [("site".to_string(), site.to_string())].into(),
                        agent: None,
                        created_unix_ms: 0,
                        expires_unix_ms: u64::MAX,
                        used_by: None,
                        used_unix_ms: None,
                    },
                ))
                .unwrap();
                hash
            })
            .collect();
        let barrier = std::sync::Barrier::new(2);
        let won: Vec<bool> = std::thread::scope(|s| {
            let racers: Vec<_> = hashes
                .iter()
                .map(|h| {
                    let (store, barrier, id) = (&store, &barrier, &id);
                    s.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .build()
                            .unwrap();
                        barrier.wait();
                        rt.block_on(store.spend_token(h, id, 1, false)).is_ok()
                    })
                })
                .collect();
            racers.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round}: {won:?}, labels now {:?}",
            store.agent(&id).unwrap().map(|r| r.enrolled_labels)
        );
    }
}

/// A state directory recreated from scratch starts its alert ids again: its idempotency keys
/// must not repeat the old directory's, or a receiver that remembers keys drops new incidents
/// as duplicates. Keys carry the store's own identity, kept across reopen.
#[tokio::test]
async fn idempotency_keys_differ_between_state_directories_and_survive_a_reopen() {
    use tunnelfleet_coordinator::store::{Alert, AlertKind};
    let alert = || {
        Alert::firing(
            AlertKind::OmaDown,
            "oma-a:443".into(),
            "down".into(),
            vec![],
        )
    };
    let mut keys = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.fire_alert(alert(), &["ops".into()]).await.unwrap();
        let key = store.deliveries().unwrap()[0].idempotency_key.clone();
        assert!(key.contains(&format!("alert-{}-firing", a.id)), "{key}");
        // Reopened: the same identity, so a retried delivery keeps its key.
        drop(store);
        let store = open_when_released(dir.path());
        store.resolve_alert(a.id, &["ops".into()]).await.unwrap();
        let resolved = store.deliveries().unwrap()[1].idempotency_key.clone();
        assert_eq!(
            resolved,
            key.replace("-firing", "-resolved"),
            "another identity after a reopen"
        );
        keys.push(key);
    }
    assert_ne!(keys[0], keys[1], "two state directories, one key");
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
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

/// A staged rollout as the store keeps it: the stage reached and what the fleet ran before
/// survive a reopen; agents not promoted get the previous profiles, promoted ones the new;
/// other profile changes wait for it; an abort restores the previous profiles as a new version.
#[tokio::test]
async fn a_rollout_survives_a_reopen_holds_the_unpromoted_back_and_aborts_to_the_old() {
    use tunnelfleet_coordinator::store::{Rollout, RolloutState, Stage};
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    s.put_profile(&spec("oma")).await.unwrap();
    let base = s
        .assign(&Assignment {
            profile: "oma".into(),
            selector: Selector::Labels(labels(&[("site", "dc1")])),
        })
        .await
        .unwrap();
    let mut changed = spec("oma");
    changed.forwards.push("L 10809:localhost:10809".into());
    let stage = |name: &str, agents: &[&str]| Stage {
        name: name.into(),
        agents: agents.iter().map(|a| a.to_string()).collect(),
        started_unix_ms: None,
        passed_unix_ms: None,
        offline: vec![],
    };
    let plan = Rollout {
        version: 0,
        base_version: base,
        what: "staged rollout of profiles oma".into(),
        started_by: "test".into(),
        started_unix_ms: 1,
        wait_ms: 1000,
        settle_ms: 10_000,
        stages: vec![stage("canary", &["vma-1"]), stage("wave 1", &["vma-2"])],
        current: 0,
        state: RolloutState::Running,
        reasons: BTreeMap::new(),
        halted_unix_ms: None,
        reverted: Default::default(),
        alert: None,
        finished_unix_ms: None,
        base_profiles: vec![],
        base_assignments: vec![],
    };
    // Planned on an older version: refused.
    let mut stale = plan.clone();
    stale.base_version = base - 1;
    assert!(matches!(
        s.start_rollout(&[changed.clone()], stale)
            .await
            .unwrap_err(),
        StoreError::FleetChanged { .. }
    ));
    let r = s.start_rollout(&[changed.clone()], plan).await.unwrap();
    assert_eq!(r.version, base + 1);
    assert!(matches!(
        s.put_profile(&spec("nbd")).await.unwrap_err(),
        StoreError::RolloutInProgress(v) if v == r.version
    ));
    let dc1 = labels(&[("site", "dc1")]);
    let forwards = |s: &Store, id: &str| {
        s.snapshot().unwrap().set_for(id, &dc1).profiles[0]
            .forwards
            .len()
    };
    assert_eq!(forwards(&s, "vma-1"), 2, "the canary runs the new version");
    assert_eq!(forwards(&s, "vma-2"), 1, "the wave waits on the old one");
    let mut r = r;
    r.current = 1;
    let promoted = s.step_rollout(&r, "wave 1 gets it").await.unwrap();
    assert_eq!(promoted, r.version + 1, "each step is a version of its own");
    drop(s);

    let s = open_when_released(dir.path());
    let again = s.active_rollout().unwrap().unwrap();
    assert_eq!(again.current, 1);
    assert_eq!(again.base_profiles, vec![spec("oma")]);
    assert_eq!(forwards(&s, "vma-2"), 2);
    assert_eq!(forwards(&s, "vma-3"), 1, "in no stage: held until done");
    let (v, closed) = s.abort_rollout().await.unwrap();
    assert_eq!(v, promoted + 1);
    assert_eq!(closed.state, RolloutState::Aborted);
    assert!(s.active_rollout().unwrap().is_none());
    assert_eq!(
        s.last_rollout().unwrap().unwrap().state,
        RolloutState::Aborted
    );
    assert_eq!(s.profiles().unwrap(), vec![spec("oma")]);
    assert_eq!(forwards(&s, "vma-1"), 1);
    s.put_profile(&spec("nbd")).await.unwrap();
}
