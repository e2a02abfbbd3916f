//! Coordinator-driven failover between two real OpenSSH servers (OMA primary and standby),
//! with alerts delivered to a real HTTP webhook receiver.
//!
//! - The primary blackholed (SIGSTOP of its listener and every session process, so only
//!   timeouts can tell): the coordinator's probes see no SSH banner, one `oma_down` incident
//!   naming both agents reaches the webhook with a valid HMAC signature, the group moves to the
//!   standby and the forwards carry data again; the primary comes back, the incident resolves,
//!   and the group fails back only after the stable period.
//! - The primary killed outright and bouncing: one failover, no failback while it bounces,
//!   one failback once it is stable.
//! - The OMA's API down while its sshd answers (the seed's own `GET /health` failing through
//!   the tunnel): three failed checks in a row reach the webhook as one `tunnel_health` alert
//!   per agent, and passing checks resolve them. With the OMAs as hosts of their own (network
//!   namespaces, each with its own API), most agents failing there is one `oma_unhealthy`
//!   incident and the group moves to the standby make-before-break; a trial failback resolves it.
//! - An undelivered alert survives a SIGKILL of the coordinator process and is delivered by
//!   the restarted one with the same idempotency key.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;
use std::time::Duration;

use integration_tests::*;
use tunnelfleet_coordinator::admin::{Changed, Done};
use tunnelfleet_coordinator::hooks::{HookConfig, SIGNATURE_HEADER};
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::store::{Event, OmaGroup};
use tunnelfleet_ops::api::ApiClient;

const SECRET: &str = "webhook-shared-secret-for-the-test";

fn group(primary: &Sshd, standby: &Sshd, failback_after: Duration) -> OmaGroup {
    OmaGroup::probed(
        "oma",
        vec![primary.endpoint(), standby.endpoint()],
        Duration::from_millis(500),
        Duration::from_millis(400),
        failback_after,
    )
}

fn webhook(dir: &Path, sink: &WebhookSink) -> HookConfig {
    let secret = dir.join("webhook.secret");
    write_secret(&secret, SECRET.as_bytes());
    HookConfig::webhook(
        "ops",
        format!("http://127.0.0.1:{}/alerts", sink.port),
        secret,
    )
}

/// Two agents, each with its own profile on group `oma` (one machine plays both appliances).
struct Fleet {
    agents: Vec<(TestAgent, String, u16, u16)>,
}

async fn fleet(
    c: &FullCoordinator,
    dir: &Path,
    primary: &Sshd,
    standby: &Sshd,
    api_port: u16,
    echo: u16,
) -> Fleet {
    fleet_in(c, dir, primary, standby, api_port, echo, None).await
}

/// Like [`fleet`], with vma-1 as the agent binary inside test host `site` when given.
async fn fleet_in(
    c: &FullCoordinator,
    dir: &Path,
    primary: &Sshd,
    standby: &Sshd,
    api_port: u16,
    echo: u16,
    site: Option<&NetHost>,
) -> Fleet {
    let mut agents = Vec::new();
    for id in ["vma-1", "vma-2"] {
        let section = c.agent_section(dir, id, "site = \"dc1\"");
        // A session left by a move carries its open connections until they end (bounded by
        // the drain): long here, so no clock decides whether a test's connection survived.
        let drain = "drain_timeout = \"10m\"";
        let agent = match site {
            Some(host) if id == "vma-1" => TestAgent::start_in(host, drain, &section).await,
            _ => TestAgent::start_with(drain, &section).await,
        };
        let (l_api, l_echo) = (free_port(), free_port());
        let pins = format!(
            "host_key_fingerprints = [{:?}, {:?}]\nfailback_after = \"2s\"\n[profile.health]\nhttp = \"http://127.0.0.1:{l_api}/health\"\ninterval = \"500ms\"\ntimeout = \"1s\"\n",
            primary.fingerprint, standby.fingerprint
        );
        let profile = profile_toml(
            id,
            &[primary.endpoint()],
            primary,
            &[
                format!("L {l_api}:localhost:{api_port}"),
                format!("L {l_echo}:localhost:{echo}"),
            ],
            &pins,
        );
        assign_group_profile(&c.api, id, "oma", &profile).await;
        agents.push((agent, id.to_string(), l_api, l_echo));
    }
    Fleet { agents }
}

