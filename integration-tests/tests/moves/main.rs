//! How a profile moves between endpoints on its own, against real OpenSSH sshd: a lost session
//! goes to the standby at once, failback is make-before-break with every forward (R included)
//! and a passing health check, a move that cannot bind stays where it works and says why, an
//! `R` port held by a stale session is freed (the OMA drop-in, `reclaim_remote_ports`), and a
//! bastion outage never fails over.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;

use integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnelfleet_agent::status::{ForwardState, ProfileStatus, TunnelState};
use tunnelfleet_protocol::ErrorKind;

/// Writes `payload` and reads it back on an open connection through an echo forward.
async fn echo_on(conn: &mut TcpStream, payload: &[u8]) {
    conn.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
}

fn all_active(p: &ProfileStatus) -> bool {
    p.state == TunnelState::Up && p.forwards.iter().all(|f| f.state == ForwardState::Active)
}

fn pins(a: &Sshd, b: &Sshd) -> String {
    format!(
        "host_key_fingerprints = [{:?}, {:?}]\n",
        a.fingerprint, b.fingerprint
    )
}

fn health(port: u16) -> String {
    format!(
        "[profile.health]\nhttp = \"http://127.0.0.1:{port}/health\"\ninterval = \"300ms\"\ntimeout = \"1s\"\nthreshold = 3\n"
    )
}

/// The seed's shape on two real sshd: a lost primary sends the profile to the standby at once
/// (no connect timeouts spent on the endpoint just lost); once the primary has answered for
/// `failback_after` the profile moves back make-before-break: the new session binds `R` and
/// passes the health check before it carries anything, and a connection opened on the standby
/// keeps flowing through the move. Counters and health history survive both moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_primary_moves_at_once_and_fails_back_make_before_break_with_every_forward() {
    if !Sshd::available("moves_failback") {
        return;
    }
    let mut primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let api = http_service("oma-api").await;
    let vma = http_service("vma-api").await;
    let (echo, _e) = echo_server().await;
    let (l_api, l_nbd, r_vma) = (free_port(), free_port(), free_port());
    let forwards = [
        format!("L {l_api}:localhost:{}", api.port),
        format!("L {l_nbd}:localhost:{echo}"),
        format!("R localhost:{r_vma}:localhost:{}", vma.port),
    ];
    let extra = format!(
        "{}failback_after = \"2s\"\n{}",
        pins(&primary, &standby),
        health(l_api)
    );
    // The session left by the move back carries the open connection until it ends: a drain
    // far longer than the test, so no clock decides it.
    let agent = TestAgent::start_with(
        "drain_timeout = \"10m\"",
        &profile_toml(
            "oma",
            &[primary.endpoint(), standby.endpoint()],
            &primary,
            &forwards,
            &extra,
        ),
    )
    .await;
    agent.wait_all_active("oma").await;

    primary.kill_all();
    wait_until(30, "on the standby with every forward bound", || async {
        let p = agent.profile("oma").await;
        all_active(&p) && p.active_endpoint == standby.endpoint()
    })
    .await;
    let p = agent.profile("oma").await;
    // The primary was left at the first sign: one lost session, not a single connect attempt.
    let against_primary: Vec<_> = p
        .errors
        .iter()
        .filter(|e| e.endpoint == primary.endpoint())
        .map(|e| (e.kind, e.count))
        .collect();
    assert_eq!(against_primary, vec![(ErrorKind::SessionLost, 1)], "{p:?}");
    assert_eq!(p.failover_log.len(), 1, "{:?}", p.failover_log);
    let (status, body) = http_get(r_vma, "/health").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "vma-api ok"));
    let mut open = TcpStream::connect(("127.0.0.1", l_nbd)).await.unwrap();
    echo_on(&mut open, b"on the standby").await;
    let checks_before = p.health.as_ref().unwrap().checks;

    primary.restart();
    wait_until(
        40,
        "back on the primary with every forward bound",
        || async {
            let p = agent.profile("oma").await;
            all_active(&p) && p.active_endpoint == primary.endpoint()
        },
    )
    .await;
    // The connection opened on the standby was never cut: it finishes where it started.
    echo_on(&mut open, b"through the move").await;
    // New connections and the reverse path go through the primary now.
    let mut fresh = TcpStream::connect(("127.0.0.1", l_nbd)).await.unwrap();
    echo_on(&mut fresh, b"on the primary").await;
    let (status, _) = http_get(r_vma, "/health").await.unwrap();
    assert_eq!(status, 200);
    let p = agent.profile("oma").await;
    assert_eq!(p.failovers, 2, "failover and failback both counted: {p:?}");
    assert_eq!(p.failover_log.len(), 2);
    assert!(
        p.failover_log[1]
            .reason
            .contains("back to the preferred endpoint"),
        "{:?}",
        p.failover_log
    );
    let h = p.health.unwrap();
    assert!(
        h.checks >= checks_before,
        "health history reset by the move: {h:?}"
    );
    assert!(h.last.is_some(), "health 'not run yet' after the move");
    // Closed before the shutdown, whose (long) drain would wait for them.
    drop((open, fresh));
    agent.shutdown().await;
}

