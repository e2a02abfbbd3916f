//! The agent against a real OpenSSH sshd: forwards, SOCKS, host keys, restarts, failover,
//! health, port conflicts.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use integration_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnelfleet_agent::status::{ForwardState, TunnelState};
use tunnelfleet_agent::supervisor::{Request, Response};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_forwards_carry_data_both_ways_on_one_session_and_two_profiles_run() {
    if !Sshd::available("seed_forwards") {
        return;
    }
    let sshd = Sshd::start();
    let oma_api = http_service("oma-api").await;
    let (nbd, _nbd) = echo_server().await;
    let vma_api = http_service("vma-api").await;
    let (l_api, l_nbd, l_alt, r_vma, l_b) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    // The seed's set: L 8082→8082, L 10809→10809, L 10808→10809, R 9081→8081 (ports remapped).
    let seed = profile_toml(
        "oma",
        &[sshd.endpoint()],
        &sshd,
        &[
            format!("L {l_api}:localhost:{}", oma_api.port),
            format!("L {l_nbd}:localhost:{nbd}"),
            format!("L {l_alt}:localhost:{nbd}"),
            format!("R {r_vma}:localhost:{}", vma_api.port),
        ],
        "",
    );
    let second = profile_toml(
        "second",
        &[sshd.endpoint()],
        &sshd,
        &[format!("L {l_b}:127.0.0.1:{nbd}")],
        "",
    );
    let agent = TestAgent::start(&format!("{seed}\n{second}")).await;
    wait_until(20, "both profiles up with every forward active", || async {
        let s = agent.status().await;
        s.profiles.iter().all(|p| {
            p.state == TunnelState::Up && p.forwards.iter().all(|f| f.state == ForwardState::Active)
        })
    })
    .await;
    let (code, body) = http_get(l_api, "/health").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "oma-api ok"));
    echo_roundtrip(l_nbd, &vec![7u8; 1 << 20]).await.unwrap();
    echo_roundtrip(l_alt, b"alternate nbd").await.unwrap();
    echo_roundtrip(l_b, b"second profile").await.unwrap();
    // Reverse: the OMA side (sshd's host) reaches the VMA API through the R forward.
    let (code, body) = http_get(r_vma, "/health").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "vma-api ok"));
    // One session for the four forwards: sshd forked one session process per profile.
    let oma = agent.profile("oma").await;
    assert_eq!(oma.forwards[1].bytes_out, 1 << 20);
    assert_eq!(oma.forwards[1].bytes_in, 1 << 20);
    assert!(
        oma.forwards[3].bytes_in > 0,
        "R forward counted: {:?}",
        oma.forwards[3]
    );
    let accepted = sshd.log().matches("Accepted publickey").count();
    assert_eq!(
        accepted,
        2,
        "one SSH session per profile; sshd log:\n{}",
        sshd.log()
    );
    agent.shutdown().await;
    // Graceful shutdown released the local ports.
    assert!(
        tokio::net::TcpListener::bind(("127.0.0.1", l_api))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_through_sshd_to_a_domain_name_and_to_an_ip() {
    if !Sshd::available("socks5") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let d = free_port();
    let agent = TestAgent::on(&sshd, &[format!("D {d}")], "").await;
    agent.wait_all_active("oma").await;
    for (atyp, addr) in [(3u8, b"localhost".to_vec()), (1u8, vec![127, 0, 0, 1])] {
        let (mut s, code) = socks_connect(d, atyp, &addr, echo).await.unwrap();
        assert_eq!(code, 0, "SOCKS reply for address type {atyp}");
        s.write_all(b"through socks").await.unwrap();
        let mut back = [0u8; 13];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"through socks");
    }
    // A target the server cannot reach gets "host unreachable", not a hang.
    let (_, code) = socks_connect(d, 1, &[127, 0, 0, 1], free_port())
        .await
        .unwrap();
    assert_eq!(code, 4);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_changed_host_keys_are_refused_with_the_fingerprint() {
    if !Sshd::available("host_keys") {
        return;
    }
    let sshd = Sshd::start();
    let l = free_port();
    // Unknown: an empty known_hosts.
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let agent = TestAgent::on(&sshd, &[format!("L {l}:localhost:22")], "").await;
    wait_until(20, "host key refusal reported", || async {
        agent
            .profile("oma")
            .await
            .last_error
            .is_some_and(|e| e.contains("not trusted"))
    })
    .await;
    let p = agent.profile("oma").await;
    let err = p.last_error.unwrap();
    assert!(err.contains(&sshd.fingerprint), "{err}");
    assert!(
        err.contains(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port)),
        "{err}"
    );
    assert_ne!(p.state, TunnelState::Up);
    assert!(
        !sshd.log().contains("Accepted publickey"),
        "must not authenticate to an untrusted host"
    );
    agent.shutdown().await;

    // Changed: known_hosts holds another ed25519 key for this host.
    let other = tempfile::tempdir().unwrap();
    keygen(&other.path().join("k"));
    let other_pub = std::fs::read_to_string(other.path().join("k.pub")).unwrap();
    let mut parts = other_pub.split_whitespace();
    std::fs::write(
        &sshd.known_hosts,
        format!(
            "[127.0.0.1]:{} {} {}\n",
            sshd.port,
            parts.next().unwrap(),
            parts.next().unwrap()
        ),
    )
    .unwrap();
    let agent = TestAgent::on(
        &sshd,
        &[format!("L {l}:localhost:22")],
        "trust_on_first_use = true",
    )
    .await;
    wait_until(20, "changed host key refusal reported", || async {
        agent
            .profile("oma")
            .await
            .last_error
            .is_some_and(|e| e.contains("HOST KEY CHANGED"))
    })
    .await;
    let err = agent.profile("oma").await.last_error.unwrap();
    assert!(err.contains(&sshd.fingerprint), "{err}");
    agent.shutdown().await;

    // Trust on first use, when asked: the key is recorded and the session comes up; the
    // recorded line is one OpenSSH itself accepts (`ssh-keygen -F` finds it).
    std::fs::write(&sshd.known_hosts, "").unwrap();
    let agent = TestAgent::on(
        &sshd,
        &[format!("L {l}:localhost:22")],
        "trust_on_first_use = true",
    )
    .await;
    agent.wait_all_active("oma").await;
    let found = std::process::Command::new("ssh-keygen")
        .args(["-F", &format!("[127.0.0.1]:{}", sshd.port), "-f"])
        .arg(&sshd.known_hosts)
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "ssh-keygen -F did not find the recorded key"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_killed_and_started_again_brings_every_forward_back() {
    if !Sshd::available("sshd_restart") {
        return;
    }
    let mut sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let vma = http_service("vma").await;
    let (l, r) = (free_port(), free_port());
    let agent = TestAgent::on(
        &sshd,
        &[
            format!("L {l}:localhost:{echo}"),
            format!("R {r}:localhost:{}", vma.port),
        ],
        "",
    )
    .await;
    agent.wait_all_active("oma").await;
    sshd.kill_all();
    wait_until(20, "session loss noticed", || async {
        agent.profile("oma").await.state != TunnelState::Up
    })
    .await;
    sshd.restart();
    agent.wait_all_active("oma").await;
    echo_roundtrip(l, b"after restart").await.unwrap();
    assert_eq!(http_get(r, "/health").await.unwrap().0, 200);
    assert!(agent.profile("oma").await.reconnects >= 1);
    agent.shutdown().await;
}

/// A connection an application makes while the session is down is accepted and waits for the
/// new session (up to `connect_timeout`) instead of being refused — what `ssh -L` under a
/// restart loop cannot do; it then carries data like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_during_a_reconnect_waits_for_the_new_session() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if !Sshd::available("wait_for_session") {
        return;
    }
    let mut sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let l = free_port();
    // The wait is connect_timeout: long here, so the restart below always fits in it.
    let toml = profile_toml(
        "oma",
        &[sshd.endpoint()],
        &sshd,
        &[format!("L {l}:localhost:{echo}")],
        "",
    )
    .replace("connect_timeout = \"2s\"", "connect_timeout = \"60s\"");
    let agent = TestAgent::start(&toml).await;
    agent.wait_all_active("oma").await;
    sshd.kill_all();
    wait_until(20, "session loss noticed", || async {
        agent.profile("oma").await.state != TunnelState::Up
    })
    .await;
    // Accepted by the listener that stayed bound, with no session behind it yet.
    let mut waiting = tokio::net::TcpStream::connect(("127.0.0.1", l))
        .await
        .unwrap();
    waiting.write_all(b"sent while down").await.unwrap();
    assert_ne!(agent.profile("oma").await.state, TunnelState::Up);
    sshd.restart();
    let mut back = [0u8; 15];
    waiting.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"sent while down");
    assert_eq!(agent.profile("oma").await.state, TunnelState::Up);
    agent.shutdown().await;
}

