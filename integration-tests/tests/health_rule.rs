//! The agent's health rule end to end (`tunnelfleet_agent::placement::health_step`), with the
//! OMAs as hosts of their own (network namespaces: each real sshd with its own API on its own
//! `localhost`) and the coordinator's evidence over the real control link:
//!
//! - One appliance whose checks fail through the primary while its sshd answers (the seed's
//!   failure, with one agent — fewer than any group quorum): three failed checks, one fresh
//!   session on the primary (refused: its check fails too), then the standby, whose own check
//!   passes. Its `tunnel_health` alert fires; the group stays (one agent never moves it) and
//!   `oma list` and the fleet page (in Chromium) say the primary is degraded and why. The API back, it fails back after the
//!   stable period and the words go.
//! - An appliance whose check fails through an endpoint where another agent's passes: the
//!   fault is its own, it stays where the fleet is (alerted), however many crossings.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;
use std::time::Duration;

use integration_tests::*;
use tunnelfleet_coordinator::admin::Changed;
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::store::OmaGroup;

fn group(primary: &Sshd, standby: &Sshd) -> OmaGroup {
    OmaGroup::probed(
        "oma",
        vec![primary.endpoint(), standby.endpoint()],
        Duration::from_millis(500),
        Duration::from_millis(400),
        Duration::from_secs(2),
    )
}

fn webhook(dir: &Path, sink: &WebhookSink) -> tunnelfleet_coordinator::hooks::HookConfig {
    let secret = dir.join("webhook.secret");
    write_secret(&secret, b"a webhook secret of the health rule tests");
    tunnelfleet_coordinator::hooks::HookConfig::webhook(
        "ops",
        format!("http://127.0.0.1:{}/alerts", sink.port),
        secret,
    )
}

fn deliveries(sink: &WebhookSink, kind: &str, status: &str) -> Vec<serde_json::Value> {
    sink.delivered()
        .into_iter()
        .map(|r| r.json())
        .filter(|j| j["alert"]["kind"] == kind && j["status"] == status)
        .collect()
}

/// An agent with one profile on group `oma`: its check `GET /health` through `L l_api ->
/// localhost:api_port` on the OMA (threshold 3, the default, checks every 500 ms).
async fn agent_on_group(
    c: &FullCoordinator,
    dir: &Path,
    id: &str,
    primary: &Sshd,
    standby: &Sshd,
    api_port: u16,
) -> (TestAgent, u16) {
    let section = c.agent_section(dir, id, "site = \"dc1\"");
    let agent = TestAgent::start_with("", &section).await;
    let l_api = free_port();
    let extra = format!(
        "host_key_fingerprints = [{:?}, {:?}]\nfailback_after = \"2s\"\n[profile.health]\nhttp = \"http://127.0.0.1:{l_api}/health\"\ninterval = \"500ms\"\ntimeout = \"1s\"\n",
        primary.fingerprint, standby.fingerprint
    );
    let profile = profile_toml(
        id,
        &[primary.endpoint()],
        primary,
        &[format!("L {l_api}:localhost:{api_port}")],
        &extra,
    );
    assign_group_profile(&c.api, id, "oma", &profile).await;
    (agent, l_api)
}

async fn on(agent: &TestAgent, id: &str, endpoint: &str, l_api: u16, body: &str, what: &str) {
    wait_until(
        30,
        &format!("{id} checking {body} through {endpoint} ({what})"),
        || async {
            let s = agent.status().await;
            s.profiles
                .iter()
                .any(|p| p.name == id && p.active_endpoint == endpoint)
                && http_get(l_api, "/health")
                    .await
                    .is_ok_and(|(code, b)| code == 200 && b == body)
        },
    )
    .await;
}

async fn oma(c: &FullCoordinator) -> Vec<EndpointView> {
    c.api.get("/v1/oma").await.unwrap()
}

/// Two OMA hosts with real sshd (one client key), a coordinator with a webhook to `sink`, and
/// group `oma` on the two, the first its primary.
struct Omas {
    h1: NetHost,
    h2: NetHost,
    primary: Sshd,
    standby: Sshd,
    sink: WebhookSink,
    dir: tempfile::TempDir,
    c: FullCoordinator,
}

