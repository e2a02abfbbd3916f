//! Several coordinators on one etcd: one leads, the others follow; the leader's writes are
//! fenced by its lease, so a leader whose lease is gone cannot land a write after another one
//! took over; a leader that leaves hands over within the lease's TTL.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

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
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
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
        if !EtcdCluster::available("coordinators on etcd")
            || !Sshd::available("coordinators on etcd")
        {
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
            let groups: serde_json::Value =
                survivor.api.get("/v1/groups").await.unwrap_or_default();
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

    /// `migrate` from a sled state with real history: the same `profiles history`,
    /// `alerts list --all` and `token list` on etcd afterwards, and new ids after the old.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migrate_moves_a_sled_fleet_to_etcd_with_its_history() {
        use integration_tests::*;
        if !EtcdCluster::available("migrate to etcd") {
            return;
        }
        let cluster = EtcdCluster::start(1).await;
        let dir = fleet_dir();
        let cli = |c: &CoordinatorProcess, args: &[&str]| {
            let o = std::process::Command::new(Program::Cli.path())
                .args(args)
                .arg("--json")
                .arg("--coordinator")
                .arg(c.admin.to_string())
                .arg("--token-file")
                .arg(&c.token_file)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
        };

        // A sled fleet with a past: profiles changed and rolled back, a token, an alert.
        let mut c = CoordinatorProcess::start(dir.path(), "500ms").await;
        for (i, fwd) in ["L 8082:localhost:8082", "L 8083:localhost:8083"]
            .iter()
            .enumerate()
        {
            let mut spec =
                tunnelfleet_protocol::ProfileSpec::new("oma", "vma", "/etc/tunnelfleet/id");
            spec.endpoints = vec![format!("oma-{i}:22")];
            spec.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
            spec.forwards = vec![fwd.to_string()];
            let _: tunnelfleet_coordinator::admin::Changed = c
                .api
                .call("PUT", "/v1/profiles/oma", Some(&spec))
                .await
                .unwrap();
        }
        cli(
            &c,
            &["token", "create", "--label", "site=dc1", "--ttl", "1h"],
        );
        let dead = put_dead_group(&c.api).await;
        wait_until(20, "the dead OMA's alert", || async {
            let a: serde_json::Value = c.api.get("/v1/alerts?all=true").await.unwrap_or_default();
            a.as_array()
                .is_some_and(|a| a.iter().any(|x| x["subject"] == dead.as_str()))
        })
        .await;
        let before = (
            cli(&c, &["profiles", "history"]),
            cli(&c, &["alerts", "list", "--all"]),
            cli(&c, &["token", "list"]),
        );
        let max_alert = before
            .1
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a["id"].as_u64())
            .max()
            .unwrap();
        c.kill9();

        // Moved, and opened on etcd by a coordinator whose config says so.
        let url = cluster.endpoints()[0].clone();
        let o = std::process::Command::new(Program::Coordinator.path())
            .args(["migrate", "--from"])
            .arg(format!("sled:{}", dir.path().join("state").display()))
            .args(["--to", &format!("etcd:{url}"), "--etcd-prefix", "/moved/"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let said = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(said.contains("moved") && said.contains("history"), "{said}");
        // Into a prefix that holds a fleet already: refused, nothing written.
        let again = std::process::Command::new(Program::Coordinator.path())
            .args(["migrate", "--from"])
            .arg(format!("sled:{}", dir.path().join("state").display()))
            .args(["--to", &format!("etcd:{url}"), "--etcd-prefix", "/moved/"])
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("already holds a fleet state"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );

        let d2 = dir.path().join("on-etcd");
        copy_pki(dir.path(), &d2);
        let extra = format!(
            "name = \"c1\"\nstore = \"etcd\"\n[etcd]\nendpoints = [{url:?}]\nprefix = \"/moved/\"\n"
        );
        let c2 = CoordinatorProcess::start_with(&d2, "500ms", &extra).await;
        // The dead group's alert may have been resolved or still fire; what was is the same.
        let after = (
            cli(&c2, &["profiles", "history"]),
            cli(&c2, &["alerts", "list", "--all"]),
            cli(&c2, &["token", "list"]),
        );
        assert_eq!(after.0, before.0, "profiles history");
        assert_eq!(after.2, before.2, "token list");
        for a in before.1.as_array().unwrap() {
            let id = a["id"].as_u64().unwrap();
            let moved = after.1.as_array().unwrap().iter().find(|x| x["id"] == id);
            assert_eq!(
                moved.map(|m| &m["subject"]),
                Some(&a["subject"]),
                "alert {id}"
            );
        }
        // New ids come after the moved ones.
        let mut spec = tunnelfleet_protocol::ProfileSpec::new("nbd", "vma", "/etc/tunnelfleet/id");
        spec.endpoints = vec!["oma-9:22".into()];
        spec.known_hosts = Some("/etc/tunnelfleet/known_hosts".into());
        spec.forwards = vec!["L 10809:localhost:10809".into()];
        let changed: tunnelfleet_coordinator::admin::Changed = c2
            .api
            .call("PUT", "/v1/profiles/nbd", Some(&spec))
            .await
            .unwrap();
        let history = before.0.as_array().unwrap();
        let last = history
            .iter()
            .filter_map(|h| h["version"].as_u64())
            .max()
            .unwrap();
        assert!(changed.version > last, "{} after {last}", changed.version);
        let silence: serde_json::Value = c2
            .api
            .call(
                "POST",
                "/v1/silences",
                Some(&serde_json::json!({"matcher": "nothing-*", "for_s": 60, "comment": "test"})),
            )
            .await
            .unwrap();
        assert!(silence["id"].as_u64().unwrap() > max_alert, "{silence}");
    }

    /// An agent linked only to a follower: its failing health check reaches the leader as
    /// evidence through etcd, and the leader raises the `tunnel_health` alert and delivers it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_leader_judges_agents_linked_to_a_follower() {
        use integration_tests::*;
        if !EtcdCluster::available("coordinators on etcd")
            || !Sshd::available("coordinators on etcd")
        {
            return;
        }
        let cluster = EtcdCluster::start(1).await;
        let sshd = Sshd::start();
        let api = tunnelfleet_ops::services::HttpService::start("oma api", 0)
            .await
            .unwrap();
        let sink = WebhookSink::start(0).await.unwrap();
        let dir = fleet_dir();
        let hook = webhook(dir.path(), &sink);
        let (c1, c2) = leader_then_follower(&cluster, dir.path(), &hook).await;
        // The agent knows only the follower.
        let agent = TestAgent::start(&agent_section(c2.control, dir.path(), "vma-1", "")).await;
        let (l, l_api) = (free_port(), free_port());
        let health = format!(
            "[profile.health]\nhttp = \"http://127.0.0.1:{l_api}/health\"\ninterval = \"500ms\"\ntimeout = \"1s\"\n"
        );
        let (echo, _e) = echo_server().await;
        let profile = profile_toml(
            "vma-1",
            &[sshd.endpoint()],
            &sshd,
            &[
                format!("L {l}:localhost:{echo}"),
                format!("L {l_api}:localhost:{}", api.port),
            ],
            &health,
        );
        let local =
            tunnelfleet_agent::config::AgentConfig::parse(&profile, std::path::Path::new("p.toml"))
                .unwrap();
        put_and_assign(&c2.api, &local.profiles[0], "vma-1").await;
        agent.wait_all_active("vma-1").await;

        // The OMA's API fails behind a healthy sshd: the agent's checks fail, on c2.
        api.failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        wait_until(
            30,
            "tunnel_health for vma-1, raised by the leader",
            || async {
                sink.delivered().iter().any(|d| {
                    let j = d.json();
                    j["alert"]["kind"] == "tunnel_health"
                        && j["status"] == "firing"
                        && j["alert"]["subject"]
                            .as_str()
                            .is_some_and(|s| s.contains("vma-1"))
                })
            },
        )
        .await;
        // The leader lists it as linked to c2, and counts it there; so does the CLI.
        let agents: serde_json::Value = c1.api.get("/v1/agents").await.unwrap();
        let row = agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == "vma-1")
            .cloned()
            .unwrap_or_default();
        assert_eq!(row["connected"], true, "{agents}");
        assert_eq!(row["coordinator"], "c2", "{agents}");
        assert!(row["tunnels"].as_u64().unwrap_or(0) == 1, "{agents}");
        let v = view(&c1).await.unwrap();
        assert_eq!(v["agents"]["c2"], 1, "{v}");
        let o = std::process::Command::new(Program::Cli.path())
            .args(["coordinators", "--coordinator"])
            .arg(format!("{},{}", c2.admin, c1.admin))
            .arg("--token-file")
            .arg(&c1.token_file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("c1") && l.contains("leader"))
                && text
                    .lines()
                    .any(|l| l.trim_start().starts_with("c2") && l.contains("follower")),
            "{text}"
        );
        // A command for the agent asked of the leader, which it is not linked to: refused
        // with a 421 naming c2 and its admin API, nothing done.
        let e = c1
            .api
            .call::<(), serde_json::Value>("POST", "/v1/agents/vma-1/tunnels/vma-1/health", None)
            .await
            .unwrap_err();
        match &e {
            tunnelfleet_ops::api::ApiError::Status { status, message } => {
                assert_eq!(*status, 421, "{message}");
                assert!(
                    message.contains("linked to coordinator c2")
                        && message.contains(&c2.admin.to_string()),
                    "{message}"
                );
            }
            other => panic!("{other}"),
        }
        // The CLI given both sends it on to c2, which runs it on the agent.
        let o = std::process::Command::new(Program::Cli.path())
            .args([
                "tunnels",
                "health",
                "vma-1",
                "--agent",
                "vma-1",
                "--coordinator",
            ])
            .arg(format!("{},{}", c1.admin, c2.admin))
            .arg("--token-file")
            .arg(&c1.token_file)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            text.starts_with("vma-1: "),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Healthy again: resolved, by the leader, from the same evidence.
        api.failing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        wait_until(30, "tunnel_health resolved", || async {
            sink.delivered().iter().any(|d| {
                let j = d.json();
                j["alert"]["kind"] == "tunnel_health" && j["status"] == "resolved"
            })
        })
        .await;
        agent.shutdown().await;
    }

    /// A staged rollout decided by the leader over agents linked to a follower: the bad
    /// change halts at its canary, judged from the follower's evidence, and the other agent
    /// never gets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_staged_rollout_halts_at_a_canary_linked_to_a_follower() {
        use integration_tests::*;
        use tunnelfleet_coordinator::admin::RolloutView;
        use tunnelfleet_coordinator::rollout::{Canary, StartRequest};
        use tunnelfleet_coordinator::store::RolloutState;
        if !EtcdCluster::available("coordinators on etcd")
            || !Sshd::available("coordinators on etcd")
        {
            return;
        }
        let cluster = EtcdCluster::start(1).await;
        let sshd = Sshd::start();
        let (echo, _e) = echo_server().await;
        let dir = fleet_dir();
        let (c1, c2) = leader_then_follower(&cluster, dir.path(), "").await;
        // Two agents, both on the follower, each with its own profile.
        let mut agents = Vec::new();
        for i in 1..=2 {
            let id = format!("vma-{i}");
            let agent = TestAgent::start(&agent_section(c2.control, dir.path(), &id, "")).await;
            let l = free_port();
            let profile = profile_toml(
                &id,
                &[sshd.endpoint()],
                &sshd,
                &[format!("L {l}:localhost:{echo}")],
                "",
            );
            let local = tunnelfleet_agent::config::AgentConfig::parse(
                &profile,
                std::path::Path::new("p.toml"),
            )
            .unwrap();
            put_and_assign(&c1.api, &local.profiles[0], &id).await;
            agent.wait_all_active(&id).await;
            agents.push((id, agent, l, local.profiles[0].clone()));
        }
        // The leader knows both are linked to c2 (from c2's evidence).
        wait_until(10, "the leader sees both agents on c2", || async {
            let a: serde_json::Value = c1.api.get("/v1/agents").await.unwrap_or_default();
            a.as_array().is_some_and(|a| {
                a.iter()
                    .filter(|x| x["connected"] == true && x["coordinator"] == "c2")
                    .count()
                    == 2
            })
        })
        .await;
        // Both changed to an OMA port nobody listens on, staged: one canary, one wave.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let bad: Vec<_> = agents
            .iter()
            .map(|(_, _, _, p)| {
                let mut p = p.clone();
                p.endpoints = vec![dead.clone()];
                p
            })
            .collect();
        let r: tunnelfleet_coordinator::store::Rollout = c1
            .api
            .call(
                "POST",
                "/v1/rollouts",
                Some(&StartRequest {
                    profiles: bad,
                    canary: Canary::Count(1),
                    waves: 1,
                    wait_ms: 2000,
                    settle_ms: 6000,
                }),
            )
            .await
            .unwrap();
        let canary = r.stages[0].agents.clone();
        assert_eq!(canary.len(), 1, "{r:?}");
        assert!(
            r.stages[0].offline.is_empty(),
            "the follower's agents are not away: {r:?}"
        );
        wait_until(60, "the rollout halted at the canary", || async {
            let v: Option<RolloutView> = c1.api.get("/v1/rollouts/current").await.unwrap_or(None);
            v.is_some_and(|v| v.rollout.state == RolloutState::Halted)
        })
        .await;
        let v: Option<RolloutView> = c1.api.get("/v1/rollouts/current").await.unwrap();
        let r = v.unwrap().rollout;
        assert_eq!(r.current, 0, "{r:?}");
        assert_eq!(
            r.reasons.keys().cloned().collect::<Vec<_>>(),
            canary,
            "{r:?}"
        );
        // The other agent never got the bad change: still on the real sshd, data flowing.
        let (other, agent, l, _) = agents.iter().find(|(id, ..)| !canary.contains(id)).unwrap();
        assert_eq!(agent.profile(other).await.active_endpoint, sshd.endpoint());
        echo_roundtrip(*l, b"never got it").await.unwrap();
        for (_, agent, _, _) in agents {
            agent.shutdown().await;
        }
    }

    /// Three coordinators on etcd, forty agents all linked to one (the others were away): a
    /// round of the balance on the loaded one moves nothing while its links are young, then a
    /// twentieth of the fleet at a time, never an agent twice, and each moved agent links to
    /// one of the others picked at random; rounds until it holds no more than its share plus
    /// the slack.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_coordinator_holding_the_whole_fleet_hands_the_surplus_to_the_others() {
        use integration_tests::FullCoordinator;
        use std::collections::{BTreeSet, HashMap};
        use std::sync::Arc;
        use tunnelfleet_coordinator::balance;
        if !EtcdCluster::available("coordinators on etcd") {
            return;
        }
        let cluster = EtcdCluster::start(1).await;
        let mut cfg = cluster.store_config("/balance/");
        cfg.lease_ttl = TTL;
        // The test drives the rounds itself, with a clock of its own.
        cfg.rebalance = false;
        let dir = tempfile::tempdir().unwrap();
        let beat = Duration::from_millis(500);
        let start = |name: &'static str| {
            let (dir, cfg) = (dir.path().join(name), cfg.clone());
            async move { FullCoordinator::start_on_etcd(&dir, beat, name, cfg).await }
        };
        let a = start("a").await;
        copy_pki(&dir.path().join("a"), &dir.path().join("b"));
        copy_pki(&dir.path().join("a"), &dir.path().join("c"));
        let (b, c) = (start("b").await, start("c").await);
        wait_until(20, "all three registered", || async {
            a.fleet.store.coordinators().is_ok_and(|c| c.len() == 3)
        })
        .await;
        const AGENTS: usize = 40;
        let endpoints = integration_tests::sim_endpoints(2).unwrap();
        let (up, _up_rx) = tokio::sync::mpsc::unbounded_channel();
        let (pushes, _pushes_rx) = tokio::sync::mpsc::unbounded_channel();
        let gate = Arc::new(tokio::sync::Semaphore::new(64));
        let certs = dir.path().join("agents");
        for k in 0..AGENTS {
            let id = format!("agent-{k:02}");
            let f = tunnelfleet_coordinator::pki::issue_agent(
                &dir.path().join("a/pki"),
                &id,
                1,
                &certs,
            )
            .unwrap();
            let client = tunnelfleet_agent::link::client_config(&f.ca, &f.cert, &f.key).unwrap();
            // An index that is a multiple of three starts at the first address: every agent
            // dials `a` first.
            integration_tests::spawn_sim_agent(
                3 * k,
                integration_tests::sim_hello(id, &[]),
                client,
                endpoints[k % 2].clone(),
                vec![a.control, b.control, c.control],
                Duration::from_millis(500),
                gate.clone(),
                up.clone(),
                pushes.clone(),
                integration_tests::SimReports::Nothing,
            );
        }
        wait_until(30, "every agent linked to a", || async {
            a.fleet.links.connected().len() == AGENTS
        })
        .await;
        let on = |c: &FullCoordinator| {
            c.fleet
                .links
                .connected()
                .into_iter()
                .collect::<BTreeSet<_>>()
        };
        // What one coordinator reads of the others' links in the store.
        let seen = |by: &FullCoordinator, me: &str, of: &[&str]| {
            by.fleet.store.latest_live(me).map_or(0, |l| {
                l.values()
                    .filter(|r| r.connected && of.contains(&r.coordinator.as_str()))
                    .count()
            })
        };
        wait_until(20, "b sees a's links", || async {
            seen(&b, "b", &["a"]) == AGENTS
        })
        .await;
        let mut asked = HashMap::new();
        let now = tunnelfleet_runtime::clock::now_unix_ms();
        assert!(
            balance::round(&a.fleet, "a", &mut asked, now).is_empty(),
            "links younger than {:?} stay",
            balance::SETTLED
        );
        assert!(balance::round(&b.fleet, "b", &mut HashMap::new(), now).is_empty());
        // Later: settled. Forty over three is fourteen each (rounded up), plus a slack of two;
        // two per round.
        let later = now + balance::SETTLED.as_millis() as u64;
        let mut moved_all = BTreeSet::new();
        let mut rounds = 0;
        loop {
            let moved = balance::round(&a.fleet, "a", &mut asked, later + rounds * 10_000);
            if moved.is_empty() {
                break;
            }
            rounds += 1;
            assert_eq!(moved.len(), 2, "round {rounds}: {moved:?}");
            for id in &moved {
                assert!(moved_all.insert(id.clone()), "{id} asked twice");
            }
            let before = on(&b).len() + on(&c).len();
            wait_until(20, "the moved agents linked to another", || async {
                let (on_a, on_b, on_c) = (on(&a), on(&b), on(&c));
                moved
                    .iter()
                    .all(|id| !on_a.contains(id) && (on_b.contains(id) || on_c.contains(id)))
            })
            .await;
            let elsewhere = on(&b).len() + on(&c).len();
            assert_eq!(elsewhere, before + 2);
            // a reads the others' links from the store before its next round.
            wait_until(20, "a sees the others' links", || async {
                seen(&a, "a", &["b", "c"]) == elsewhere
            })
            .await;
            assert!(rounds < 20, "the balance does not end");
        }
        let (on_a, on_b, on_c) = (on(&a).len(), on(&b).len(), on(&c).len());
        assert_eq!(on_a + on_b + on_c, AGENTS);
        assert_eq!(on_a, 16, "down to the share plus the slack");
        assert_eq!(rounds, 12);
        // Each moved agent picked one of the others at random: both got some (all 24 on one
        // is a chance of one in 2^23).
        assert!(on_b > 0 && on_c > 0, "b {on_b}, c {on_c}");
        // A move is a relink, not an absence: every agent online where it is, as every
        // coordinator sees it, and no agent_offline alert (the first moves were long enough
        // ago for three missed heartbeats).
        for x in [&a, &b, &c] {
            wait_until(
                20,
                "every agent online in each coordinator's list",
                || async {
                    let list: Vec<serde_json::Value> =
                        x.api.get("/v1/agents").await.unwrap_or_default();
                    list.len() == AGENTS
                        && list
                            .iter()
                            .all(|g| g["connected"] == true && g["online"] == true)
                },
            )
            .await;
        }
        for x in [&a, &b, &c] {
            let firing = x.fleet.store.alerts(false).unwrap();
            assert!(
                !firing
                    .iter()
                    .any(|f| f.kind == tunnelfleet_coordinator::store::AlertKind::AgentOffline),
                "{firing:?}"
            );
        }
        for x in [a, b, c] {
            x.stop().await;
        }
    }
}
