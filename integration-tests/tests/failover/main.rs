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

mod more;
