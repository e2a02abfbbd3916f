//! The store on every engine: the same tests on embedded sled and on a real etcd (one member
//! on loopback): versions, assignments by id and label, join tokens spent
//! once (also when two coordinators race for one), idempotency keys, a staged rollout across
//! a reopen, many writers at once. On etcd, also what only several coordinators can do:
//! two stores on one etcd see each other's writes and never hand out one version twice. And
//! what only sled has: stores left by older and newer coordinators.

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

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Where a test's store lives: a sled directory, or a prefix on a real etcd.
enum Backend {
    Sled(tempfile::TempDir),
    Etcd(std::sync::Arc<integration_tests::EtcdCluster>, String),
}

impl Backend {
    fn sled() -> Backend {
        Backend::Sled(tempfile::tempdir().unwrap())
    }

    /// A fresh store on a new one-member etcd, or None when etcd is not here (skipped).
    async fn etcd() -> Option<Backend> {
        if !integration_tests::EtcdCluster::available("store on etcd") {
            return None;
        }
        let cluster = integration_tests::EtcdCluster::start(1).await;
        Some(Backend::Etcd(std::sync::Arc::new(cluster), "/t/".into()))
    }

    /// Another, empty store beside this one (another directory; another prefix on the
    /// same etcd).
    fn another(&self) -> Backend {
        match self {
            Backend::Sled(_) => Backend::sled(),
            Backend::Etcd(c, p) => Backend::Etcd(c.clone(), format!("{p}other/")),
        }
    }

    /// Opens the store (again: what a restarted coordinator does).
    async fn open(&self) -> Store {
        match self {
            Backend::Sled(dir) => open_when_released(dir.path()),
            Backend::Etcd(c, prefix) => Store::open_etcd(&c.store_config(prefix)).await.unwrap(),
        }
    }

    /// A second handle on the same state: the same store for sled (one process owns a
    /// directory), a second coordinator's store for etcd.
    async fn second(&self, first: &Store) -> Store {
        match self {
            Backend::Sled(_) => first.clone(),
            Backend::Etcd(..) => self.open().await,
        }
    }
}

/// Opens the store once the previous handle in this process has released sled's file lock
/// (its background flusher lets go a moment after the drop).
fn open_when_released(dir: &std::path::Path) -> Store {
    integration_tests::retry_until(10, "the store's file lock", || match Store::open(dir) {
        Ok(s) => Some(s),
        Err(e) if e.to_string().contains("could not acquire lock") => None,
        Err(e) => panic!("{}: {e}", dir.display()),
    })
}

/// `name` on sled and on etcd.
macro_rules! on_every_engine {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() {
                super::$name(super::Backend::sled()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                if let Some(b) = super::Backend::etcd().await {
                    super::$name(b).await
                }
            }
        }
    };
}

