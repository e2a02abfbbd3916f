//! The rest of this target's tests (helpers in `main.rs`).

use super::*;

/// One appliance cut off from the primary (its own link to it dropped by nftables) while the
/// coordinator and the other appliance still reach the primary: that agent — the real binary,
/// in a test host of its own — moves to the standby on its own at once and data flows there;
/// the group stays where it is (one agent never moves a group); `oma list` and `agents show` say
/// it diverged and why. Its link back, it returns to the group's choice after the stable period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_cut_off_from_the_primary_moves_on_its_own_and_the_group_stays() {
    if !NetHost::available("failover_partition") {
        return;
    }
    let (h1, h2, site) = (NetHost::create(), NetHost::create(), NetHost::create());
    let primary = Sshd::start_in(&h1);
    let standby = Sshd::start_sharing_client_key_in(&primary, &h2);
    let (api_port, echo_port) = (free_port(), free_port());
    let _services = [
        NsHttp::start_on(&h1, "oma-a api", api_port),
        NsHttp::start_on(&h2, "oma-b api", api_port),
        NsHttp::echo_on(&h1, echo_port),
        NsHttp::echo_on(&h2, echo_port),
    ];
    // The site's own paths to both OMAs; the coordinator and vma-2 reach them from here.
    let site_to_primary = site.link_to(&h1);
    let _site_to_standby = site.link_to(&h2);
    let sink = WebhookSink::start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start_on(
        dir.path(),
        Duration::from_millis(500),
        vec![webhook(dir.path(), &sink)],
        site.peer,
    )
    .await;
    let _: Changed = c
        .api
        .call(
            "PUT",
            "/v1/groups/oma",
            Some(&group(&primary, &standby, Duration::from_secs(3))),
        )
        .await
        .unwrap();
    let f = fleet_in(
        &c,
        dir.path(),
        &primary,
        &standby,
        api_port,
        echo_port,
        Some(&site),
    )
    .await;
    let (vma1, _, vma1_api, _) = &f.agents[0];
    let api_body = || async { site.http_get(*vma1_api, "/health").map(|(_, b)| b) };
    wait_until(30, "vma-1 through the primary", || async {
        api_body().await.is_ok_and(|b| b == "oma-a api ok")
    })
    .await;

    h1.cut(&site_to_primary);
    wait_until(30, "vma-1 through the standby on its own", || async {
        api_body().await.is_ok_and(|b| b == "oma-b api ok")
    })
    .await;
    let p = vma1.profile("vma-1").await;
    assert_eq!(p.active_endpoint, standby.endpoint());
    assert!(
        p.failover_log
            .last()
            .is_some_and(|m| m.reason.contains("keepalive timeout")),
        "{:?}",
        p.failover_log
    );
    // The coordinator shows it diverged, and why.
    wait_until(20, "vma-1 shown diverged in oma list", || async {
        oma(&c.api).await.iter().any(|e| {
            e.endpoint == primary.endpoint()
                && e.diverged.iter().any(|d| {
                    d.starts_with(&format!("vma-1/vma-1 on {}", standby.endpoint()))
                        && d.contains("keepalive timeout")
                })
        })
    })
    .await;
    let shown: serde_json::Value = c.api.get("/v1/agents/vma-1").await.unwrap();
    assert_eq!(shown["placement"][0]["follows"], false, "{shown}");
    assert_eq!(
        shown["placement"][0]["group_active"],
        primary.endpoint().as_str()
    );
    // Well past the grace a move takes, with the other agent still on the primary: the group
    // stays, no incident.
    let beats = |id: &'static str| {
        let api = &c.api;
        async move {
            let list: Vec<tunnelfleet_coordinator::admin::AgentSummary> =
                api.get("/v1/agents").await.unwrap();
            list.iter()
                .find(|a| a.id == id)
                .map(|a| a.heartbeats)
                .unwrap_or(0)
        }
    };
    let from = beats("vma-1").await;
    wait_until(
        60,
        "40 more heartbeats from vma-1 (20 s at 500 ms)",
        || async { beats("vma-1").await >= from + 40 },
    )
    .await;
    let view = oma(&c.api).await;
    assert!(
        view.iter()
            .any(|e| e.endpoint == primary.endpoint() && e.active),
        "one agent moved the group: {view:?}"
    );
    assert!(group_moves(&c.api).await.is_empty());
    assert!(deliveries(&sink, "oma_unhealthy", "firing").is_empty());
    assert!(deliveries(&sink, "oma_down", "firing").is_empty());
    let (vma2, id2, ..) = &f.agents[1];
    assert_eq!(vma2.profile(id2).await.active_endpoint, primary.endpoint());

    h1.restore();
    wait_until(30, "vma-1 back on the group's choice", || async {
        api_body().await.is_ok_and(|b| b == "oma-a api ok")
    })
    .await;
    wait_until(20, "no one diverged any more", || async {
        oma(&c.api).await.iter().all(|e| e.diverged.is_empty())
    })
    .await;
    f.shutdown().await;
    c.stop().await;
}

