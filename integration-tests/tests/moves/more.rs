//! The rest of this target's tests (helpers in `main.rs`).

use super::*;

/// Two OMA endpoints behind one bastion (real sshd, SIGSTOPped: it stops answering): the
/// failures are the path's, so the profile never fails over to the standby however many there
/// are, and comes back on the primary with the bastion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bastion_outage_never_fails_over_to_the_standby() {
    if !Sshd::available("bastion_outage") {
        return;
    }
    let primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let bastion = Sshd::start_sharing_client_key(&primary);
    let (echo, _e) = echo_server().await;
    let l = free_port();
    let extra = format!(
        "host_key_fingerprints = [{:?}, {:?}, \"{} {}\"]\njump = [\"{}@{}\"]\n",
        primary.fingerprint,
        standby.fingerprint,
        bastion.endpoint(),
        bastion.fingerprint,
        bastion.user,
        bastion.endpoint()
    );
    let agent = TestAgent::start(&profile_toml(
        "oma",
        &[primary.endpoint(), standby.endpoint()],
        &primary,
        &[format!("L {l}:localhost:{echo}")],
        &extra,
    ))
    .await;
    agent.wait_all_active("oma").await;
    let frozen = bastion.freeze();
    // failover_after is 2 in the test profile: wait for well over that many failures.
    wait_until(60, "four jump failures in a row", || async {
        let p = agent.profile("oma").await;
        p.errors
            .iter()
            .filter(|e| e.kind == ErrorKind::Jump)
            .map(|e| e.count)
            .sum::<u64>()
            >= 4
    })
    .await;
    let p = agent.profile("oma").await;
    assert_eq!(p.active_endpoint, primary.endpoint(), "{p:?}");
    assert_eq!(p.failovers, 0, "a bastion outage moved the profile: {p:?}");
    assert!(
        p.errors.iter().all(|e| e.kind == ErrorKind::Jump),
        "a bastion outage counted against an OMA: {:?}",
        p.errors
    );
    Sshd::thaw(&frozen);
    wait_until(30, "back through the bastion on the primary", || async {
        let p = agent.profile("oma").await;
        all_active(&p) && p.active_endpoint == primary.endpoint()
    })
    .await;
    echo_roundtrip(l, b"through the bastion again")
        .await
        .unwrap();
    agent.shutdown().await;
}

/// Two OMA hosts of their own (network namespaces), each with its sshd and its API
/// (`oma-a api ok`, `oma-b api ok`) on the same port of its own `localhost`, and the forwards
/// of an appliance: `L l_api` to that API, `R r_vma` back to the appliance's API.
struct TwoHosts {
    h1: NetHost,
    h2: NetHost,
    primary: Sshd,
    standby: Sshd,
    l_api: u16,
    r_vma: u16,
    forwards: [String; 2],
    _services: [NsHttp; 2],
    _vma: HttpService,
}

async fn two_hosts() -> TwoHosts {
    let (h1, h2) = (NetHost::create(), NetHost::create());
    let primary = Sshd::start_in(&h1);
    let standby = Sshd::start_sharing_client_key_in(&primary, &h2);
    let api_port = free_port();
    let services = [
        NsHttp::start_on(&h1, "oma-a api", api_port),
        NsHttp::start_on(&h2, "oma-b api", api_port),
    ];
    let vma = http_service("vma-api").await;
    let (l_api, r_vma) = (free_port(), free_port());
    let forwards = [
        format!("L {l_api}:localhost:{api_port}"),
        format!("R localhost:{r_vma}:localhost:{}", vma.port),
    ];
    TwoHosts {
        h1,
        h2,
        primary,
        standby,
        l_api,
        r_vma,
        forwards,
        _services: services,
        _vma: vma,
    }
}

/// Two OMAs as hosts of their own (network namespaces, each sshd with its own API on its own
/// `localhost`), a standalone agent on the first. The first host blackholed (nftables drops
/// every packet: no RST, no FIN): keepalive notices, the agent goes to the standby at once —
/// the endpoint it lost never gets a connect attempt — and data flows there, the reverse path
/// included. The network back, the agent fails back once the primary answered for
/// `failback_after`, every forward bound and the health check passing through the new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_host_sends_a_standalone_agent_to_the_standby_and_back_once_stable() {
    if !NetHost::available("moves_netns_blackhole") {
        return;
    }
    let TwoHosts {
        h1,
        h2,
        primary,
        standby,
        l_api,
        r_vma,
        forwards,
        _services,
        _vma,
    } = two_hosts().await;
    let extra = format!(
        "{}failback_after = \"2s\"\n{}",
        pins(&primary, &standby),
        health(l_api)
    );
    let agent = TestAgent::start(&profile_toml(
        "oma",
        &[primary.endpoint(), standby.endpoint()],
        &primary,
        &forwards,
        &extra,
    ))
    .await;
    agent.wait_all_active("oma").await;
    let (_, body) = http_get(l_api, "/health").await.unwrap();
    assert_eq!(body, "oma-a api ok");

    h1.blackhole();
    wait_until(30, "on the standby with every forward bound", || async {
        let p = agent.profile("oma").await;
        all_active(&p) && p.active_endpoint == standby.endpoint()
    })
    .await;
    let (_, body) = http_get(l_api, "/health").await.unwrap();
    assert_eq!(body, "oma-b api ok", "data through the standby's own API");
    let (status, _) = h2.http_get(r_vma, "/health").unwrap();
    assert_eq!(status, 200, "the reverse path on the standby");
    let p = agent.profile("oma").await;
    let against_primary: Vec<_> = p
        .errors
        .iter()
        .filter(|e| e.endpoint == primary.endpoint())
        .map(|e| (e.kind, e.count))
        .collect();
    assert_eq!(
        against_primary,
        vec![(ErrorKind::SessionLost, 1)],
        "connect attempts spent on the endpoint just lost: {p:?}"
    );
    assert!(
        p.failover_log[0].reason.contains("keepalive timeout"),
        "{:?}",
        p.failover_log
    );

    h1.restore();
    wait_until(
        40,
        "back on the primary with every forward bound",
        || async {
            let p = agent.profile("oma").await;
            all_active(&p) && p.active_endpoint == primary.endpoint()
        },
    )
    .await;
    let (_, body) = http_get(l_api, "/health").await.unwrap();
    assert_eq!(body, "oma-a api ok");
    // The reverse forward listens on the OMA's own loopback: ask from there.
    let (status, body) = h1.http_get(r_vma, "/health").unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "vma-api ok"),
        "the reverse path after the failback"
    );
    agent.shutdown().await;
}