async fn versions_assignments_and_deletes(b: Backend) {
    let s = b.open().await;
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

on_every_engine!(versions_assignments_and_deletes);

/// Regression: hundreds of agents connecting at once each made a durable record; sled's flush
/// pool filled with flushes waiting for writes that needed the same pool, and the store hung
/// (found by bench-fleet). Concurrent durable writes and a transaction must all finish.
async fn many_concurrent_durable_writes_do_not_deadlock_the_store(b: Backend) {
    let s = b.open().await;
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

on_every_engine!(many_concurrent_durable_writes_do_not_deadlock_the_store);

async fn a_join_token_is_spent_once_within_its_lifetime_and_only_by_its_agent(b: Backend) {
    use tunnelfleet_coordinator::enroll::{new_token, token_hash};
    use tunnelfleet_coordinator::store::JoinToken;
    let store = b.open().await;
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
    let store = b.open().await;
    assert!(refused(store.spend_token(&hash, "vma-9", 10, false).await).contains("already used"));
}

on_every_engine!(a_join_token_is_spent_once_within_its_lifetime_and_only_by_its_agent);

/// Two unrestricted tokens racing to enroll the same new id: exactly one wins, every time
/// (the id is claimed in the same transaction that spends the token), also when the racers
/// are two coordinators on one etcd.
async fn two_tokens_racing_for_one_new_id_enroll_it_once(b: Backend) {
    use tunnelfleet_coordinator::enroll::new_token;
    use tunnelfleet_coordinator::store::JoinToken;
    let store = b.open().await;
    // On etcd the second racer is another coordinator's store.
    let other = b.second(&store).await;
    for round in 0..100 {
        let id = format!("vma-race-{round}");
        let mut hashes = Vec::new();
        for site in ["dc1", "dc2"] {
            let (_, hash, token_id) = new_token();
            store
                .put_token(
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
                )
                .await
                .unwrap();
            hashes.push(hash);
        }
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let racers: Vec<_> = [store.clone(), other.clone()]
            .into_iter()
            .zip(hashes)
            .map(|(s, h)| {
                let (barrier, id) = (barrier.clone(), id.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.spend_token(&h, &id, 1, false).await
                })
            })
            .collect();
        let mut won = Vec::new();
        for r in racers {
            match r.await.unwrap() {
                Ok(_) => won.push(true),
                Err(StoreError::TokenRefused(why)) => {
                    assert!(why.contains("already enrolled"), "{why}");
                    won.push(false)
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round}: {won:?}, labels now {:?}",
            store.agent(&id).unwrap().map(|r| r.enrolled_labels)
        );
    }
}

on_every_engine!(two_tokens_racing_for_one_new_id_enroll_it_once);

/// A state directory recreated from scratch starts its alert ids again: its idempotency keys
/// must not repeat the old directory's, or a receiver that remembers keys drops new incidents
/// as duplicates. Keys carry the store's own identity, kept across reopen.
async fn idempotency_keys_differ_between_state_directories_and_survive_a_reopen(b: Backend) {
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
    for b in [b.another(), b] {
        let store = b.open().await;
        let a = store.fire_alert(alert(), &["ops".into()]).await.unwrap();
        let key = store.deliveries().unwrap()[0].idempotency_key.clone();
        assert!(key.contains(&format!("alert-{}-firing", a.id)), "{key}");
        // Reopened: the same identity, so a retried delivery keeps its key.
        drop(store);
        let store = b.open().await;
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

on_every_engine!(idempotency_keys_differ_between_state_directories_and_survive_a_reopen);

/// A staged rollout as the store keeps it: the stage reached and what the fleet ran before
/// survive a reopen; agents not promoted get the previous profiles, promoted ones the new;
/// other profile changes wait for it; an abort restores the previous profiles as a new version.
async fn a_rollout_survives_a_reopen_holds_the_unpromoted_back_and_aborts_to_the_old(b: Backend) {
    use tunnelfleet_coordinator::store::{Rollout, RolloutState, Stage};
    let s = b.open().await;
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

    let s = b.open().await;
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
    // A step or a note worked out on the rollout before the abort (the leader's driver while
    // an operator aborts on another coordinator) does not bring it back.
    for late in [
        s.note_rollout(&again).await.map(|_| 0),
        s.step_rollout(&again, "wave 2 gets it").await,
    ] {
        assert!(
            matches!(late, Err(StoreError::NoRolloutInProgress)),
            "{late:?}"
        );
    }
    assert!(s.active_rollout().unwrap().is_none());
    s.put_profile(&spec("nbd")).await.unwrap();
}

on_every_engine!(a_rollout_survives_a_reopen_holds_the_unpromoted_back_and_aborts_to_the_old);

/// Changes racing from two coordinators (two handles on one sled store; two stores on one
/// etcd) are serializable: every revision is exactly the one before it with its own change
/// applied, and a rollback removes a profile added the moment before it. A change worked out
/// on a version another change moved past is worked out again, never committed on the view
/// it had.
async fn changes_racing_from_two_coordinators_are_serializable(b: Backend) {
    let one = b.open().await;
    let two = b.second(&one).await;
    let v0 = one.put_profile(&spec("base")).await.unwrap();
    integration_tests::wait_until(10, "the second store sees the first change", || async {
        two.fleet_version().unwrap() == v0
    })
    .await;
    // The 409 an operator would see after too many lost races: run it again.
    macro_rules! again {
        ($change:expr) => {
            loop {
                match $change.await {
                    Err(StoreError::FleetChanged { .. }) => continue,
                    r => break r.unwrap(),
                }
            }
        };
    }
    let writer = |s: Store, prefix: &'static str| {
        tokio::spawn(async move {
            for i in 0..15 {
                let p = spec(&format!("{prefix}{i}"));
                again!(s.put_profile(&p));
            }
        })
    };
    let rollbacks = {
        let s = two.clone();
        tokio::spawn(async move {
            for _ in 0..8 {
                again!(s.rollback(v0));
            }
        })
    };
    let (w1, w2) = (writer(one.clone(), "a"), writer(two.clone(), "b"));
    for t in [w1, w2, rollbacks] {
        t.await.unwrap();
    }
    // One version per change, none lost or doubled (on etcd, once this store's mirror has
    // the other's last change).
    let last = v0 + 30 + 8;
    integration_tests::wait_until(10, "the first store at the last version", || async {
        one.fleet_version().unwrap() == last
    })
    .await;
    let names = |profiles: &[ProfileSpec]| -> Vec<String> {
        let mut n: Vec<String> = profiles.iter().map(|p| p.name.clone()).collect();
        n.sort();
        n
    };
    let mut before = names(&one.revision(v0).unwrap().profiles);
    assert_eq!(before, vec!["base".to_string()]);
    for v in v0 + 1..=last {
        let rev = one.revision(v).unwrap();
        let expected = if rev.what.starts_with("rollback") {
            vec!["base".to_string()]
        } else {
            let added = rev
                .what
                .strip_prefix("profile ")
                .and_then(|w| w.strip_suffix(" applied"))
                .unwrap_or_else(|| panic!("revision {v}: {:?}", rev.what));
            let mut n = before.clone();
            n.push(added.to_string());
            n.sort();
            n
        };
        assert_eq!(
            names(&rev.profiles),
            expected,
            "revision {v} ({:?}) is not revision {} with its change",
            rev.what,
            v - 1
        );
        before = expected;
    }
    assert_eq!(names(&one.profiles().unwrap()), before);
    // The other coordinator comes to the same state (etcd: once its mirror has the last
    // change).
    integration_tests::wait_until(10, "the second store sees the last change", || async {
        two.fleet_version().unwrap() == last
    })
    .await;
    assert_eq!(names(&two.profiles().unwrap()), before);
    assert_eq!(two.snapshot().unwrap().version, last);
}

on_every_engine!(changes_racing_from_two_coordinators_are_serializable);

mod more;
