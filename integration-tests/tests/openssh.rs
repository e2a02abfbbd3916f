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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_threshold_tries_a_fresh_session_that_must_pass_and_a_pass_resets_the_count() {
    if !Sshd::available("health") {
        return;
    }
    let sshd = Sshd::start();
    let api = http_service("oma-api").await;
    let l = free_port();
    let health = format!(
        "[profile.health]\nhttp = \"http://127.0.0.1:{l}/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nthreshold = 3\n"
    );
    let agent = TestAgent::on(&sshd, &[format!("L {l}:localhost:{}", api.port)], &health).await;
    wait_until(20, "healthy checks", || async {
        let h = agent.profile("oma").await.health.unwrap();
        h.checks >= 2 && h.last.is_some_and(|r| r.ok)
    })
    .await;
    assert_eq!(agent.profile("oma").await.reconnects, 0);
    let logins = || sshd.log().matches("Accepted publickey").count();
    let before = logins();
    api.failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // Three failures in a row: a fresh session is tried make-before-break; its own check fails
    // too (the API is down, not the tunnel), so the working session stays and says why.
    wait_until(
        20,
        "a fresh session tried and refused by its own check",
        || async {
            let p = agent.profile("oma").await;
            p.last_error.as_deref().is_some_and(|e| {
                e.contains("health check failed 3 times in a row (HTTP 503); staying on")
                    && e.contains("through the new session")
                    && e.contains("HTTP 503")
            })
        },
    )
    .await;
    assert!(
        logins() > before,
        "no fresh session was tried:\n{}",
        sshd.log()
    );
    let p = agent.profile("oma").await;
    assert_eq!(
        (p.state, p.reconnects),
        (TunnelState::Up, 0),
        "the working session was torn down: {p:?}"
    );
    let h = agent.profile("oma").await.health.unwrap();
    assert!(h.failures >= 3, "{h:?}");
    assert!(!h.last.as_ref().unwrap().ok);
    assert!(h.last.unwrap().detail.contains("503"));
    api.failing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    wait_until(20, "healthy again", || async {
        let h = agent.profile("oma").await.health.unwrap();
        h.healthy && h.consecutive_failures == 0
    })
    .await;
    // On-demand check through the control socket.
    match agent.call(Request::Health { name: "oma".into() }).await {
        Response::Health(r) => assert!(r.ok, "{r:?}"),
        other => panic!("{other:?}"),
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_conflict_names_the_port_and_the_other_forwards_keep_working() {
    if !Sshd::available("port_conflict") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port();
    let l = free_port();
    let agent = TestAgent::on(
        &sshd,
        &[
            format!("L {busy}:localhost:{echo}"),
            format!("L {l}:localhost:{echo}"),
        ],
        "",
    )
    .await;
    wait_until(20, "conflict reported, other forward active", || async {
        let p = agent.profile("oma").await;
        p.forwards[0].state == ForwardState::Retrying && p.forwards[1].state == ForwardState::Active
    })
    .await;
    let detail = agent.profile("oma").await.forwards[0]
        .detail
        .clone()
        .unwrap();
    assert!(
        detail.contains(&format!("port {busy} is already in use")),
        "{detail}"
    );
    echo_roundtrip(l, b"unaffected").await.unwrap();
    // When the port frees up, the forward binds without a restart.
    drop(taken);
    wait_until(20, "forward binds after the port is freed", || async {
        agent.profile("oma").await.forwards[0].state == ForwardState::Active
    })
    .await;
    echo_roundtrip(busy, b"now bound").await.unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_restart_through_the_control_socket() {
    if !Sshd::available("control") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let l = free_port();
    let agent = TestAgent::on(&sshd, &[format!("L {l}:localhost:{echo}")], "").await;
    wait_until(20, "up", || async {
        agent.profile("oma").await.state == TunnelState::Up
    })
    .await;
    assert!(matches!(
        agent.call(Request::Stop { name: "oma".into() }).await,
        Response::Ok { .. }
    ));
    assert_eq!(agent.profile("oma").await.state, TunnelState::Stopped);
    assert!(
        echo_roundtrip(l, b"x").await.is_err(),
        "port closed after stop"
    );
    assert!(matches!(
        agent.call(Request::Start { name: "oma".into() }).await,
        Response::Ok { .. }
    ));
    wait_until(20, "up again", || async {
        agent.profile("oma").await.state == TunnelState::Up
    })
    .await;
    assert!(matches!(
        agent.call(Request::Restart { name: "oma".into() }).await,
        Response::Ok { .. }
    ));
    wait_until(20, "restarted", || async {
        let p = agent.profile("oma").await;
        p.reconnects == 1 && p.state == TunnelState::Up
    })
    .await;
    echo_roundtrip(l, b"after restart").await.unwrap();
    match agent
        .call(Request::Stop {
            name: "nope".into(),
        })
        .await
    {
        Response::Error { message } => assert!(message.contains("\"nope\""), "{message}"),
        other => panic!("{other:?}"),
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_open_connections_and_cancels_remote_forwards() {
    if !Sshd::available("drain") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    let vma = http_service("vma").await;
    let (l, r) = (free_port(), free_port());
    // A drain far longer than the test: the open connection, not a clock, ends it.
    let agent = TestAgent::start_with(
        "drain_timeout = \"10m\"",
        &profile_toml(
            "oma",
            &[sshd.endpoint()],
            &sshd,
            &[
                format!("L {l}:localhost:{echo}"),
                format!("R {r}:localhost:{}", vma.port),
            ],
            "",
        ),
    )
    .await;
    agent.wait_all_active("oma").await;
    // A connection open before shutdown keeps working during the drain.
    let mut open = tokio::net::TcpStream::connect(("127.0.0.1", l))
        .await
        .unwrap();
    open.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.unwrap();
    let shutdown = tokio::spawn(agent.shutdown());
    // New connections are refused at once (the listener is closed first)...
    wait_until(10, "listener closed", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", l))
            .await
            .is_err()
    })
    .await;
    // ...and the remote forward was cancelled on the server.
    wait_until(10, "remote port released on the server", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", r))
            .await
            .is_err()
    })
    .await;
    // ...while the open one still carries data, and the shutdown waits for it.
    open.write_all(b"during").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    assert!(
        !shutdown.is_finished(),
        "shut down with a connection still open"
    );
    // Its end (the application closes it) ends the drain: the shutdown completes.
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    shutdown.await.unwrap();
}

/// ProxyJump: the OMA reached through a bastion (a second real sshd). Data flows, the bastion
/// authenticated the agent and both host keys are verified; the bastion killed, the session
/// goes with it and the failures are the jump's (never evidence against the OMA); the tunnel
/// comes back with the bastion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_host_carries_the_session_and_its_failures_are_its_own() {
    use tunnelfleet_protocol::ErrorKind;
    if !Sshd::available("jump") {
        return;
    }
    let oma = Sshd::start();
    let mut bastion = Sshd::start_sharing_client_key(&oma);
    let (echo, _e) = echo_server().await;
    let l = free_port();
    let extra = format!(
        "host_key_fingerprints = [{:?}, \"{} {}\"]\njump = [\"{}@{}\"]",
        oma.fingerprint,
        bastion.endpoint(),
        bastion.fingerprint,
        bastion.user,
        bastion.endpoint()
    );
    let agent = TestAgent::on(&oma, &[format!("L {l}:localhost:{echo}")], &extra).await;
    agent.wait_all_active("oma").await;
    assert_eq!(
        agent.profile("oma").await.jump,
        [format!("{}@{}", bastion.user, bastion.endpoint())]
    );
    echo_roundtrip(l, b"through the bastion").await.unwrap();
    let log = bastion.log();
    assert!(
        log.contains("Accepted publickey"),
        "the bastion was not used:\n{log}"
    );

    // The bastion gone takes the session with it: it was carrying it.
    bastion.kill_all();
    wait_until(30, "the session lost and retried at the jump", || async {
        let p = agent.profile("oma").await;
        p.state != TunnelState::Up
            && p.errors
                .iter()
                .any(|e| e.kind == ErrorKind::Jump && e.last_detail.contains("via jump host"))
    })
    .await;
    let p = agent.profile("oma").await;
    assert!(
        p.errors.iter().all(|e| !e.kind.implicates_endpoint()),
        "a bastion outage counted against the OMA: {:?}",
        p.errors
    );
    bastion.restart();
    wait_until(30, "back through the restarted bastion", || async {
        agent.profile("oma").await.state == TunnelState::Up
    })
    .await;
    echo_roundtrip(l, b"through the bastion again")
        .await
        .unwrap();
    agent.shutdown().await;
}

/// An unknown host key at the jump host is refused like an endpoint's, naming the hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_host_with_an_unknown_key_is_refused_naming_it() {
    use tunnelfleet_protocol::ErrorKind;
    if !Sshd::available("jump_host_key") {
        return;
    }
    let oma = Sshd::start();
    let bastion = Sshd::start_sharing_client_key(&oma);
    let l = free_port();
    // Only the OMA's key is trusted (its known_hosts): the bastion's is unknown.
    let extra = format!("jump = [\"{}\"]", bastion.endpoint());
    let agent = TestAgent::on(&oma, &[format!("L {l}:localhost:9")], &extra).await;
    wait_until(20, "the jump host refused for its key", || async {
        agent.profile("oma").await.errors.iter().any(|e| {
            e.kind == ErrorKind::Jump
                && e.last_detail.contains(&bastion.endpoint())
                && e.last_detail.contains(&bastion.fingerprint)
        })
    })
    .await;
    assert!(
        !bastion.log().contains("Accepted publickey"),
        "authenticated to an unverified jump host"
    );
    assert_ne!(agent.profile("oma").await.state, TunnelState::Up);
    agent.shutdown().await;
}

/// Pins belong to a host. With the bastion pinned by name and the OMA's key bare, a server at
/// the OMA's address offering the bastion's key (the bastion standing in for the OMA behind
/// it) is refused, while the bastion itself is trusted by its pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bastion_pin_never_vouches_for_the_endpoint_behind_it() {
    use tunnelfleet_protocol::ErrorKind;
    if !Sshd::available("pin_per_host") {
        return;
    }
    let oma = Sshd::start();
    let bastion = Sshd::start_sharing_client_key(&oma);
    // The impostor: an sshd at another address holding the bastion's host key.
    let mut impostor = Sshd::start_sharing_client_key(&oma);
    for f in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
        std::fs::copy(bastion.dir.path().join(f), impostor.dir.path().join(f)).unwrap();
    }
    impostor.restart();
    let extra = format!(
        "host_key_fingerprints = [{:?}, \"{} {}\"]\njump = [\"{}@{}\"]",
        oma.fingerprint,
        bastion.endpoint(),
        bastion.fingerprint,
        bastion.user,
        bastion.endpoint()
    );
    // The profile's endpoint is the impostor's address (its known_hosts has no line for it).
    let toml = profile_toml(
        "oma",
        &[impostor.endpoint()],
        &oma,
        &[format!("L {}:localhost:9", free_port())],
        &extra,
    );
    let agent = TestAgent::start(&toml).await;
    wait_until(20, "the bastion's key refused for the endpoint", || async {
        agent.profile("oma").await.errors.iter().any(|e| {
            e.kind == ErrorKind::HostKey
                && e.last_detail.contains(&impostor.port.to_string())
                && e.last_detail.contains(&bastion.fingerprint)
        })
    })
    .await;
    assert!(
        bastion.log().contains("Accepted publickey"),
        "the bastion, pinned by name, was not trusted:\n{}",
        bastion.log()
    );
    assert!(
        !impostor.log().contains("Accepted publickey"),
        "authenticated to the impostor"
    );
    assert_ne!(agent.profile("oma").await.state, TunnelState::Up);
    agent.shutdown().await;
}