/// `standby = "warm"`: a second session is held open to the standby (authenticated, no
/// forwards) before anything fails, and the failover after a blackhole of the primary's host
/// takes it over: no new login on the standby, only the forwards set up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_standby_session_is_held_and_taken_over_without_a_new_login() {
    if !NetHost::available("moves_warm_standby") {
        return;
    }
    let TwoHosts {
        h1,
        h2,
        primary,
        standby,
        l_api,
        r_vma,
        forwards,
        _services,
        _vma,
    } = two_hosts().await;
    let extra = format!("{}standby = \"warm\"\n", pins(&primary, &standby));
    let agent = TestAgent::start(&profile_toml(
        "oma",
        &[primary.endpoint(), standby.endpoint()],
        &primary,
        &forwards,
        &extra,
    ))
    .await;
    agent.wait_all_active("oma").await;
    let logins = || standby.log().matches("Accepted publickey").count();
    wait_until(20, "the warm session logged in on the standby", || async {
        logins() == 1
    })
    .await;
    // No forwards on it: nothing listens on the reverse port on the standby yet.
    assert!(
        h2.http_get(r_vma, "/health").is_err(),
        "the warm session bound the reverse forward"
    );

    h1.blackhole();
    wait_until(30, "on the standby with every forward bound", || async {
        let p = agent.profile("oma").await;
        all_active(&p) && p.active_endpoint == standby.endpoint()
    })
    .await;
    let (_, body) = http_get(l_api, "/health").await.unwrap();
    assert_eq!(body, "oma-b api ok");
    assert_eq!(h2.http_get(r_vma, "/health").unwrap().0, 200);
    assert_eq!(
        logins(),
        1,
        "the failover logged in again:\n{}",
        standby.log()
    );
    h1.restore();
    agent.shutdown().await;
}

/// OMAs that let the agent in and throw it out a second later (real sshd with
/// `UnusedConnectionTimeout`: no channel is open on an idle tunnel): each such session counts
/// against its endpoint. With two endpoints the first loss moves at once, but once the standby
/// throws it out too the agent waits its backoff between moves instead of logging in again at
/// once; a profile with one such endpoint shows its failures in a row growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_throw_us_out_count_against_themselves_and_are_not_hammered() {
    if !Sshd::available("moves_short_sessions") {
        return;
    }
    let mut a = Sshd::start();
    let mut b = Sshd::start_sharing_client_key(&a);
    a.restart_with("UnusedConnectionTimeout 1s");
    b.restart_with("UnusedConnectionTimeout 1s");
    let (echo, _e) = echo_server().await;
    let slow = |t: String| {
        t.replace("reconnect_min = \"100ms\"", "reconnect_min = \"2s\"")
            .replace("reconnect_max = \"1s\"", "reconnect_max = \"20s\"")
    };
    let pair = slow(profile_toml(
        "pair",
        &[a.endpoint(), b.endpoint()],
        &a,
        &[format!("L {}:localhost:{echo}", free_port())],
        &pins(&a, &b),
    ));
    let one = slow(profile_toml(
        "one",
        &[a.endpoint()],
        &a,
        &[format!("L {}:localhost:{echo}", free_port())],
        "",
    ));
    let agent = TestAgent::start(&format!("{pair}\n{one}")).await;

    // Thrown out of A and then of B: the move back to A waits the backoff.
    wait_until(
        60,
        "pair waiting its backoff before the next move",
        || async {
            let p = agent.profile("pair").await;
            p.state == TunnelState::Backoff && p.failovers >= 2
        },
    )
    .await;
    let p = agent.profile("pair").await;
    for ep in [a.endpoint(), b.endpoint()] {
        assert!(
            p.errors
                .iter()
                .any(|e| e.endpoint == ep && e.kind == ErrorKind::SessionLost && e.count >= 1),
            "no lost session counted for {ep}: {:?}",
            p.errors
        );
    }
    // The first move was at once: it is the second that waited.
    assert_eq!(p.failover_log[0].from, a.endpoint(), "{:?}", p.failover_log);
    assert_eq!(p.failover_log[0].to, b.endpoint(), "{:?}", p.failover_log);

    // One endpoint: every short session is one more failure in a row, none resets the count.
    wait_until(60, "one's failures in a row growing", || async {
        let p = agent.profile("one").await;
        p.state == TunnelState::Backoff && p.failures_in_a_row >= 3
    })
    .await;
    let logins = |s: &Sshd| s.log().matches("Accepted publickey").count();
    assert!(logins(&a) >= 4 && logins(&b) >= 1, "{}", a.log());
    agent.shutdown().await;
}
