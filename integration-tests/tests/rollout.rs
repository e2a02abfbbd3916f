//! Staged rollouts end to end: a coordinator, four agents over two sites, each with its own
//! profile through a real sshd. A change with a wrong OMA port halts at the canaries: they are
//! back on the previous version with data flowing, the other agents never got it and their
//! tunnels never blinked, `rollout_halted` fires, `tunnelfleet rollout` says how to go on, and
//! an abort restores the old profiles. A good change goes canary, wave, wave, in order.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_coordinator::admin::{Aborted, RolloutView};
use tunnelfleet_coordinator::rollout::{Canary, StartRequest};
use tunnelfleet_coordinator::store::{Alert, Rollout, RolloutState};
use tunnelfleet_protocol::ProfileSpec;

/// A coordinator and four agents (`vma-1`..`vma-4`, sites dc1/dc2 by turns), each running its
/// own pushed profile `oma-N`: `L port → echo` through the real sshd.
struct Fleet {
    sshd: Sshd,
    c: FullCoordinator,
    agents: Vec<(String, TestAgent, u16)>,
    echo: u16,
    dir: tempfile::TempDir,
    _echo: tokio_util::sync::DropGuard,
}

fn spec(sshd: &Sshd, name: &str, endpoint: &str, forwards: &[String]) -> ProfileSpec {
    AgentConfig::parse(
        &profile_toml(name, &[endpoint.to_string()], sshd, forwards, ""),
        Path::new("p.toml"),
    )
    .unwrap()
    .profiles
    .remove(0)
}

async fn fleet() -> Fleet {
    let sshd = Sshd::start();
    let (echo, _echo) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(300), vec![]).await;
    let agents = agents_on(&c.api, c.control, dir.path(), &sshd, echo).await;
    Fleet {
        sshd,
        c,
        agents,
        echo,
        dir,
        _echo,
    }
}

/// Four agents of the coordinator at `control` (`vma-1`..`vma-4`, sites dc1/dc2 by turns),
/// each given its own profile `oma-N` through `api`, all up with data flowing.
async fn agents_on(
    api: &tunnelfleet_ops::api::ApiClient,
    control: std::net::SocketAddr,
    dir: &Path,
    sshd: &Sshd,
    echo: u16,
) -> Vec<(String, TestAgent, u16)> {
    let mut agents = Vec::new();
    for i in 1..=4 {
        let id = format!("vma-{i}");
        let site = format!("site = \"dc{}\"", 2 - i % 2);
        let agent = TestAgent::start(&agent_section(control, dir, &id, &site)).await;
        agents.push((id, agent, free_port()));
    }
    wait_until(30, "four agents connected", || async {
        api.get::<Vec<serde_json::Value>>("/v1/agents")
            .await
            .is_ok_and(|v| v.len() == 4 && v.iter().all(|a| a["online"] == true))
    })
    .await;
    for (i, (id, _, port)) in agents.iter().enumerate() {
        let name = format!("oma-{}", i + 1);
        let p = spec(
            sshd,
            &name,
            &sshd.endpoint(),
            &[format!("L {port}:localhost:{echo}")],
        );
        integration_tests::put_and_assign(api, &p, id).await;
    }
    for (i, (_, agent, port)) in agents.iter().enumerate() {
        agent.wait_all_active(&format!("oma-{}", i + 1)).await;
        echo_roundtrip(*port, b"before").await.unwrap();
    }
    agents
}

async fn current(c: &FullCoordinator) -> Rollout {
    current_of(&c.api).await
}

async fn current_of(api: &tunnelfleet_ops::api::ApiClient) -> Rollout {
    let v: Option<RolloutView> = api.get("/v1/rollouts/current").await.unwrap();
    v.unwrap().rollout
}

/// Every profile with a second forward, `L second[i] → echo`.
fn with_second_forward(
    sshd: &Sshd,
    agents: &[(String, TestAgent, u16)],
    echo: u16,
    second: &[u16],
) -> Vec<ProfileSpec> {
    agents
        .iter()
        .enumerate()
        .map(|(i, (_, _, port))| {
            spec(
                sshd,
                &format!("oma-{}", i + 1),
                &sshd.endpoint(),
                &[
                    format!("L {port}:localhost:{echo}"),
                    format!("L {}:localhost:{echo}", second[i]),
                ],
            )
        })
        .collect()
}

