//! The rest of this target's tests (helpers in `main.rs`).

use super::*;

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
