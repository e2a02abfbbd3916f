//! The agent-side alerts at a real webhook receiver, fired and resolved by what really happens
//! to a real agent against a real sshd: `port_conflict` (another process holds a forward's
//! port), `ssh_auth` (the OMA no longer accepts the agent's key), `agent_offline`,
//! `agent_restarting`; and silences and acks: a silenced alert is recorded, not delivered, and
//! delivered once its silence is over; an ack is recorded and delivers nothing.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::time::Duration;

use integration_tests::*;
use tunnelfleet_coordinator::admin::Changed;
use tunnelfleet_coordinator::hooks::HookConfig;
use tunnelfleet_coordinator::monitor::AlertRules;
use tunnelfleet_coordinator::store::{Alert, OmaGroup};

/// A coordinator with a webhook (restarts: 3 within 3 s), one sshd in group `oma`.
struct Setup {
    sshd: Sshd,
    sink: WebhookSink,
    c: FullCoordinator,
    dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let sshd = Sshd::start();
    let sink = WebhookSink::start(0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("webhook.secret");
    write_secret(&secret, b"alerts-test-webhook-secret");
    let rules = AlertRules {
        restart_window: Duration::from_secs(3),
        ..AlertRules::default()
    };
    let c = FullCoordinator::start_with_rules(
        dir.path(),
        Duration::from_millis(500),
        vec![HookConfig::webhook(
            "ops",
            format!("http://127.0.0.1:{}/alerts", sink.port),
            secret,
        )],
        std::net::Ipv4Addr::LOCALHOST,
        rules,
    )
    .await;
    let group = OmaGroup::probed(
        "oma",
        vec![sshd.endpoint()],
        Duration::from_millis(500),
        Duration::from_millis(400),
        Duration::from_secs(300),
    );
    let _: Changed = c
        .api
        .call("PUT", "/v1/groups/oma", Some(&group))
        .await
        .unwrap();
    Setup { sshd, sink, c, dir }
}

impl Setup {
    /// Agent `vma-1` with one profile on the group, `forwards` as given.
    async fn agent(&self, forwards: &[String]) -> TestAgent {
        let agent = TestAgent::start(&self.c.agent_section(self.dir.path(), "vma-1", "")).await;
        let profile = profile_toml("vma-1", &[self.sshd.endpoint()], &self.sshd, forwards, "");
        assign_group_profile(&self.c.api, "vma-1", "oma", &profile).await;
        agent
    }

    fn delivered(&self, kind: &str, status: &str) -> Vec<serde_json::Value> {
        self.sink
            .delivered()
            .into_iter()
            .map(|r| r.json())
            .filter(|j| j["alert"]["kind"] == kind && j["status"] == status)
            .collect()
    }

    async fn wait_delivered(&self, kind: &str, status: &str) -> serde_json::Value {
        wait_until(30, &format!("{kind} {status} at the webhook"), || async {
            !self.delivered(kind, status).is_empty()
        })
        .await;
        self.delivered(kind, status).remove(0)
    }
}

/// A forward's port held by another process on the appliance, under a silence: the alert is
/// recorded (silenced), nothing delivered; the silence over, it is delivered; acked, nothing
/// more is delivered; the port freed, the resolution is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_local_port_is_port_conflict_silenced_then_delivered_acked_and_resolved() {
    if !Sshd::available("alerts_port_conflict") {
        return;
    }
    let s = setup().await;
    let (echo, _e) = echo_server().await;
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap().port();
    let silence: serde_json::Value = s
        .c
        .api
        .call(
            "POST",
            "/v1/silences",
            Some(&serde_json::json!({"matcher": "port_conflict:*", "for_s": 4, "comment": "test"})),
        )
        .await
        .unwrap();
    assert!(silence["id"].as_u64().is_some(), "{silence}");
    let agent = s.agent(&[format!("L {taken}:localhost:{echo}")]).await;
    // Recorded, silenced, not delivered.
    wait_until(20, "port_conflict recorded, silenced", || async {
        let alerts: Vec<Alert> = s.c.api.get("/v1/alerts").await.unwrap_or_default();
        alerts
            .iter()
            .any(|a| a.kind.as_str() == "port_conflict" && a.silenced)
    })
    .await;
    assert!(s.delivered("port_conflict", "firing").is_empty());
    // The silence ends while it still fires: delivered then, naming the port and the fix.
    let fired = s.wait_delivered("port_conflict", "firing").await;
    let summary = fired["alert"]["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!(
            "another process on the appliance listens on port {taken}"
        )) && summary.contains(&format!("ss -ltnp 'sport = :{taken}'")),
        "{summary}"
    );
    let id = fired["alert"]["id"].as_u64().unwrap();
    let acked: Alert =
        s.c.api
            .call(
                "POST",
                &format!("/v1/alerts/{id}/ack"),
                Some(&serde_json::json!({"by": "alice"})),
            )
            .await
            .unwrap();
    assert_eq!(acked.acked_by.as_deref(), Some("alice"));
    let deliveries = s.sink.delivered().len();
    drop(holder);
    s.wait_delivered("port_conflict", "resolved").await;
    assert_eq!(
        s.sink.delivered().len(),
        deliveries + 1,
        "an ack delivered something: {:?}",
        s.sink.delivered()
    );
    agent.shutdown().await;
    s.c.stop().await;
}