/// Planned maintenance: `oma drain` of the primary moves every agent to the standby
/// make-before-break (a connection opened before keeps flowing, on the session it started on;
/// nobody reconnects), no incident; `oma undrain` brings the group back after the stable
/// period, the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oma_drain_moves_every_agent_make_before_break_and_undrain_brings_them_back() {
    if !Sshd::available("failover_drain") {
        return;
    }
    let OnPrimary {
        primary,
        standby,
        api_service: _api_service,
        sink,
        c,
        f,
        _echo,
        _dir,
    } = on_primary().await;
    let (_, _, _, l_echo) = &f.agents[0];
    let mut open = tokio::net::TcpStream::connect(("127.0.0.1", *l_echo))
        .await
        .unwrap();
    echo_on(&mut open, b"before the drain").await;

    let d: Done = c
        .api
        .call(
            "POST",
            "/v1/oma/drain",
            Some(&serde_json::json!({"endpoint": primary.endpoint()})),
        )
        .await
        .unwrap();
    assert!(d.message.contains(&primary.endpoint()), "{}", d.message);
    f.all_on(&standby.endpoint(), "after the drain").await;
    echo_on(&mut open, b"through the drain").await;
    let view = oma(&c.api).await;
    assert!(
        view.iter()
            .any(|e| e.endpoint == primary.endpoint() && e.drained && !e.active),
        "{view:?}"
    );
    for (agent, id, ..) in &f.agents {
        let p = agent.profile(id).await;
        assert_eq!((p.reconnects, p.failovers), (0, 1), "{p:?}");
        // Drained endpoints are not pushed: the profile follows the group's list.
        assert_eq!(p.endpoints, vec![standby.endpoint()], "{p:?}");
    }
    assert!(sink.delivered().is_empty(), "a drain is not an incident");

    let _: Done = c
        .api
        .call(
            "POST",
            "/v1/oma/undrain",
            Some(&serde_json::json!({"endpoint": primary.endpoint()})),
        )
        .await
        .unwrap();
    f.all_on(&primary.endpoint(), "after the undrain").await;
    echo_on(&mut open, b"through the undrain").await;
    let moves = group_moves(&c.api).await;
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert!(moves[0].contains("drained"), "{moves:?}");
    assert!(moves[1].contains("failback"), "{moves:?}");
    drop(open);
    f.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_and_bouncing_primary_gets_one_failover_and_one_failback_only_once_stable() {
    if !Sshd::available("failover_bounce") {
        return;
    }
    let mut primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let api_service = http_service("oma api").await;
    let (echo, _e) = echo_server().await;
    let sink = WebhookSink::start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(
        dir.path(),
        Duration::from_millis(500),
        vec![webhook(dir.path(), &sink)],
    )
    .await;
    let _: Changed = c
        .api
        .call(
            "PUT",
            "/v1/groups/oma",
            // Longer than the bounce can take, however slow this machine: no failback can
            // land in it. (That a bounce restarts the stable period's clock is the monitor's
            // paused-clock test.)
            Some(&group(&primary, &standby, Duration::from_secs(3600))),
        )
        .await
        .unwrap();
    let f = fleet(&c, dir.path(), &primary, &standby, api_service.port, echo).await;
    f.all_on(&primary.endpoint(), "start").await;

    // The loud case: killed outright.
    primary.kill_all();
    f.all_on(&standby.endpoint(), "after the kill").await;
    let down = |api: ApiClient, ep: String| async move {
        oma(&api)
            .await
            .iter()
            .any(|e| e.endpoint == ep && e.state == "down")
    };
    wait_until(
        20,
        "the coordinator's probes finding the primary down",
        || down(c.api.clone(), primary.endpoint()),
    )
    .await;
    // It bounces: up long enough to pass probes, down again before the stable period ends.
    primary.restart();
    let up = |api: ApiClient, ep: String| async move {
        oma(&api)
            .await
            .iter()
            .any(|e| e.endpoint == ep && e.state == "up")
    };
    wait_until(20, "the primary passing probes", || {
        up(c.api.clone(), primary.endpoint())
    })
    .await;
    primary.kill_all();
    wait_until(20, "the primary down again", || {
        down(c.api.clone(), primary.endpoint())
    })
    .await;
    assert_eq!(
        group_moves(&c.api).await.len(),
        1,
        "failed back onto a bouncing primary"
    );
    primary.restart();
    // Stable from here; a stable period this test can wait for.
    let _: Changed = c
        .api
        .call(
            "PUT",
            "/v1/groups/oma",
            Some(&group(&primary, &standby, Duration::from_secs(2))),
        )
        .await
        .unwrap();
    f.all_on(&primary.endpoint(), "after the stable period")
        .await;
    let moves = group_moves(&c.api).await;
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert!(moves[1].contains("failback"), "{moves:?}");
    // Two outages, two incidents, each resolved.
    wait_until(20, "both resolutions delivered", || async {
        deliveries(&sink, "oma_down", "resolved").len() == 2
    })
    .await;
    assert_eq!(deliveries(&sink, "oma_down", "firing").len(), 2);

    // A planned move on command: make-before-break, and `oma failback` brings it home.
    let d: Done = c
        .api
        .call::<(), _>("POST", "/v1/groups/oma/failover", None)
        .await
        .unwrap();
    assert!(d.message.contains(&standby.endpoint()), "{}", d.message);
    f.all_on(&standby.endpoint(), "after oma failover").await;
    let d: Done = c
        .api
        .call::<(), _>("POST", "/v1/groups/oma/failback", None)
        .await
        .unwrap();
    assert!(d.message.contains(&primary.endpoint()), "{}", d.message);
    f.all_on(&primary.endpoint(), "after oma failback").await;
    f.shutdown().await;
    c.stop().await;
}