/// A frozen sshd answers no channel open: connections pile up behind it, but only
/// `MAX_OPENING` of a forward's ask at once (russh holds ~18 kB for each until it is answered;
/// bench-chaos's probes grew agents by 12 MB this way); the others wait their turn, and when the
/// server wakes every one of them is carried, in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_piling_up_on_a_frozen_server_ask_for_a_bounded_number_of_channels() {
    use tunnelfleet_agent::local::MAX_OPENING;
    if !Sshd::available("frozen_opens") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let l = free_port();
    // Keepalive and connect_timeout long enough that neither the session nor the waiting
    // connections give up while the server is frozen.
    let toml = profile_toml(
        "oma",
        &[sshd.endpoint()],
        &sshd,
        &[format!("L {l}:localhost:{echo}")],
        "",
    )
    .replace("connect_timeout = \"2s\"", "connect_timeout = \"300s\"")
    .replace(
        "keepalive_interval = \"1s\"",
        "keepalive_interval = \"300s\"",
    );
    let agent = TestAgent::start(&toml).await;
    agent.wait_all_active("oma").await;
    echo_roundtrip(l, b"before").await.unwrap();
    let frozen = sshd.freeze();
    let n = 3 * MAX_OPENING + 5;
    let mut conns = Vec::new();
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", l))
            .await
            .unwrap();
        s.write_all(format!("{i:04}").as_bytes()).await.unwrap();
        conns.push(s);
    }
    let forward = || async { agent.profile("oma").await.forwards[0].clone() };
    wait_until(
        30,
        "every connection accepted and the first turns taken",
        || async {
            let f = forward().await;
            f.connections_open == n as u64 && f.connections_opening >= MAX_OPENING as u64
        },
    )
    .await;
    let f = forward().await;
    assert_eq!(
        f.connections_opening, MAX_OPENING as u64,
        "channels asked for on the frozen server"
    );
    Sshd::thaw(&frozen);
    for (i, s) in conns.iter_mut().enumerate() {
        let mut back = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(60), s.read_exact(&mut back))
            .await
            .unwrap_or_else(|_| panic!("connection {i} not carried after the thaw"))
            .unwrap();
        assert_eq!(&back, format!("{i:04}").as_bytes());
    }
    assert_eq!(forward().await.connections_opening, 0);
    agent.shutdown().await;
}

