use std::time::Duration;

use integration_tests::{EtcdCluster, wait_until};
use tokio_util::sync::CancellationToken;
use tunnelfleet_coordinator::store::{CoordinatorRecord, Membership, Standing, Store, StoreError};

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

/// A coordinator process's config for the shared store, and a copy of the fleet PKI in
/// its own directory.
fn etcd_extra(cluster: &EtcdCluster, name: &str, hook: &str) -> String {
    let endpoints: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| format!("{e:?}"))
        .collect();
    let metrics = integration_tests::free_port();
    format!(
        "name = \"{name}\"\nstore = \"etcd\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n{hook}\n[etcd]\nendpoints = [{}]\nprefix = \"/fleet/\"\nlease_ttl = \"2s\"\ntimeout = \"1s\"\n",
        endpoints.join(", ")
    )
}

/// A fleet's directory: its PKI, and copies of it for coordinators `c1` and `c2`.
fn fleet_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    for c in ["c1", "c2"] {
        copy_pki(dir.path(), &dir.path().join(c));
    }
    dir
}

/// The `[[hook]]` that delivers to `sink`, signed with a secret kept in `dir`.
fn webhook(dir: &std::path::Path, sink: &integration_tests::WebhookSink) -> String {
    let secret = dir.join("webhook.secret");
    integration_tests::write_secret(&secret, b"ha-webhook-secret-0123456789");
    format!(
        "[[hook]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{}/alerts\"\nsecret_file = \"{}\"\ntimeout = \"1s\"\n",
        sink.port,
        secret.display()
    )
}

/// Coordinator `c1` (in `dir/c1`), once it leads, then `c2`, once it follows `c1`.
async fn leader_then_follower(
    cluster: &EtcdCluster,
    dir: &std::path::Path,
    hook: &str,
) -> (
    integration_tests::CoordinatorProcess,
    integration_tests::CoordinatorProcess,
) {
    use integration_tests::CoordinatorProcess;
    let extra = |name| etcd_extra(cluster, name, hook);
    let c1 = CoordinatorProcess::start_with(&dir.join("c1"), "500ms", &extra("c1")).await;
    wait_until(20, "c1 leads", || async {
        view(&c1).await.is_some_and(|v| v["standing"] == "leader")
    })
    .await;
    let c2 = CoordinatorProcess::start_with(&dir.join("c2"), "500ms", &extra("c2")).await;
    wait_until(20, "c2 follows c1", || async {
        view(&c2)
            .await
            .is_some_and(|v| v["standing"] == "follower" && v["leader"] == "c1")
    })
    .await;
    (c1, c2)
}

fn copy_pki(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to.join("pki")).unwrap();
    for f in std::fs::read_dir(from.join("pki")).unwrap() {
        let f = f.unwrap();
        let dest = to.join("pki").join(f.file_name());
        std::fs::copy(f.path(), &dest).unwrap();
        let mode = std::fs::metadata(f.path()).unwrap().permissions();
        std::fs::set_permissions(&dest, mode).unwrap();
    }
}

async fn view(c: &integration_tests::CoordinatorProcess) -> Option<serde_json::Value> {
    c.api.get("/v1/coordinators").await.ok()
}

