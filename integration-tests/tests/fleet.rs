//! An agent in a fleet, end to end: a coordinator (real QUIC, sled on disk) pushes a profile
//! that the agent runs against a real sshd; the tunnel survives the coordinator going away, an
//! agent restarted meanwhile runs its cached profile, and a restarted coordinator on the same
//! data dir has lost nothing and gets the agent back.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;

use integration_tests::*;
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_coordinator::pki;
use tunnelfleet_coordinator::store::{Assignment, Selector};
use tunnelfleet_protocol::{CommandAction, TunnelState};

fn coordinator_toml(c: &TestCoordinator, files: &pki::AgentFiles, state: &Path) -> String {
    format!(
        "[coordinator]\naddress = \"{}\"\nserver_name = \"localhost\"\nagent_id = \"vma-1\"\nlabels = {{ site = \"dc1\" }}\n\
         ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n",
        c.addr,
        files.ca.display(),
        files.cert.display(),
        files.key.display(),
        state.display()
    )
}

/// One agent (`vma-1`, site dc1) linked to a coordinator in this process, which pushed it
/// profile `oma`: `L l → echo` through a real sshd. The tunnel carries data on return.
struct Pushed {
    sshd: Sshd,
    c: TestCoordinator,
    agent: TestAgent,
    /// The agent's config (to restart it).
    agent_toml: String,
    pki_dir: std::path::PathBuf,
    coord_state: std::path::PathBuf,
    /// The local forward's port.
    l: u16,
    /// The fleet version pushed.
    v: u64,
    _echo: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

async fn pushed() -> Pushed {
    let sshd = Sshd::start();
    let (echo, _echo) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &["localhost".into()]).unwrap();
    let files = pki::issue_agent(&pki_dir, "vma-1", 365, &dir.path().join("agent")).unwrap();
    let coord_state = dir.path().join("coordinator");
    let agent_state = dir.path().join("agent-state");
    let c = TestCoordinator::start(&pki_dir, &coord_state, 0).await;
    let agent_toml = coordinator_toml(&c, &files, &agent_state);
    let agent = TestAgent::start(&agent_toml).await;
    wait_until(20, "agent connected", || async {
        c.fleet.links.connected() == vec!["vma-1"]
    })
    .await;

    // The profile, written as a local one would be, pushed through the coordinator.
    let l = free_port();
    let local = AgentConfig::parse(
        &profile_toml(
            "oma",
            &[sshd.endpoint()],
            &sshd,
            &[format!("L {l}:localhost:{echo}")],
            "",
        ),
        Path::new("p.toml"),
    )
    .unwrap();
    let v = assign_to_site(&c.fleet, &local.profiles[0], "dc1").await;
    assert_eq!(c.fleet.push_changed().unwrap(), vec!["vma-1"]);
    wait_until(20, "version acknowledged", || async {
        c.fleet
            .store
            .agent("vma-1")
            .unwrap()
            .is_some_and(|r| r.applied_version == Some(v) && r.applied_ok)
    })
    .await;
    agent.wait_all_active("oma").await;
    echo_roundtrip(l, b"pushed profile").await.unwrap();
    Pushed {
        sshd,
        c,
        agent,
        agent_toml,
        pki_dir,
        coord_state,
        l,
        v,
        _echo,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_profiles_run_survive_the_coordinator_and_come_back_from_cache() {
    if !Sshd::available("fleet") {
        return;
    }
    let Pushed {
        sshd,
        c,
        agent,
        agent_toml,
        pki_dir,
        coord_state,
        l,
        v,
        _echo,
        _dir,
    } = pushed().await;
    let addr = c.addr;
    wait_until(20, "heartbeat reports the tunnel up", || async {
        c.fleet
            .links
            .get("vma-1")
            .and_then(|a| a.last_heartbeat)
            .is_some_and(|hb| {
                hb.profiles
                    .first()
                    .is_some_and(|p| p.name == "oma" && p.state == TunnelState::Up)
            })
    })
    .await;

    // An operator's commands through the coordinator (`tunnels … --agent vma-1`), carried
    // over the control link and run by the agent as its local socket would.
    let before = agent.profile("oma").await.reconnects;
    let logins = || sshd.log().matches("Accepted publickey").count();
    let logins_before = logins();
    let r = c
        .fleet
        .command("vma-1", CommandAction::Restart, "oma")
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
    // A real restart: a new session (one more login on the sshd, one more reconnect).
    wait_until(20, "a new session after the remote restart", || async {
        let p = agent.profile("oma").await;
        p.reconnects == before + 1 && p.state == TunnelState::Up
    })
    .await;
    assert_eq!(logins(), logins_before + 1, "{}", sshd.log());
    agent.wait_all_active("oma").await;
    echo_roundtrip(l, b"after a remote restart").await.unwrap();
    let r = c
        .fleet
        .command("vma-1", CommandAction::Stop, "no-such-profile")
        .await
        .unwrap();
    assert!(!r.ok && r.message.contains("no profile named"), "{r:?}");
    // net check from the agent's side: its OMA endpoint (the real sshd) answers with a banner.
    let r = c
        .fleet
        .command("vma-1", CommandAction::NetCheck, "")
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
    let report: serde_json::Value = serde_json::from_str(r.report.as_deref().unwrap()).unwrap();
    assert_eq!(report[0]["target"], sshd.endpoint().as_str(), "{report}");
    assert!(r.message.contains("SSH-2.0-OpenSSH"), "{}", r.message);
    // The audit of the agent's host comes back whole.
    let r = c
        .fleet
        .command("vma-1", CommandAction::Audit, "")
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(r.report.as_deref().unwrap()).unwrap();
    // What the agent's own audit finds on this host, computed here the same way (listening
    // sockets aside: other tests open and close them by the millisecond).
    let local = tunnelfleet_agent::audit::run(&tunnelfleet_agent::audit::AuditOptions::default());
    let ids = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap().to_string())
            .filter(|id| !id.starts_with("socket."))
            .collect()
    };
    let here = serde_json::to_value(&local).unwrap();
    assert!(!ids(&here).is_empty(), "nothing to compare: {here}");
    assert_eq!(ids(&report), ids(&here), "{report}");
    for id in ids(&here) {
        assert!(
            r.message.contains(&format!("({id})")),
            "{id} missing: {}",
            r.message
        );
    }
    let e = c
        .fleet
        .command("vma-9", CommandAction::Restart, "oma")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not connected"), "{e}");