impl Fleet {
    /// Every agent on `endpoint` with data flowing through both forwards.
    async fn all_on(&self, endpoint: &str, what: &str) {
        for (agent, id, l_api, l_echo) in &self.agents {
            wait_until(
                30,
                &format!("{id} carrying data through {endpoint} ({what})"),
                || async {
                    let s = agent.status().await;
                    s.profiles.iter().any(|p| {
                        p.name == *id
                            && p.active_endpoint == endpoint
                            && p.state == tunnelfleet_agent::status::TunnelState::Up
                    }) && echo_roundtrip(*l_echo, b"through the tunnel").await.is_ok()
                        && http_get(*l_api, "/health")
                            .await
                            .is_ok_and(|(c, _)| c == 200)
                },
            )
            .await;
        }
    }

    async fn shutdown(self) {
        for (a, ..) in self.agents {
            a.shutdown().await;
        }
    }
}

/// The webhook deliveries for `kind` with `status` (`firing`/`resolved`).
fn deliveries(sink: &WebhookSink, kind: &str, status: &str) -> Vec<Received> {
    sink.delivered()
        .into_iter()
        .filter(|r| {
            let j = r.json();
            j["alert"]["kind"] == kind && j["status"] == status
        })
        .collect()
}

/// Checks the signature independently of the coordinator's code (ring's HMAC).
fn assert_signed(r: &Received) {
    let sig = r.header(SIGNATURE_HEADER).expect("signature header");
    let hex = sig.strip_prefix("sha256=").expect("sha256= prefix");
    let tag = data_encoding::HEXLOWER.decode(hex.as_bytes()).expect("hex");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    ring::hmac::verify(&key, &r.body, &tag).expect("valid HMAC-SHA256 signature");
    assert!(r.header("idempotency-key").is_some());
}

/// Writes `payload` and reads it back on an open connection through an echo forward.
async fn echo_on(conn: &mut tokio::net::TcpStream, payload: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    conn.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
}

async fn oma(api: &ApiClient) -> Vec<EndpointView> {
    api.get("/v1/oma").await.unwrap()
}

async fn group_moves(api: &ApiClient) -> Vec<String> {
    let events: Vec<Event> = api.get("/v1/events").await.unwrap();
    events
        .into_iter()
        .map(|e| e.text)
        .filter(|t| t.starts_with("OMA group oma: active endpoint"))
        .collect()
}