/// A metric's value from a coordinator process's `/metrics` (its config names the port).
async fn metric(c: &integration_tests::CoordinatorProcess, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = std::fs::read_to_string(&c.config).ok()?;
    let addr = config
        .lines()
        .find_map(|l| l.strip_prefix("metrics_listen = "))?
        .trim_matches('"')
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Two coordinator processes on a three-member etcd, an agent that knows both, an OMA
/// group of two real sshd. kill -9 the leader while profiles are being applied through the
/// other and the active OMA dies with it: the other leads within the lease's TTL, fails
/// the group over, delivers the alert (one idempotency key however often), the agent
/// moves to it, and every acknowledged apply is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_mid_stream_with_an_oma_loses_nothing_and_the_other_decides() {
    use integration_tests::*;
    use tunnelfleet_coordinator::admin::Changed;
    if !EtcdCluster::available("coordinators on etcd") || !Sshd::available("coordinators on etcd") {
        return;
    }
    let cluster = EtcdCluster::start(3).await;
    let mut primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let (echo, _e) = echo_server().await;
    let sink = WebhookSink::start(0).await.unwrap();
    let dir = fleet_dir();
    let hook = webhook(dir.path(), &sink);
    let (d1, d2) = (dir.path().join("c1"), dir.path().join("c2"));
    let mut c1 =
        CoordinatorProcess::start_with(&d1, "500ms", &etcd_extra(&cluster, "c1", &hook)).await;
    let mut c2 =
        CoordinatorProcess::start_with(&d2, "500ms", &etcd_extra(&cluster, "c2", &hook)).await;
    wait_until(20, "one of the two leads", || async {
        view(&c1).await.is_some_and(|v| v["leader"].is_string())
    })
    .await;

    // The group and the agent's profile, through c1; the agent knows both coordinators.
    let group = tunnelfleet_coordinator::store::OmaGroup::probed(
        "oma",
        vec![primary.endpoint(), standby.endpoint()],
        Duration::from_millis(300),
        Duration::from_millis(300),
        Duration::from_secs(3600),
    );
    let _: Changed = c1
        .api
        .call("PUT", "/v1/groups/oma", Some(&group))
        .await
        .unwrap();
    let section = agent_section(c1.control, dir.path(), "vma-1", "").replace(
        &format!("address = \"{}\"", c1.control),
        &format!("address = [\"{}\", \"{}\"]", c1.control, c2.control),
    );
    let agent = TestAgent::start(&section).await;
    let l = free_port();
    let pins = format!(
        "host_key_fingerprints = [{:?}, {:?}]\n",
        primary.fingerprint, standby.fingerprint
    );
    let profile = profile_toml(
        "vma-1",
        &[primary.endpoint()],
        &primary,
        &[format!("L {l}:localhost:{echo}")],
        &pins,
    );
    assign_group_profile(&c1.api, "vma-1", "oma", &profile).await;
    agent.wait_all_active("vma-1").await;
    assert_eq!(
        agent.profile("vma-1").await.active_endpoint,
        primary.endpoint()
    );

    let leader = view(&c1).await.unwrap()["leader"]
        .as_str()
        .unwrap()
        .to_string();
    let (dead, survivor) = if leader == "c1" {
        (&mut c1, &mut c2)
    } else {
        (&mut c2, &mut c1)
    };
    // A stream of applies through the survivor, each acknowledged one remembered.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (api, acked, stop) = (survivor.api.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.is_cancelled() {
                let mut spec = tunnelfleet_protocol::ProfileSpec::new(
                    format!("stream-{i}"),
                    "vma",
                    "/etc/tunnelfleet/id",
                );
                spec.endpoints = vec!["oma-x:22".into()];
                spec.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
                spec.forwards = vec!["L 18082:localhost:8082".into()];
                let r: Result<Changed, _> = api
                    .call("PUT", &format!("/v1/profiles/stream-{i}"), Some(&spec))
                    .await;
                if r.is_ok() {
                    acked.lock().unwrap().push(format!("stream-{i}"));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Writes acknowledged before the kill, not only after it.
    wait_until(20, "five applies acknowledged before the kill", || async {
        acked.lock().unwrap().len() >= 5
    })
    .await;
    let before_kill = acked.lock().unwrap().len();
    // The leader and the active OMA die together.
    dead.kill9();
    primary.kill_all();
    wait_until(20, "the survivor leads", || async {
        view(survivor)
            .await
            .is_some_and(|v| v["standing"] == "leader")
    })
    .await;
    wait_until(10, "its /metrics say so", || async {
        metric(survivor, "tunnelfleet_coordinator_leader").await == Some(1.0)
    })
    .await;
    assert!(
        metric(survivor, "tunnelfleet_etcd_requests_total")
            .await
            .unwrap_or(0.0)
            > 0.0,
        "etcd requests counted"
    );
    wait_until(30, "the new leader failed the group over", || async {
        let groups: serde_json::Value = survivor.api.get("/v1/groups").await.unwrap_or_default();
        groups[0]["active"].as_str() == Some(standby.endpoint().as_str())
    })
    .await;
    wait_until(
        30,
        "the agent on the standby, through the survivor",
        || async {
            let p = agent.profile("vma-1").await;
            let agents: serde_json::Value =
                survivor.api.get("/v1/agents").await.unwrap_or_default();
            p.active_endpoint == standby.endpoint()
                && agents.as_array().is_some_and(|a| {
                    a.iter()
                        .any(|x| x["id"] == "vma-1" && x["connected"] == true)
                })
        },
    )
    .await;
    agent.wait_all_active("vma-1").await;
    echo_roundtrip(l, b"through the standby").await.unwrap();
    wait_until(30, "the oma_down alert delivered", || async {
        sink.delivered().iter().any(|d| {
            d.json()["alert"]["subject"] == primary.endpoint().as_str()
                && d.json()["alert"]["status"] == "firing"
        })
    })
    .await;
    let keys: std::collections::BTreeSet<String> = sink
        .delivered()
        .iter()
        .filter(|d| {
            d.json()["alert"]["subject"] == primary.endpoint().as_str()
                && d.json()["alert"]["status"] == "firing"
        })
        .filter_map(|d| d.header("idempotency-key").map(str::to_string))
        .collect();
    assert_eq!(keys.len(), 1, "one incident, one key: {keys:?}");

    stop.cancel();
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > before_kill,
        "applies acknowledged after the kill too: {acked:?}"
    );
    let names: std::collections::BTreeSet<String> = survivor
        .api
        .get::<Vec<tunnelfleet_protocol::ProfileSpec>>("/v1/profiles")
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|n| !names.contains(*n)).collect();
    assert!(lost.is_empty(), "acknowledged and lost: {lost:?}");
    agent.shutdown().await;
}