    // The coordinator goes away: the tunnel does not notice (same session: no reconnect).
    let reconnects = agent.profile("oma").await.reconnects;
    c.stop().await;
    echo_roundtrip(l, b"coordinator down").await.unwrap();
    assert_eq!(agent.profile("oma").await.reconnects, reconnects);

    // The agent restarts while the coordinator is down: it runs its cached profile.
    agent.shutdown().await;
    let agent = TestAgent::start(&agent_toml).await;
    agent.wait_all_active("oma").await;
    echo_roundtrip(l, b"from the cache").await.unwrap();

    // The coordinator comes back on the same data dir and port: nothing acknowledged was lost,
    // and the agent reconnects by itself.
    let c = TestCoordinator::start(&pki_dir, &coord_state, addr.port()).await;
    assert_eq!(c.fleet.store.fleet_version().unwrap(), v);
    assert_eq!(
        c.fleet
            .store
            .agent("vma-1")
            .unwrap()
            .unwrap()
            .applied_version,
        Some(v)
    );
    wait_until(30, "agent reconnected", || async {
        c.fleet.links.connected() == vec!["vma-1"]
    })
    .await;
    wait_until(20, "heartbeats again", || async {
        c.fleet.links.get("vma-1").is_some_and(|a| a.heartbeats > 0)
    })
    .await;
    echo_roundtrip(l, b"after the coordinator restart")
        .await
        .unwrap();
    agent.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_that_did_not_change_keeps_its_open_connection_through_a_push() {
    if !Sshd::available("fleet_keep_connection") {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &["localhost".into()]).unwrap();
    let files = pki::issue_agent(&pki_dir, "vma-1", 365, &dir.path().join("agent")).unwrap();
    let c = TestCoordinator::start(&pki_dir, &dir.path().join("coordinator"), 0).await;
    let agent = TestAgent::start(&coordinator_toml(
        &c,
        &files,
        &dir.path().join("agent-state"),
    ))
    .await;
    wait_until(20, "agent connected", || async {
        c.fleet.links.connected() == vec!["vma-1"]
    })
    .await;

    let (l1, l2) = (free_port(), free_port());
    let spec = |forwards: &[String]| {
        let cfg = AgentConfig::parse(
            &profile_toml("oma", &[sshd.endpoint()], &sshd, forwards, ""),
            Path::new("p.toml"),
        )
        .unwrap();
        cfg.profiles[0].clone()
    };
    c.fleet
        .store
        .put_profile(&spec(&[format!("L {l1}:localhost:{echo}")]))
        .await
        .unwrap();
    c.fleet
        .store
        .assign(&Assignment {
            profile: "oma".into(),
            selector: Selector::Agent("vma-1".into()),
        })
        .await
        .unwrap();
    c.fleet.push_changed().unwrap();
    agent.wait_all_active("oma").await;

    // An NBD-like long-lived connection through the forward that will not change.
    let mut open = tokio::net::TcpStream::connect(("127.0.0.1", l1))
        .await
        .unwrap();
    let mut buf = [0u8; 6];
    open.write_all(b"before").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();

    let v = c
        .fleet
        .store
        .put_profile(&spec(&[
            format!("L {l1}:localhost:{echo}"),
            format!("L {l2}:localhost:{echo}"),
        ]))
        .await
        .unwrap();
    c.fleet.push_changed().unwrap();
    wait_until(20, "new version acknowledged", || async {
        c.fleet
            .store
            .agent("vma-1")
            .unwrap()
            .is_some_and(|r| r.applied_version == Some(v) && r.applied_ok)
    })
    .await;
    agent.wait_all_active("oma").await;
    // The open connection still carries data; new connections work on both forwards.
    open.write_all(b"during").await.unwrap();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        open.read_exact(&mut buf),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&buf, b"during");
    echo_roundtrip(l1, b"new on the old forward").await.unwrap();
    echo_roundtrip(l2, b"new forward").await.unwrap();
    agent.shutdown().await;
    c.stop().await;
}