/// Two jump hosts in a row (`ssh -J a,b`): the second is reached through a channel of the
/// first, the OMA through a channel of the second — the only way there is (test hosts in a line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jump_hosts_in_a_row_carry_the_session() {
    if !NetHost::available("two_jumps") {
        return;
    }
    // Three hosts in a line: this namespace reaches only the outer bastion, the outer only
    // the inner, the inner only the OMA. The session can only exist through both, in order.
    let (h_outer, h_inner, h_oma) = (NetHost::create(), NetHost::create(), NetHost::create());
    h_outer.link_to(&h_inner);
    h_inner.link_to(&h_oma);
    let outer = Sshd::start_in(&h_outer);
    let inner = Sshd::start_sharing_client_key_in(&outer, &h_inner);
    let oma = Sshd::start_sharing_client_key_in(&outer, &h_oma);
    let api_port = free_port();
    let _api = NsHttp::start_on(&h_oma, "oma api", api_port);
    h_inner.cut(&h_inner.iface);
    h_oma.cut(&h_oma.iface);
    assert!(
        std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from((h_oma.addr, oma.port)),
            std::time::Duration::from_millis(500)
        )
        .is_err(),
        "the OMA is reachable directly"
    );
    let l = free_port();
    let extra = format!(
        "host_key_fingerprints = [{:?}, \"{} {}\", \"{} {}\"]\njump = [{:?}, {:?}]",
        oma.fingerprint,
        outer.endpoint(),
        outer.fingerprint,
        inner.endpoint(),
        inner.fingerprint,
        outer.endpoint(),
        inner.endpoint()
    );
    // The OMA's endpoint; the client key (shared by all three) and known_hosts from `outer`.
    let toml = profile_toml(
        "oma",
        &[oma.endpoint()],
        &outer,
        &[format!("L {l}:localhost:{api_port}")],
        &extra,
    );
    let agent = TestAgent::start(&toml).await;
    agent.wait_all_active("oma").await;
    let (status, body) = http_get(l, "/health").await.unwrap();
    assert_eq!((status, body.as_str()), (200, "oma api ok"));
    for (name, s) in [("outer", &outer), ("inner", &inner), ("OMA", &oma)] {
        assert!(
            s.log().contains("Accepted publickey"),
            "{name} not logged into:\n{}",
            s.log()
        );
    }
    agent.shutdown().await;
}