/// The leader cut off from etcd (the only member it talks to is gone) while the others
/// keep their quorum: it stops deciding, exactly one other leads, and when it reaches etcd
/// again it follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_etcd_stops_deciding_and_follows_when_it_is_back() {
    if !EtcdCluster::available("coordinators on etcd") {
        return;
    }
    let mut cluster = EtcdCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let mut only_m0 = cluster.store_config("/cut/");
    only_m0.endpoints = vec![endpoints[0].clone()];
    only_m0.timeout = Duration::from_secs(1);
    let mut the_rest = cluster.store_config("/cut/");
    the_rest.endpoints = endpoints[1..].to_vec();
    the_rest.timeout = Duration::from_secs(1);
    let a = Store::open_etcd(&only_m0).await.unwrap();
    let stop = CancellationToken::new();
    let ma = join(&a, "coord-a", &stop).await;
    wait_until(10, "a leads", || async { ma.standing().leads() }).await;
    let (b, c) = (
        Store::open_etcd(&the_rest).await.unwrap(),
        Store::open_etcd(&the_rest).await.unwrap(),
    );
    let mb = join(&b, "coord-b", &stop).await;
    let mc = join(&c, "coord-c", &stop).await;
    wait_until(10, "b and c follow a", || async {
        let follows_a = Standing::Follower {
            leader: Some("coord-a".into()),
        };
        mb.standing() == follows_a && mc.standing() == follows_a
    })
    .await;

    // a's only member goes: a is cut off; b and c still have two of three.
    cluster.kill(0);
    wait_until(10, "a stops deciding", || async {
        matches!(ma.standing(), Standing::Cut { .. })
    })
    .await;
    assert!(
        fire(&ma, "oma-a:443").await.is_err(),
        "a cut-off leader wrote"
    );
    wait_until(15, "exactly one of b and c leads", || async {
        mb.standing().leads() != mc.standing().leads()
    })
    .await;
    let (new, other) = if mb.standing().leads() {
        (&mb, &mc)
    } else {
        (&mc, &mb)
    };
    fire(new, "oma-b:443").await.unwrap();
    assert!(matches!(
        fire(other, "oma-c:443").await,
        Err(StoreError::NotLeader)
    ));

    // a reaches etcd again: it follows the new leader, and stays off the lead.
    cluster.restart(0);
    let new_name = b.leader().unwrap().unwrap();
    wait_until(20, "a follows the new leader", || async {
        ma.standing()
            == Standing::Follower {
                leader: Some(new_name.clone()),
            }
    })
    .await;
    assert!(new.standing().leads() && !ma.standing().leads());
    stop.cancel();
}

mod more;