/// The coordinator away (SIGKILL), the primary killed: the agent moves to the standby on its
/// own and its tunnels carry data; the restarted coordinator learns of that move from its
/// heartbeats and logs it as the agent's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_own_failover_while_the_coordinator_is_away_is_reported_when_it_returns() {
    if !Sshd::available("failover_own_reported") {
        return;
    }
    let mut primary = Sshd::start();
    let standby = Sshd::start_sharing_client_key(&primary);
    let (echo, _e) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let mut c = CoordinatorProcess::start(dir.path(), "500ms").await;
    let _: Changed = c
        .api
        .call(
            "PUT",
            "/v1/groups/oma",
            Some(&group(&primary, &standby, Duration::from_secs(3600))),
        )
        .await
        .unwrap();
    let agent = TestAgent::start(&agent_section(c.control, dir.path(), "vma-1", "")).await;
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
    assign_group_profile(&c.api, "vma-1", "oma", &profile).await;
    agent.wait_all_active("vma-1").await;
    assert_eq!(
        agent.profile("vma-1").await.active_endpoint,
        primary.endpoint()
    );

    c.kill9();
    primary.kill_all();
    wait_until(30, "the agent on the standby on its own", || async {
        let p = agent.profile("vma-1").await;
        p.active_endpoint == standby.endpoint() && p.failover_log.len() == 1
    })
    .await;
    echo_roundtrip(l, b"through the standby").await.unwrap();

    c.restart().await;
    let expected = format!(
        "agent vma-1 profile vma-1 moved on its own from {} to {}: session to {} lost",
        primary.endpoint(),
        standby.endpoint(),
        primary.endpoint()
    );
    wait_until(
        30,
        "the agent's own move in the coordinator's events",
        || async {
            let events: Vec<Event> = c.api.get("/v1/events").await.unwrap_or_default();
            events.iter().any(|e| e.text.starts_with(&expected))
        },
    )
    .await;
    let events: Vec<Event> = c.api.get("/v1/events").await.unwrap();
    assert_eq!(
        events
            .iter()
            .filter(|e| e.text.starts_with(&expected))
            .count(),
        1,
        "reported more than once"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undelivered_alert_survives_a_coordinator_sigkill_and_is_delivered_after_restart() {
    let sink = WebhookSink::start(0).await.unwrap();
    sink.failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    tunnelfleet_coordinator::pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let secret = dir.path().join("webhook.secret");
    write_secret(&secret, SECRET.as_bytes());
    let hooks = format!(
        "\n[[hook]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{}/alerts\"\nsecret_file = \"{}\"\ntimeout = \"1s\"\n",
        sink.port,
        secret.display()
    );
    let mut c = CoordinatorProcess::start_with(dir.path(), "500ms", &hooks).await;
    // An OMA endpoint nobody listens on: down after three probes.
    let dead = put_dead_group(&c.api).await;
    // The receiver refuses: the delivery stays in the outbox, retried.
    wait_until(20, "a refused delivery attempt", || async {
        !sink.received().is_empty()
    })
    .await;
    let key = sink.received()[0]
        .header("idempotency-key")
        .unwrap()
        .to_string();
    assert_eq!(sink.received()[0].json()["alert"]["subject"], dead.as_str());
    // The sink records the request before the coordinator sees the 503: wait for the
    // outbox to account for the failed attempt.
    c.wait_hook_backlog("503").await;

    c.kill9();
    sink.failing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    c.restart().await;
    wait_until(
        20,
        "the queued alert delivered after the restart",
        || async { !sink.delivered().is_empty() },
    )
    .await;
    let delivered = sink.delivered();
    assert_eq!(delivered[0].header("idempotency-key"), Some(key.as_str()));
    assert_signed(&delivered[0]);
    // The incident is still the same one: the restarted coordinator did not raise another.
    let alerts: serde_json::Value = c.api.get("/v1/alerts").await.unwrap();
    assert_eq!(alerts.as_array().unwrap().len(), 1, "{alerts}");
    wait_until(10, "the outbox empty", || async {
        let h: serde_json::Value = c.api.get("/v1/hooks").await.unwrap();
        h[0]["pending"] == 0
    })
    .await;
}