/// The OMA stops accepting the agent's key (removed from authorized_keys, sessions killed):
/// `ssh_auth` after three refusals in a row; the key back, the session resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_from_the_oma_is_ssh_auth_and_restoring_it_resolves() {
    if !Sshd::available("alerts_ssh_auth") {
        return;
    }
    let s = setup().await;
    let (echo, _e) = echo_server().await;
    let agent = s
        .agent(&[format!("L {}:localhost:{echo}", free_port())])
        .await;
    agent.wait_all_active("vma-1").await;
    let keys = s.sshd.dir.path().join("authorized_keys");
    let saved = std::fs::read(&keys).unwrap();
    std::fs::write(&keys, b"").unwrap();
    for pid in s.sshd.session_pids() {
        signal(pid, libc::SIGKILL);
    }
    let fired = s.wait_delivered("ssh_auth", "firing").await;
    assert_eq!(fired["alert"]["subject"], "vma-1/vma-1");
    assert!(
        fired["alert"]["summary"]
            .as_str()
            .unwrap()
            .contains("refused its key"),
        "{fired}"
    );
    std::fs::write(&keys, saved).unwrap();
    s.wait_delivered("ssh_auth", "resolved").await;
    agent.wait_all_active("vma-1").await;
    agent.shutdown().await;
    s.c.stop().await;
}

/// An agent that stops is `agent_offline` after three missed heartbeats and resolved when it
/// is back; started over and over, it is `agent_restarting`, resolved after a quiet window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_is_offline_and_one_that_keeps_restarting_is_agent_restarting() {
    if !Sshd::available("alerts_offline") {
        return;
    }
    let s = setup().await;
    let (echo, _e) = echo_server().await;
    let l = free_port();
    let agent = s.agent(&[format!("L {l}:localhost:{echo}")]).await;
    agent.wait_all_active("vma-1").await;
    agent.shutdown().await;
    let fired = s.wait_delivered("agent_offline", "firing").await;
    assert_eq!(fired["alert"]["subject"], "vma-1");
    let section = s.c.agent_section(s.dir.path(), "vma-1", "");
    let agent = TestAgent::start(&section).await;
    s.wait_delivered("agent_offline", "resolved").await;
    agent.wait_all_active("vma-1").await;
    // Three more starts within the window.
    let mut agent = agent;
    for _ in 0..3 {
        agent.shutdown().await;
        agent = TestAgent::start(&section).await;
        agent.wait_all_active("vma-1").await;
    }
    let fired = s.wait_delivered("agent_restarting", "firing").await;
    assert_eq!(fired["alert"]["subject"], "vma-1");
    // Running on, quietly: resolved once the window has passed without a restart.
    s.wait_delivered("agent_restarting", "resolved").await;
    agent.shutdown().await;
    s.c.stop().await;
}