/// An open connection through a tunnel: it echoes as long as the tunnel never blinked.
async fn held_open(port: u16) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.unwrap();
    s
}

async fn still_echoes(s: &mut tokio::net::TcpStream) {
    s.write_all(b"still").await.unwrap();
    let mut b = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("an answer through the held connection")
        .unwrap();
    assert_eq!(&b, b"still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_oma_port_halts_at_the_canaries_and_puts_them_back() {
    if !Sshd::available("rollout") {
        return;
    }
    let f = fleet().await;
    let c = &f.c;
    let mut held = Vec::new();
    let mut reconnects = BTreeMap::new();
    for (i, (id, agent, port)) in f.agents.iter().enumerate() {
        held.push(held_open(*port).await);
        reconnects.insert(
            id.clone(),
            agent.profile(&format!("oma-{}", i + 1)).await.reconnects,
        );
    }
    let before = c.fleet.store.fleet_version().unwrap();

    // The change: every profile to an OMA port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let bad: Vec<ProfileSpec> = f
        .agents
        .iter()
        .enumerate()
        .map(|(i, (_, _, port))| {
            spec(
                &f.sshd,
                &format!("oma-{}", i + 1),
                &dead,
                &[format!("L {port}:localhost:{}", f.echo)],
            )
        })
        .collect();
    let r: Rollout = c
        .api
        .call(
            "POST",
            "/v1/rollouts",
            Some(&StartRequest {
                profiles: bad,
                canary: Canary::Count(2),
                waves: 1,
                wait_ms: 2000,
                settle_ms: 6000,
            }),
        )
        .await
        .unwrap();
    assert_eq!(r.base_version, before);
    assert_eq!(r.stages.len(), 2, "{r:?}");
    let canaries = r.stages[0].agents.clone();
    // One canary per site.
    assert_eq!(canaries, ["vma-1", "vma-2"], "{r:?}");

    // Another profile change meanwhile is refused, naming the rollout.
    let e = c
        .api
        .call::<_, serde_json::Value>(
            "PUT",
            "/v1/profiles/other",
            Some(&spec(
                &f.sshd,
                "other",
                &f.sshd.endpoint(),
                &[format!("L {}:localhost:{}", free_port(), f.echo)],
            )),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("409") && e.contains("rollout"), "{e}");

    wait_until(60, "the rollout halted at the canaries", || async {
        current(c).await.state == RolloutState::Halted
    })
    .await;
    let r = current(c).await;
    eprintln!("halted: {:?}", r.reasons);
    assert_eq!(r.current, 0);
    assert_eq!(
        r.reasons.keys().cloned().collect::<Vec<_>>(),
        canaries,
        "{r:?}"
    );
    for why in r.reasons.values() {
        assert!(
            why.contains("not an endpoint it was given") || why.contains(&dead),
            "{why}"
        );
    }
    let alerts: Vec<Alert> = c.api.get("/v1/alerts").await.unwrap();
    let halted = alerts
        .iter()
        .find(|a| a.kind.as_str() == "rollout_halted")
        .expect("rollout_halted fires");
    assert_eq!(halted.affected_agents, canaries);

    // The canaries are back on the previous version, with data flowing.
    for (i, (id, agent, port)) in f.agents.iter().enumerate().take(2) {
        assert!(canaries.contains(id));
        let name = format!("oma-{}", i + 1);
        wait_until(30, "canary back on the previous endpoint", || async {
            agent.profile(&name).await.endpoints == vec![f.sshd.endpoint()]
        })
        .await;
        agent.wait_all_active(&name).await;
        echo_roundtrip(*port, b"after the halt").await.unwrap();
    }
    // The others never got it, and their tunnels never blinked.
    for (i, (id, agent, _)) in f.agents.iter().enumerate().skip(2) {
        let p = agent.profile(&format!("oma-{}", i + 1)).await;
        assert_eq!(p.endpoints, vec![f.sshd.endpoint()], "{id}");
        assert_eq!(p.reconnects, reconnects[id], "{id}");
    }
    for s in held.iter_mut().skip(2) {
        still_echoes(s).await;
    }

    // The CLI says where it stands and how to go on, and exits 1.
    let o = std::process::Command::new(Program::Cli.path())
        .args(["rollout", "--coordinator", c.api.addr(), "--token-file"])
        .arg(f.dir.path().join("admin.token"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("HALTED") && out.contains("rollout resume") && out.contains("vma-1"),
        "{out}"
    );

    // Abort: every profile as it was, as a new version; the alert resolves; changes allowed.
    let a: Aborted = c
        .api
        .call::<(), _>("POST", "/v1/rollouts/current/abort", None)
        .await
        .unwrap();
    assert!(a.version > r.version);
    assert_eq!(a.rollout.state, RolloutState::Aborted);
    let p: ProfileSpec = c.api.get("/v1/profiles/oma-3").await.unwrap();
    assert_eq!(p.endpoints, vec![f.sshd.endpoint()]);
    let alerts: Vec<Alert> = c.api.get("/v1/alerts").await.unwrap();
    assert!(
        !alerts.iter().any(|a| a.kind.as_str() == "rollout_halted"),
        "{alerts:?}"
    );
    for (i, (_, agent, port)) in f.agents.iter().enumerate() {
        agent.wait_all_active(&format!("oma-{}", i + 1)).await;
        echo_roundtrip(*port, b"after the abort").await.unwrap();
    }
    for s in held.iter_mut().skip(2) {
        still_echoes(s).await;
    }
    f.c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_change_goes_canary_then_wave_by_wave() {
    if !Sshd::available("rollout") {
        return;
    }
    let mut f = fleet().await;
    // vma-4 is away (its appliance off) for the whole rollout: it must not hold it.
    let (away, _, away_port) = f.agents.pop().unwrap();
    wait_until(30, "vma-4 seen gone", || async {
        !f.c.fleet.links.connected().contains(&away)
    })
    .await;
    let c = &f.c;
    // The change: a second forward on every profile.
    let second: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut good = with_second_forward(&f.sshd, &f.agents, f.echo, &second);
    good.push(spec(
        &f.sshd,
        "oma-4",
        &f.sshd.endpoint(),
        &[
            format!("L {away_port}:localhost:{}", f.echo),
            format!("L {}:localhost:{}", second[3], f.echo),
        ],
    ));
    let r: Rollout = c
        .api
        .call(
            "POST",
            "/v1/rollouts",
            Some(&StartRequest {
                profiles: good,
                canary: Canary::Count(1),
                waves: 2,
                wait_ms: 500,
                settle_ms: 30_000,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        r.stages.iter().map(|s| s.agents.len()).collect::<Vec<_>>(),
        [1, 2, 1]
    );
    // While the canary runs it, nobody else has it.
    let canary = r.stages[0].agents[0].clone();
    wait_until(30, "the canary has the second forward", || async {
        let i = f
            .agents
            .iter()
            .position(|(id, _, _)| *id == canary)
            .unwrap();
        echo_roundtrip(second[i], b"canary").await.is_ok()
    })
    .await;
    let r = current(c).await;
    if r.current == 0 {
        for (i, (id, _, _)) in f.agents.iter().enumerate() {
            if *id != canary {
                assert!(echo_roundtrip(second[i], b"x").await.is_err(), "{id}");
            }
        }
    }
    wait_until(60, "the rollout done", || async {
        current(c).await.state == RolloutState::Done
    })
    .await;
    let r = current(c).await;
    // Each stage started once the one before had passed.
    for w in r.stages.windows(2) {
        assert!(
            w[1].started_unix_ms.unwrap() >= w[0].passed_unix_ms.unwrap(),
            "{r:?}"
        );
    }
    // The canary was chosen among the connected; the one away was in a wave, not waited for.
    assert_ne!(r.stages[0].agents[0], away);
    let offline: Vec<&String> = r.stages.iter().flat_map(|s| &s.offline).collect();
    assert_eq!(offline, [&away], "{r:?}");
    for (i, (_, agent, _)) in f.agents.iter().enumerate() {
        agent.wait_all_active(&format!("oma-{}", i + 1)).await;
        echo_roundtrip(second[i], b"everyone").await.unwrap();
    }
    // Back, it runs the new version.
    let back = TestAgent::start(&c.agent_section(f.dir.path(), &away, "site = \"dc2\"")).await;
    back.wait_all_active("oma-4").await;
    echo_roundtrip(second[3], b"the one that was away")
        .await
        .unwrap();
    // Once done, a profile change is taken again.
    let _: serde_json::Value = c
        .api
        .call(
            "PUT",
            "/v1/profiles/other",
            Some(&spec(
                &f.sshd,
                "other",
                &f.sshd.endpoint(),
                &[format!("L {}:localhost:{}", free_port(), f.echo)],
            )),
        )
        .await
        .unwrap();
    f.c.stop().await;
}

/// kill -9 of the coordinator mid-rollout: it comes back at the stage it reached (the canary
/// is not run again), the stage's wait starts again, no agent beyond that stage gets the new
/// version before that stage passes, and the rollout finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_rollout_resumes_at_the_stage_it_reached() {
    if !Sshd::available("rollout") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _echo) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let mut c = CoordinatorProcess::start(dir.path(), "300ms").await;
    let agents = agents_on(&c.api, c.control, dir.path(), &sshd, echo).await;
    let second: Vec<u16> = agents.iter().map(|_| free_port()).collect();
    let r: Rollout = c
        .api
        .call(
            "POST",
            "/v1/rollouts",
            Some(&StartRequest {
                profiles: with_second_forward(&sshd, &agents, echo, &second),
                canary: Canary::Count(1),
                waves: 3,
                // Long enough that the kill lands inside wave 1's wait.
                wait_ms: 4000,
                settle_ms: 30_000,
            }),
        )
        .await
        .unwrap();
    let names: Vec<String> = r.stages.iter().map(|s| s.name.clone()).collect();
    assert_eq!(names, ["canary", "wave 1", "wave 2", "wave 3"]);
    let index = |id: &str| agents.iter().position(|(a, _, _)| a == id).unwrap();
    let wave = |n: usize| index(&r.stages[n].agents[0]);
    wait_until(60, "wave 1 promoted", || async {
        current_of(&c.api).await.current == 1
    })
    .await;
    let canary_passed = current_of(&c.api).await.stages[0].passed_unix_ms;
    c.kill9();
    c.restart().await;
    let restarted = tunnelfleet_runtime::clock::now_unix_ms();
    let again = current_of(&c.api).await;
    assert_eq!(again.state, RolloutState::Running);
    assert_eq!(again.current, 1, "back at the stage it reached");
    assert_eq!(
        again.stages[0].passed_unix_ms, canary_passed,
        "the canary is not run again"
    );
    // Wave 1's agent runs it (it was promoted before the kill); wave 2's does not yet.
    wait_until(30, "wave 1's agent has the second forward", || async {
        echo_roundtrip(second[wave(1)], b"wave 1").await.is_ok()
    })
    .await;
    if current_of(&c.api).await.current == 1 {
        assert!(
            echo_roundtrip(second[wave(2)], b"x").await.is_err(),
            "wave 2 got it before wave 1 passed"
        );
    }
    wait_until(90, "the rollout done after the restart", || async {
        current_of(&c.api).await.state == RolloutState::Done
    })
    .await;
    let done = current_of(&c.api).await;
    // Wave 1's wait was waited in full after the restart, not counted from before it.
    let passed = done.stages[1].passed_unix_ms.unwrap();
    assert!(
        passed >= restarted + 4000,
        "wave 1 passed {} ms after the restart",
        passed.saturating_sub(restarted)
    );
    for (i, (_, agent, _)) in agents.iter().enumerate() {
        agent.wait_all_active(&format!("oma-{}", i + 1)).await;
        echo_roundtrip(second[i], b"everyone").await.unwrap();
    }
}
