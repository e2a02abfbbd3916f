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
//!   per agent, and passing checks resolve them.
//! - An undelivered alert survives a SIGKILL of the coordinator process and is delivered by
//!   the restarted one with the same idempotency key.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;
use std::time::Duration;

use integration_tests::*;
use tunnelfleet_agent::config::AgentConfig;
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
    let mut agents = Vec::new();
    for id in ["vma-1", "vma-2"] {
        let agent = TestAgent::start(&c.agent_section(dir, id, "site = \"dc1\"")).await;
        let (l_api, l_echo) = (free_port(), free_port());
        let pins = format!(
            "host_key_fingerprints = [{:?}, {:?}]\n[profile.health]\nhttp = \"http://127.0.0.1:{l_api}/health\"\ninterval = \"500ms\"\ntimeout = \"1s\"\n",
            primary.fingerprint, standby.fingerprint
        );
        let local = AgentConfig::parse(
            &profile_toml(
                id,
                &[primary.endpoint()],
                primary,
                &[
                    format!("L {l_api}:localhost:{api_port}"),
                    format!("L {l_echo}:localhost:{echo}"),
                ],
                &pins,
            ),
            Path::new("p.toml"),
        )
        .unwrap();
        let mut spec = local.profiles[0].clone();
        spec.group = Some("oma".into());
        spec.endpoints.clear();
        let _: Changed = c
            .api
            .call("PUT", &format!("/v1/profiles/{id}"), Some(&spec))
            .await
            .unwrap();
        let _: Changed = c
            .api
            .call(
                "POST",
                "/v1/assignments",
                Some(&serde_json::json!({"profile": id, "agent": id})),
            )
            .await
            .unwrap();
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
    // No per-agent tunnel alerts for an OMA outage.
    assert!(deliveries(&sink, "tunnel_health", "firing").is_empty());
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
            Some(&group(&primary, &standby, Duration::from_secs(4))),
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
    let dead = format!("127.0.0.1:{}", free_port());
    let g = OmaGroup::probed(
        "oma",
        vec![dead.clone()],
        Duration::from_millis(200),
        Duration::from_millis(200),
        Duration::from_secs(300),
    );
    let _: Changed = c.api.call("PUT", "/v1/groups/oma", Some(&g)).await.unwrap();
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