/// A move back whose target refuses the reverse forward (here: PermitListen on the primary
/// allows another port) does not happen: the profile stays on the standby, where every
/// forward works, and its status names the forward and the reason. Once the primary allows
/// it, the next stable period brings the profile back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_back_that_cannot_bind_its_reverse_port_stays_where_it_works_and_says_why() {
    if !Sshd::available("moves_refused") {
        return;
    }
    let mut primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let vma = http_service("vma-api").await;
    let (echo, _e) = echo_server().await;
    let (l, r) = (free_port(), free_port());
    let forwards = [
        format!("L {l}:localhost:{echo}"),
        format!("R localhost:{r}:localhost:{}", vma.port),
    ];
    let extra = format!("{}failback_after = \"1s\"\n", pins(&primary, &standby));
    let agent = TestAgent::start(&profile_toml(
        "oma",
        &[primary.endpoint(), standby.endpoint()],
        &primary,
        &forwards,
        &extra,
    ))
    .await;
    agent.wait_all_active("oma").await;
    // The primary comes back allowing a different listen port only.
    primary.restart_with("PermitListen localhost:1\n");
    wait_until(30, "the move back refused, naming the forward", || async {
        let p = agent.profile("oma").await;
        p.active_endpoint == standby.endpoint()
            && p.last_error.as_deref().is_some_and(|e| {
                e.starts_with(&format!("staying on {}", standby.endpoint()))
                    && e.contains(&format!("R localhost:{r}"))
            })
    })
    .await;
    let p = agent.profile("oma").await;
    assert!(all_active(&p), "the standby kept every forward: {p:?}");
    let (status, _) = http_get(r, "/health").await.unwrap();
    assert_eq!(
        status, 200,
        "the reverse path stayed up through the refused move"
    );
    echo_roundtrip(l, b"still on the standby").await.unwrap();
    assert_eq!(p.failovers, 1);

    primary.restart_with("");
    wait_until(
        30,
        "back on the primary once it allows the port",
        || async {
            let p = agent.profile("oma").await;
            all_active(&p) && p.active_endpoint == primary.endpoint()
        },
    )
    .await;
    let (status, _) = http_get(r, "/health").await.unwrap();
    assert_eq!(status, 200);
    agent.shutdown().await;
}

/// A session cut off from its client (the ssh client SIGSTOPped: the TCP connection stays, the
/// client answers nothing) holds its `R` port; sshd's defaults keep it. Without
/// `reclaim_remote_ports` the agent's forward retries and says what holds it and what fixes it;
/// with it, the agent ends that stale session of its own account through its new session and
/// binds the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_remote_ports_ends_this_accounts_stale_session_holding_the_port() {
    if !Sshd::available("reclaim") {
        return;
    }
    let sshd = Sshd::start();
    let vma = http_service("vma-api").await;
    let stale_target = http_service("stale").await;
    let r = free_port();
    let mut stale = ssh_holding_remote_port(&sshd, r, stale_target.port);
    let stale_sessions = sshd.session_pids();
    signal(stale.id(), libc::SIGSTOP);
    let forwards = [format!("R localhost:{r}:localhost:{}", vma.port)];

    let plain = TestAgent::on(&sshd, &forwards, "").await;
    wait_until(
        20,
        "the held port reported with its cause and fix",
        || async {
            let p = plain.profile("oma").await;
            p.forwards[0].state == ForwardState::Retrying
                && p.forwards[0].detail.as_deref().is_some_and(|d| {
                    d.contains("stale session")
                        && d.contains("reclaim_remote_ports = true")
                        && d.contains("ops/deploy/oma/")
                })
        },
    )
    .await;
    plain.shutdown().await;
    // Nothing was killed without the setting.
    let alive = sshd.session_pids();
    assert!(
        stale_sessions.iter().all(|p| alive.contains(p)),
        "a stale session ended without reclaim_remote_ports: {stale_sessions:?} vs {alive:?}"
    );

    let agent = TestAgent::on(&sshd, &forwards, "reclaim_remote_ports = true\n").await;
    agent.wait_all_active("oma").await;
    let (status, body) = http_get(r, "/health").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "vma-api ok"));
    let alive: Vec<u32> = sshd.session_pids();
    assert!(
        stale_sessions.iter().any(|p| !alive.contains(p)),
        "the stale session's sshd process is still there: {stale_sessions:?} vs {alive:?}"
    );
    signal(stale.id(), libc::SIGCONT);
    let _ = stale.wait();
    agent.shutdown().await;
}

/// The OMA drop-in we ship (ops/deploy/oma/tunnelfleet.conf) makes a real sshd drop a session
/// whose client stopped answering, freeing its reverse port for the agent's new session with
/// no setting and no one's hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oma_drop_in_makes_sshd_drop_a_dead_session_and_free_its_reverse_port() {
    if !Sshd::available("oma_drop_in") {
        return;
    }
    let drop_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/oma/tunnelfleet.conf");
    let sshd = Sshd::start_with(&format!("Include {}\n", drop_in.display()));
    let vma = http_service("vma-api").await;
    let stale_target = http_service("stale").await;
    let r = free_port();
    let mut stale = ssh_holding_remote_port(&sshd, r, stale_target.port);
    signal(stale.id(), libc::SIGSTOP);
    let agent = TestAgent::on(
        &sshd,
        &[format!("R localhost:{r}:localhost:{}", vma.port)],
        "",
    )
    .await;
    // sshd probes the silent client and drops it (5 s × 3); the agent's retry then binds.
    wait_until(
        45,
        "the reverse forward bound once sshd dropped the dead session",
        || async { agent.profile("oma").await.forwards[0].state == ForwardState::Active },
    )
    .await;
    let (_, body) = http_get(r, "/health").await.unwrap();
    assert_eq!(body, "vma-api ok");
    assert!(
        sshd.log().contains("Timeout, client not responding"),
        "sshd did not drop it by ClientAlive:\n{}",
        sshd.log()
    );
    signal(stale.id(), libc::SIGCONT);
    let _ = stale.wait();
    agent.shutdown().await;
}

mod more;