/// Two real sshd OMAs in group `oma` (failback after 3 s), the coordinator with a webhook
/// receiver, and both agents carrying data through the primary.
struct OnPrimary {
    primary: Sshd,
    standby: Sshd,
    api_service: HttpService,
    sink: WebhookSink,
    c: FullCoordinator,
    f: Fleet,
    _echo: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

async fn on_primary() -> OnPrimary {
    let primary = Sshd::start();
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
            Some(&group(&primary, &standby, Duration::from_secs(3))),
        )
        .await
        .unwrap();
    let f = fleet(&c, dir.path(), &primary, &standby, api_service.port, echo).await;
    f.all_on(&primary.endpoint(), "start").await;
    OnPrimary {
        primary,
        standby,
        api_service,
        sink,
        c,
        f,
        _echo: _e,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_primary_fails_over_with_one_signed_incident_and_fails_back_when_stable() {
    if !Sshd::available("failover_blackhole") {
        return;
    }
    // Every field bound by name: a field left to `..` would drop (echo server, temp dir) here.
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

    // Blackhole: no RST, no FIN; the probes and keepalives can only time out.
    let frozen = primary.freeze();
    f.all_on(&standby.endpoint(), "after the blackhole").await;
    wait_until(20, "the OMA-down incident at the webhook", || async {
        !deliveries(&sink, "oma_down", "firing").is_empty()
    })
    .await;
    let view = oma(&c.api).await;
    assert!(
        view.iter()
            .any(|e| e.endpoint == standby.endpoint() && e.active),
        "{view:?}"
    );
    assert!(
        view.iter()
            .any(|e| e.endpoint == primary.endpoint() && e.state == "down"),
        "{view:?}"
    );

    Sshd::thaw(&frozen);
    wait_until(20, "the incident's resolution at the webhook", || async {
        !deliveries(&sink, "oma_down", "resolved").is_empty()
    })
    .await;
    // Failback once the primary has passed every probe for the stable period.
    f.all_on(&primary.endpoint(), "after failback").await;

    // Exactly one incident, signed, naming the endpoint and both agents; one resolution of
    // the same alert.
    let firing = deliveries(&sink, "oma_down", "firing");
    assert_eq!(firing.len(), 1, "one incident, not one per agent");
    assert_signed(&firing[0]);
    let alert = &firing[0].json()["alert"];
    assert_eq!(alert["subject"], primary.endpoint().as_str());
    assert_eq!(
        alert["affected_agents"],
        serde_json::json!(["vma-1", "vma-2"])
    );
    let resolved = deliveries(&sink, "oma_down", "resolved");
    assert_eq!(resolved.len(), 1);
    assert_signed(&resolved[0]);
    assert_eq!(resolved[0].json()["alert"]["id"], alert["id"]);
    // (Whether agents' failing checks are held under the incident depends here on how many
    // checks fit before the move; the hold is shown with the agent's real counts in
    // coordinator::monitor's tests, and tunnel_health firing end to end in the next test.)
    let moves = group_moves(&c.api).await;
    assert_eq!(moves.len(), 2, "{moves:?}");
    assert!(moves[0].contains("failover"), "{moves:?}");
    assert!(moves[1].contains("failback"), "{moves:?}");
    f.shutdown().await;
    c.stop().await;
}

/// Regression: the agent reset its failure count when it reached the threshold (and restarted
/// the session), so no heartbeat ever carried three failures and `tunnel_health` never fired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oma_api_down_while_its_sshd_answers_raises_tunnel_health_after_three_failed_checks() {
    if !Sshd::available("failover_api_down") {
        return;
    }
    let OnPrimary {
        primary: _primary,
        standby: _standby,
        api_service,
        sink,
        c,
        f,
        _echo,
        _dir,
    } = on_primary().await;

    // The API behind the OMA answers 503; its sshd (and so the coordinator's probe) is fine.
    api_service
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until(
        30,
        "tunnel_health for both agents at the webhook",
        || async { deliveries(&sink, "tunnel_health", "firing").len() == 2 },
    )
    .await;
    let mut subjects: Vec<String> = deliveries(&sink, "tunnel_health", "firing")
        .iter()
        .map(|r| {
            r.json()["alert"]["subject"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["vma-1/vma-1", "vma-2/vma-2"]);
    let summary = deliveries(&sink, "tunnel_health", "firing")[0].json()["alert"]["summary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(summary.contains("HTTP 503"), "{summary}");
    // sshd answers: not an OMA incident.
    assert!(deliveries(&sink, "oma_down", "firing").is_empty());

    api_service
        .failing
        .store(false, std::sync::atomic::Ordering::Relaxed);
    wait_until(30, "both tunnel_health alerts resolved", || async {
        deliveries(&sink, "tunnel_health", "resolved").len() == 2
    })
    .await;
    f.shutdown().await;
    c.stop().await;
}

/// The seed's own health check failing on two OMAs that are hosts of their own (network
/// namespaces: each sshd with its own API and NBD on its own `localhost`): the primary's API
/// answers 503 while its sshd answers the probes. Both agents' checks through it fail: one
/// `oma_unhealthy` incident naming what fails, and the group moves to the standby, whose API
/// works — make-before-break: a connection opened before the move keeps flowing, and the agents
/// keep their sessions' counters. The API fixed, a trial failback finds the checks passing on
/// the primary and the incident resolves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oma_api_down_while_its_sshd_answers_is_one_incident_and_the_group_moves_make_before_break()
 {
    if !NetHost::available("failover_api_down_hosts") {
        return;
    }
    let (h1, h2) = (NetHost::create(), NetHost::create());
    let primary = Sshd::start_in(&h1);
    let standby = Sshd::start_sharing_client_key_in(&primary, &h2);
    let (api_port, echo_port) = (free_port(), free_port());
    let api1 = NsHttp::start_on(&h1, "oma-a api", api_port);
    let _api2 = NsHttp::start_on(&h2, "oma-b api", api_port);
    let _echo1 = NsHttp::echo_on(&h1, echo_port);
    let _echo2 = NsHttp::echo_on(&h2, echo_port);
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
            Some(&group(&primary, &standby, Duration::from_secs(3))),
        )
        .await
        .unwrap();
    let f = fleet(&c, dir.path(), &primary, &standby, api_port, echo_port).await;
    f.all_on(&primary.endpoint(), "start").await;
    let (_, _, l_api, l_echo) = &f.agents[0];
    let (_, body) = http_get(*l_api, "/health").await.unwrap();
    assert_eq!(body, "oma-a api ok");
    let mut open = tokio::net::TcpStream::connect(("127.0.0.1", *l_echo))
        .await
        .unwrap();
    echo_on(&mut open, b"before the move").await;

    api1.set_failing(true);
    wait_until(30, "one oma_unhealthy incident at the webhook", || async {
        !deliveries(&sink, "oma_unhealthy", "firing").is_empty()
    })
    .await;
    f.all_on(&standby.endpoint(), "after the API failed").await;
    let (_, body) = http_get(*l_api, "/health").await.unwrap();
    assert_eq!(
        body, "oma-b api ok",
        "checks pass through the standby's own API"
    );
    // Opened on the primary before the move: still flowing, on the session it started on.
    echo_on(&mut open, b"through the move").await;
    let firing = deliveries(&sink, "oma_unhealthy", "firing");
    assert_eq!(firing.len(), 1, "one incident, not one per agent");
    let alert = &firing[0].json()["alert"];
    assert_eq!(alert["subject"], primary.endpoint().as_str());
    let summary = alert["summary"].as_str().unwrap_or_default();
    // Both agents' checks crossed their threshold about together: the incident counts them
    // failing there, or already gone for it (each moves on its own once a fresh session there
    // fails its check too, whichever the coordinator saw first).
    assert!(
        summary.contains("on 2 of 2 agents (HTTP 503)")
            || summary.contains("2 of 2 agents could not stay on it (health check failed 3 times in a row (HTTP 503))")
            || (summary.contains("of 2 agents (HTTP 503)") && summary.contains("could not stay on it (health check failed")),
        "{summary}"
    );
    assert!(
        deliveries(&sink, "oma_down", "firing").is_empty(),
        "its sshd answered: not oma_down"
    );
    let moves = group_moves(&c.api).await;
    assert!(moves[0].contains("fails its agents' tunnels"), "{moves:?}");
    for (agent, id, ..) in &f.agents {
        let p = agent.profile(id).await;
        // The move kept the session's history: no reconnect, one move counted.
        assert_eq!((p.reconnects, p.failovers), (0, 1), "{p:?}");
    }

    api1.set_failing(false);
    wait_until(
        60,
        "the incident resolved after a trial failback",
        || async { !deliveries(&sink, "oma_unhealthy", "resolved").is_empty() },
    )
    .await;
    f.all_on(&primary.endpoint(), "after the failback").await;
    // Closed before the shutdown, whose drain would wait for it.
    drop(open);
    f.shutdown().await;
    c.stop().await;
}

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