/// The issue's restart case with a real process: `tunnelfleet-coordinator` killed with SIGKILL
/// while two agents are connected, restarted on the same data dir and ports. Nothing it
/// acknowledged is lost, the tunnels never notice, the agents come back by themselves and
/// converge on the next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_with_sigkill_loses_nothing_and_agents_converge_after_restart() {
    use tunnelfleet_coordinator::admin::{AgentSummary, Changed, Rollout};
    if !Sshd::available("fleet_coordinator_kill9") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &["localhost".into()]).unwrap();
    let mut coordinator = CoordinatorProcess::start(dir.path(), "500ms").await;
    let api = &coordinator.api.clone();

    // Two appliances, each assigned its own profile (one machine plays both, so the local
    // ports differ).
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for id in ["vma-1", "vma-2"] {
        let files = pki::issue_agent(&pki_dir, id, 365, &dir.path().join(id)).unwrap();
        let toml = format!(
            "[coordinator]\naddress = \"{}\"\nserver_name = \"localhost\"\nagent_id = \"{id}\"\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n",
            coordinator.control,
            files.ca.display(),
            files.cert.display(),
            files.key.display(),
            dir.path().join(id).join("state").display()
        );
        agents.push(TestAgent::start(&toml).await);
        let l = free_port();
        ports.push(l);
        let local = AgentConfig::parse(
            &profile_toml(
                id,
                &[sshd.endpoint()],
                &sshd,
                &[format!("L {l}:localhost:{echo}")],
                "",
            ),
            Path::new("p.toml"),
        )
        .unwrap();
        integration_tests::put_and_assign(api, &local.profiles[0], id).await;
    }
    let converged = |version: u64| async move {
        let r: Rollout = coordinator_get(api, "/v1/rollout").await;
        r.version == version && r.applied == ["vma-1", "vma-2"]
    };
    let v: u64 = coordinator_get::<Rollout>(api, "/v1/rollout").await.version;
    wait_until(30, "both agents applied the version", || converged(v)).await;
    for (a, (id, l)) in agents.iter().zip(["vma-1", "vma-2"].iter().zip(&ports)) {
        a.wait_all_active(id).await;
        echo_roundtrip(*l, b"before the kill").await.unwrap();
    }

    // SIGKILL: no shutdown code runs. The tunnels do not depend on it.
    coordinator.kill9();
    for l in &ports {
        echo_roundtrip(*l, b"coordinator dead").await.unwrap();
    }

    coordinator.restart().await;
    let r: Rollout = coordinator_get(api, "/v1/rollout").await;
    assert_eq!(r.version, v, "the acknowledged fleet version was lost");
    assert_eq!(
        r.applied,
        ["vma-1", "vma-2"],
        "the agents' acknowledgements were lost: {r:?}"
    );
    wait_until(30, "both agents reconnected and heartbeating", || async {
        let list: Vec<AgentSummary> = coordinator_get(api, "/v1/agents").await;
        list.len() == 2 && list.iter().all(|a| a.online && a.heartbeats > 0)
    })
    .await;

    // The next change reaches both: vma-1 gets a second forward.
    let extra = free_port();
    let local = AgentConfig::parse(
        &profile_toml(
            "vma-1",
            &[sshd.endpoint()],
            &sshd,
            &[
                format!("L {}:localhost:{echo}", ports[0]),
                format!("L {extra}:localhost:{echo}"),
            ],
            "",
        ),
        Path::new("p.toml"),
    )
    .unwrap();
    let c: Changed = api
        .call(
            "PUT",
            "/v1/profiles/vma-1",
            Some(&local.profiles[0].clone()),
        )
        .await
        .unwrap();
    assert_eq!(c.version, v + 1);
    wait_until(30, "both agents converged on the new version", || {
        converged(v + 1)
    })
    .await;
    agents[0].wait_all_active("vma-1").await;
    echo_roundtrip(extra, b"after the restart").await.unwrap();
    for a in agents {
        a.shutdown().await;
    }
}