/// A local client that stops reading while its server keeps sending does not stop the other
/// connections of the session (russh hands every channel's data over from one loop): another
/// forward keeps carrying data, and the stuck connection is closed once it holds too much.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_reader_that_stops_does_not_stall_the_session() {
    if !Sshd::available("stalled_reader") {
        return;
    }
    let sshd = Sshd::start();
    let (echo, _e) = echo_server().await;
    // A server that sends for ever.
    let firehose = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hose = firehose.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = firehose.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 1 << 20];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let (l_hose, l_echo) = (free_port(), free_port());
    let agent = TestAgent::on(
        &sshd,
        &[
            format!("L {l_hose}:127.0.0.1:{hose}"),
            format!("L {l_echo}:127.0.0.1:{echo}"),
        ],
        "",
    )
    .await;
    agent.wait_all_active("oma").await;
    // Connected, then never read.
    let mut stuck = tokio::net::TcpStream::connect(("127.0.0.1", l_hose))
        .await
        .unwrap();
    // 64 MiB through the other forward while the firehose pushes: each MiB within 10 s.
    let payload = vec![0xc3u8; 1 << 20];
    for i in 0..64 {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            echo_roundtrip(l_echo, &payload),
        )
        .await
        .unwrap_or_else(|_| panic!("the session stalled behind a reader that stopped (MiB {i})"))
        .unwrap();
    }
    // The stuck connection was closed by the agent once it held its backlog: reading now
    // ends (after what the socket buffers hold) instead of waiting for ever.
    let drained = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match stuck.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the stuck connection was never closed");
    agent.shutdown().await;
}