/// The autossh failure: the server still holds the remote port for the old, frozen session.
/// The agent must keep asking until the port is free, not give up or run without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_forward_held_by_a_stale_session_is_retried_until_free() {
    if !Sshd::available("stale_remote_port") {
        return;
    }
    let sshd = Sshd::start();
    let vma = http_service("vma").await;
    let r = free_port();
    let agent = TestAgent::on(&sshd, &[format!("R {r}:localhost:{}", vma.port)], "").await;
    wait_until(20, "R active", || async {
        agent.profile("oma").await.forwards[0].state == ForwardState::Active
    })
    .await;
    // Freeze only the session process: it keeps port r bound but never answers again.
    let stale = sshd.session_pids();
    assert!(!stale.is_empty());
    for &p in &stale {
        signal(p, libc::SIGSTOP);
    }
    wait_until(
        30,
        "new session with the remote forward refused",
        || async {
            let p = agent.profile("oma").await;
            p.reconnects >= 1 && p.forwards[0].state == ForwardState::Retrying
        },
    )
    .await;
    let detail = agent.profile("oma").await.forwards[0]
        .detail
        .clone()
        .unwrap();
    assert!(detail.contains(&r.to_string()), "{detail}");
    for &p in &stale {
        signal(p, libc::SIGKILL);
    }
    wait_until(30, "R re-established once the port is free", || async {
        agent.profile("oma").await.forwards[0].state == ForwardState::Active
    })
    .await;
    assert_eq!(http_get(r, "/health").await.unwrap().0, 200);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_primary_fails_over_to_the_standby_and_data_flows() {
    if !Sshd::available("failover") {
        return;
    }
    let mut primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let (echo, _e) = echo_server().await;
    let l = free_port();
    let agent = TestAgent::on_pair(&primary, &standby, &[format!("L {l}:localhost:{echo}")]).await;
    wait_until(20, "up on the primary", || async {
        let p = agent.profile("oma").await;
        p.state == TunnelState::Up && p.active_endpoint == primary.endpoint()
    })
    .await;
    primary.kill_all();
    wait_until(30, "failed over to the standby", || async {
        let p = agent.profile("oma").await;
        p.state == TunnelState::Up && p.active_endpoint == standby.endpoint()
    })
    .await;
    echo_roundtrip(l, b"via standby").await.unwrap();
    let p = agent.profile("oma").await;
    assert_eq!(p.failovers, 1);
    assert!(standby.log().contains("Accepted publickey"));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_primary_is_detected_by_keepalive_and_the_standby_takes_over() {
    if !Sshd::available("blackhole") {
        return;
    }
    let primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let (echo, _e) = echo_server().await;
    let l = free_port();
    let agent = TestAgent::on_pair(&primary, &standby, &[format!("L {l}:localhost:{echo}")]).await;
    wait_until(20, "up on the primary", || async {
        agent.profile("oma").await.state == TunnelState::Up
    })
    .await;
    let frozen = primary.freeze();
    wait_until(40, "failed over to the standby", || async {
        let p = agent.profile("oma").await;
        p.state == TunnelState::Up && p.active_endpoint == standby.endpoint()
    })
    .await;
    echo_roundtrip(l, b"via standby").await.unwrap();
    Sshd::thaw(&frozen);
    agent.shutdown().await;
}

mod more;