impl Omas {
    async fn start() -> Omas {
        let (h1, h2) = (NetHost::create(), NetHost::create());
        let primary = Sshd::start_in(&h1);
        let standby = Sshd::start_sharing_client_key_in(&primary, &h2);
        let sink = WebhookSink::start(0).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let c = FullCoordinator::start_with_page(
            dir.path(),
            Duration::from_millis(500),
            vec![webhook(dir.path(), &sink)],
        )
        .await;
        let _: Changed = c
            .api
            .call("PUT", "/v1/groups/oma", Some(&group(&primary, &standby)))
            .await
            .unwrap();
        Omas {
            h1,
            h2,
            primary,
            standby,
            sink,
            dir,
            c,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_appliance_failing_through_the_primary_moves_after_one_fresh_session_and_the_group_reads_degraded()
 {
    if !NetHost::available("health_rule_one_appliance") {
        return;
    }
    let Omas {
        h1,
        h2,
        primary,
        standby,
        sink,
        dir,
        c,
    } = Omas::start().await;
    let api_port = free_port();
    let api1 = NsHttp::start_on(&h1, "oma-a api", api_port);
    let _api2 = NsHttp::start_on(&h2, "oma-b api", api_port);
    let (agent, l_api) =
        agent_on_group(&c, dir.path(), "vma-1", &primary, &standby, api_port).await;
    on(
        &agent,
        "vma-1",
        &primary.endpoint(),
        l_api,
        "oma-a api ok",
        "start",
    )
    .await;

    api1.set_failing(true);
    on(
        &agent,
        "vma-1",
        &standby.endpoint(),
        l_api,
        "oma-b api ok",
        "API down on the primary",
    )
    .await;
    let p = agent.profile("vma-1").await;
    // Its own move, for its health; the fresh session on the primary was refused, so it never
    // replaced the first one (no reconnect counted).
    assert_eq!((p.reconnects, p.failovers), (0, 1), "{p:?}");
    let moved = p.failover_log.last().unwrap();
    assert_eq!(moved.from, primary.endpoint());
    assert!(
        moved
            .reason
            .starts_with("health check failed 3 times in a row"),
        "{moved:?}"
    );
    wait_until(30, "tunnel_health for vma-1 at the webhook", || async {
        !deliveries(&sink, "tunnel_health", "firing").is_empty()
    })
    .await;
    let summary = deliveries(&sink, "tunnel_health", "firing")[0]["alert"]["summary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        summary.contains(&format!(
            "through {}, its group's active endpoint",
            primary.endpoint()
        )) && summary.contains("HTTP 503"),
        "{summary}"
    );
    // The group stays (one agent never moves it); its view says what happened.
    wait_until(30, "the primary reads degraded in oma list", || async {
        oma(&c).await.iter().any(|e| {
            e.endpoint == primary.endpoint()
                && e.active
                && e.degraded.as_deref().is_some_and(|d| {
                    d.contains("1 of 1 agents could not stay on it (health check failed")
                })
        })
    })
    .await;
    assert!(
        deliveries(&sink, "oma_unhealthy", "firing").is_empty(),
        "one agent is no quorum"
    );
    // The fleet page says the same, in a real browser: the primary still active, degraded,
    // and why.
    if Browser::available("health_rule_one_appliance (fleet page)") {
        let b = Browser::start().await;
        b.sign_in(c.web.unwrap(), ADMIN_TOKEN).await;
        let row = format!("tr[data-endpoint=\"{}\"]", primary.endpoint());
        let shown = b.wait_text(20, &row, "up, degraded").await;
        assert!(
            shown.contains("(active)")
                && shown
                    .contains("degraded: 1 of 1 agents could not stay on it (health check failed"),
            "{shown}"
        );
        let class = b
            .client
            .find(fantoccini::Locator::Css(&format!("{row} td.degraded")))
            .await
            .is_ok();
        assert!(class, "the degraded cell is marked for its colour");
        b.close().await;
    }

    api1.set_failing(false);
    on(
        &agent,
        "vma-1",
        &primary.endpoint(),
        l_api,
        "oma-a api ok",
        "the API back",
    )
    .await;
    wait_until(
        30,
        "tunnel_health resolved and the primary no longer degraded",
        || async {
            !deliveries(&sink, "tunnel_health", "resolved").is_empty()
                && oma(&c).await.iter().all(|e| e.degraded.is_none())
        },
    )
    .await;
    agent.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appliance_failing_where_others_pass_stays_with_its_alert() {
    if !NetHost::available("health_rule_others_pass") {
        return;
    }
    let Omas {
        h1,
        h2,
        primary,
        standby,
        sink,
        dir,
        c,
    } = Omas::start().await;
    // vma-2 checks a service both OMAs have; vma-1 one that only the standby has, so only
    // vma-1 fails through the primary — and would pass through the standby.
    let (shared_port, own_port) = (free_port(), free_port());
    let _s1 = NsHttp::start_on(&h1, "oma-a api", shared_port);
    let _s2 = NsHttp::start_on(&h2, "oma-b api", shared_port);
    let _own2 = NsHttp::start_on(&h2, "oma-b own", own_port);
    let (passing, l_shared) =
        agent_on_group(&c, dir.path(), "vma-2", &primary, &standby, shared_port).await;
    on(
        &passing,
        "vma-2",
        &primary.endpoint(),
        l_shared,
        "oma-a api ok",
        "start",
    )
    .await;
    let (failing, _) = agent_on_group(&c, dir.path(), "vma-1", &primary, &standby, own_port).await;

    wait_until(30, "tunnel_health for vma-1 at the webhook", || async {
        deliveries(&sink, "tunnel_health", "firing")
            .iter()
            .any(|j| j["alert"]["subject"] == "vma-1/vma-1")
    })
    .await;
    // Three crossings of its threshold (3, 6, 9 failures): the fresh session at the first, and
    // at every one the coordinator's word that vma-2 passes there keeps it.
    wait_until(60, "vma-1 past its third crossing", || async {
        let p = failing.profile("vma-1").await;
        p.health
            .as_ref()
            .is_some_and(|h| h.consecutive_failures >= 10)
    })
    .await;
    let p = failing.profile("vma-1").await;
    assert_eq!(p.active_endpoint, primary.endpoint(), "{p:?}");
    assert_eq!(p.failovers, 0, "{p:?}");
    let why = p.last_error.clone().unwrap_or_default();
    assert!(
        why.contains(&format!("staying on {}", primary.endpoint()))
            && why.contains("1 other agents pass their checks through it"),
        "{why}"
    );
    assert_eq!(
        passing.profile("vma-2").await.active_endpoint,
        primary.endpoint()
    );
    assert!(deliveries(&sink, "oma_unhealthy", "firing").is_empty());
    failing.shutdown().await;
    passing.shutdown().await;
    c.stop().await;
}
