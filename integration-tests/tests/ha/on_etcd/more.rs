//! The rest of the HA tests (helpers in `mod.rs`).

use super::*;

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
        let mut spec = tunnelfleet_protocol::ProfileSpec::new("oma", "vma", "/etc/tunnelfleet/id");
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
    if !EtcdCluster::available("coordinators on etcd") || !Sshd::available("coordinators on etcd") {
        return;
    }
    let cluster = EtcdCluster::start(1).await;
    let sshd = Sshd::start();
    let api = tunnelfleet_standins::services::HttpService::start("oma api", 0)
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
    if !EtcdCluster::available("coordinators on etcd") || !Sshd::available("coordinators on etcd") {
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
        let local =
            tunnelfleet_agent::config::AgentConfig::parse(&profile, std::path::Path::new("p.toml"))
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
        let f =
            tunnelfleet_coordinator::pki::issue_agent(&dir.path().join("a/pki"), &id, 1, &certs)
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