async fn coordinator_get<T: serde::de::DeserializeOwned>(
    api: &tunnelfleet_ops::api::ApiClient,
    path: &str,
) -> T {
    api.get(path).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_of_another_protocol_version_leaves_tunnels_and_cache_alone() {
    if !Sshd::available("fleet") {
        return;
    }
    let Pushed {
        sshd: _sshd,
        c,
        agent,
        agent_toml,
        pki_dir,
        coord_state,
        l,
        v,
        _echo,
        _dir,
    } = pushed().await;
    let port = c.addr.port();
    let reconnects = agent.profile("oma").await.reconnects;
    // The coordinator is replaced by a release that speaks another protocol version.
    c.stop().await;
    let other = OtherVersionCoordinator::start(&pki_dir, port).await;
    // Refused both ways (its refusal, then its welcome refused by the agent), and retried.
    wait_until(
        30,
        "the agent retrying the refusing coordinator",
        || async { other.hellos().len() >= 4 },
    )
    .await;
    for h in other.hellos() {
        assert_eq!(h.protocol, tunnelfleet_protocol::PROTOCOL_VERSION);
        assert_eq!(h.applied_version, Some(v), "{h:?}");
    }
    // The tunnel was never touched: same session, data flows.
    echo_roundtrip(l, b"refused by the coordinator")
        .await
        .unwrap();
    let p = agent.profile("oma").await;
    assert_eq!(p.reconnects, reconnects);
    assert_eq!(p.state, TunnelState::Up);

    // Restarted meanwhile, the agent runs its cached profiles and says which version it runs.
    agent.shutdown().await;
    let seen = other.hellos().len();
    let agent = TestAgent::start(&agent_toml).await;
    agent.wait_all_active("oma").await;
    echo_roundtrip(l, b"cached while refused").await.unwrap();
    wait_until(30, "hellos from the restarted agent", || async {
        other.hellos().len() >= seen + 2
    })
    .await;
    let restarted = other.hellos();
    assert_eq!(restarted[seen].applied_version, Some(v));
    assert!(
        restarted[seen].started_unix_ms > restarted[0].started_unix_ms,
        "{restarted:?}"
    );

    // A coordinator of our version back on the same port: the agent's retries find it.
    other.stop().await;
    let c = TestCoordinator::start(&pki_dir, &coord_state, port).await;
    wait_until(30, "agent connected again", || async {
        c.fleet.links.connected() == vec!["vma-1"]
    })
    .await;
    wait_until(20, "heartbeats again", || async {
        c.fleet.links.get("vma-1").is_some_and(|a| a.heartbeats > 0)
    })
    .await;
    assert_eq!(
        c.fleet
            .store
            .agent("vma-1")
            .unwrap()
            .unwrap()
            .applied_version,
        Some(v)
    );
    echo_roundtrip(l, b"our version again").await.unwrap();
    agent.shutdown().await;
    c.stop().await;
}

/// An agent that lists two coordinators (one fleet CA) links to one, moves to the other when
/// its own goes away, and back when that one is gone and the first has returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_listing_two_coordinators_moves_to_the_other_when_its_own_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &["localhost".into()]).unwrap();
    let files = pki::issue_agent(&pki_dir, "vma-1", 365, &dir.path().join("agent")).unwrap();
    let states = [dir.path().join("a"), dir.path().join("b")];
    let a = TestCoordinator::start(&pki_dir, &states[0], 0).await;
    let b = TestCoordinator::start(&pki_dir, &states[1], 0).await;
    let addrs = [a.addr, b.addr];
    let toml = coordinator_toml(&a, &files, &dir.path().join("agent-state")).replace(
        &format!("address = \"{}\"", a.addr),
        &format!("address = [\"{}\", \"{}\"]", a.addr, b.addr),
    );
    assert!(toml.contains(&b.addr.to_string()), "{toml}");
    let _agent = TestAgent::start(&toml).await;
    let on = |c: &TestCoordinator| c.fleet.links.connected() == vec!["vma-1"];
    wait_until(20, "linked to one of the two", || async {
        on(&a) || on(&b)
    })
    .await;
    let (first, other) = if on(&a) { (a, b) } else { (b, a) };
    assert!(!on(&other), "linked to one coordinator at a time");
    let i = usize::from(first.addr == addrs[1]);

    first.stop().await;
    wait_until(20, "relinked to the other coordinator", || async {
        on(&other)
    })
    .await;

    // The first one comes back on its own port; the second goes away: back to the first.
    let first_again = TestCoordinator::start(&pki_dir, &states[i], addrs[i].port()).await;
    other.stop().await;
    wait_until(20, "relinked to the first coordinator again", || async {
        on(&first_again)
    })
    .await;
    first_again.stop().await;
}
