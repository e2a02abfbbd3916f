//! Several coordinators on one etcd: one leads, the others follow; the leader's writes are
//! fenced by its lease, so a leader whose lease is gone cannot land a write after another one
//! took over; a leader that leaves hands over within the lease's TTL.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

#[cfg(not(feature = "etcd"))]
#[test]
fn ha_needs_the_etcd_store() {
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but the etcd store was not built: --features integration-tests/etcd");
    }
    integration_tests::skip::skipped(
        "coordinators on etcd",
        "built without the etcd feature (cargo test --features integration-tests/etcd; needs protoc)",
    );
}

#[cfg(feature = "etcd")]
mod on_etcd {
    use std::time::Duration;

    use integration_tests::{EtcdCluster, wait_until};
    use tokio_util::sync::CancellationToken;
    use tunnelfleet_coordinator::store::{
        CoordinatorRecord, Membership, Standing, Store, StoreError,
    };

    fn me(name: &str) -> CoordinatorRecord {
        CoordinatorRecord {
            name: name.into(),
            control: format!("{name}:4433"),
            admin: format!("{name}:4480"),
            web: None,
            started_unix_ms: 1,
            version: "test".into(),
        }
    }

    const TTL: Duration = Duration::from_secs(2);

    async fn join(s: &Store, name: &str, stop: &CancellationToken) -> Membership {
        s.join(me(name), TTL, stop.clone()).await.unwrap()
    }

    /// An alert fired through a membership's leader store: Ok for the leader only.
    async fn fire(m: &Membership, subject: &str) -> Result<u64, StoreError> {
        use tunnelfleet_coordinator::store::{Alert, AlertKind};
        m.leader_store()
            .fire_alert(
                Alert::firing(AlertKind::OmaDown, subject.into(), "down".into(), vec![]),
                &[],
            )
            .await
            .map(|a| a.id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leads_the_others_follow_and_a_leader_that_leaves_hands_over() {
        if !EtcdCluster::available("coordinators on etcd") {
            return;
        }
        let cluster = EtcdCluster::start(3).await;
        let cfg = cluster.store_config("/ha/");
        let (a, b) = (
            Store::open_etcd(&cfg).await.unwrap(),
            Store::open_etcd(&cfg).await.unwrap(),
        );
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let ma = join(&a, "coord-a", &stop_a).await;
        let mb = join(&b, "coord-b", &stop_b).await;
        wait_until(10, "one leader", || async {
            ma.standing().leads() != mb.standing().leads()
        })
        .await;
        let (leader, follower, stop_leader, leader_name, follower_name) = if ma.standing().leads() {
            (ma, mb, stop_a.clone(), "coord-a", "coord-b")
        } else {
            (mb, ma, stop_b.clone(), "coord-b", "coord-a")
        };
        wait_until(10, "the follower knows the leader", || async {
            follower.standing()
                == Standing::Follower {
                    leader: Some(leader_name.into()),
                }
        })
        .await;
        wait_until(10, "both registered", || async {
            a.coordinators().unwrap().len() == 2
        })
        .await;
        assert_eq!(a.leader().unwrap().as_deref(), Some(leader_name));

        // Only the leader's writes land.
        fire(&leader, "oma-a:443").await.unwrap();
        assert!(matches!(
            fire(&follower, "oma-b:443").await,
            Err(StoreError::NotLeader)
        ));

        // The leader leaves: the other leads within the TTL, and the old one's leader store
        // no longer writes.
        let old = leader.leader_store();
        stop_leader.cancel();
        leader.stopped().await;
        wait_until(10, "the follower took over", || async {
            follower.standing().leads()
        })
        .await;
        assert_eq!(b.leader().unwrap().as_deref(), Some(follower_name));
        fire(&follower, "oma-c:443").await.unwrap();
        let stale = old
            .fire_alert(
                tunnelfleet_coordinator::store::Alert::firing(
                    tunnelfleet_coordinator::store::AlertKind::OmaDown,
                    "oma-d:443".into(),
                    "down".into(),
                    vec![],
                ),
                &[],
            )
            .await;
        assert!(matches!(stale, Err(StoreError::NotLeader)), "{stale:?}");
        let subjects: Vec<String> = a
            .alerts(true)
            .unwrap()
            .into_iter()
            .map(|x| x.subject)
            .collect();
        assert!(!subjects.contains(&"oma-d:443".to_string()), "{subjects:?}");
        assert!(!subjects.contains(&"oma-b:443".to_string()), "{subjects:?}");
        stop_a.cancel();
        stop_b.cancel();
    }

    /// A leader whose lease is gone at etcd (revoked behind its back, as when it was cut off
    /// longer than the TTL) has its next write refused by the fence, even before it noticed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_whose_lease_is_gone_cannot_write() {
        if !EtcdCluster::available("coordinators on etcd") {
            return;
        }
        let cluster = EtcdCluster::start(1).await;
        let cfg = cluster.store_config("/fence/");
        let s = Store::open_etcd(&cfg).await.unwrap();
        let stop = CancellationToken::new();
        let m = s
            .join(me("coord-a"), Duration::from_secs(30), stop.clone())
            .await
            .unwrap();
        wait_until(10, "leads", || async { m.standing().leads() }).await;
        fire(&m, "oma-a:443").await.unwrap();
        // Every lease revoked, as etcd does when they expire.
        let endpoints = cluster.endpoints().join(",");
        let list = std::process::Command::new("etcdctl")
            .args(["--endpoints", &endpoints, "lease", "list"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&list.stdout).to_string();
        let leases: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("found"))
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert!(!leases.is_empty(), "{text}");
        for l in leases {
            let o = std::process::Command::new("etcdctl")
                .args(["--endpoints", &endpoints, "lease", "revoke", l])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let r = fire(&m, "oma-b:443").await;
        assert!(matches!(r, Err(StoreError::NotLeader)), "{r:?}");
        // It campaigns again on a new lease, and leads again (nobody else is here).
        wait_until(20, "leads again", || async {
            m.standing().leads() && fire(&m, "oma-c:443").await.is_ok()
        })
        .await;
        stop.cancel();
    }
}
