//! `/metrics` of a real `tunnelfleet-coordinator` process, scraped over HTTP and parsed as
//! Prometheus text: agents by state, tunnels per OMA endpoint, an OMA endpoint down with its
//! alert, heartbeats and push latency.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::collections::BTreeMap;
use std::time::Duration;

use integration_tests::{CoordinatorProcess, free_port, wait_until};
use tunnelfleet_agent::link;
use tunnelfleet_coordinator::pki;
use tunnelfleet_protocol::{
    CoordinatorMessage, Heartbeat, Hello, PROTOCOL_VERSION, ProfileReport, TunnelState,
};

/// Asserts that every `tunnelfleet_*` metric the shipped Grafana dashboard `file` queries is in
/// `exported` (a scrape whose text is `text`); returns how many queries it checked.
fn dashboard_queries_exported(file: &str, exported: &Samples, text: &str) -> usize {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ops/deploy/grafana")
        .join(file);
    let dashboard = std::fs::read_to_string(&path).unwrap();
    let names: std::collections::BTreeSet<&str> =
        exported.keys().map(|(n, _)| n.as_str()).collect();
    let mut queried = 0;
    for (i, _) in dashboard.match_indices("tunnelfleet_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            names.contains(name.as_str()),
            "{} queries {name}, not exported:\n{text}",
            path.display()
        );
        queried += 1;
    }
    queried
}

/// One sample: name and labels -> value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the text exposition (what Prometheus does), refusing lines it cannot read.
fn parse(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').unwrap();
                let labels = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap();
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.insert((name, labels), value);
    }
    out
}

fn get(s: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.iter()
        .find(|((n, l), _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
}

async fn scrape(port: u16) -> (String, Samples) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    (body.to_string(), parse(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_agents_tunnels_oma_health_alerts_and_push_latency() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let port = free_port();
    let sink = tunnelfleet_standins::services::WebhookSink::start(0)
        .await
        .unwrap();
    let secret = dir.path().join("webhook.secret");
    integration_tests::write_secret(&secret, b"metrics-test-webhook-secret");
    let mut c = CoordinatorProcess::start_with(
        dir.path(),
        "500ms",
        &format!(
            "metrics_listen = \"127.0.0.1:{port}\"\n\n[[hook]]\nname = \"ops\"\nkind = \"webhook\"\nurl = \"http://127.0.0.1:{}/alerts\"\nsecret_file = \"{}\"\n",
            sink.port,
            secret.display()
        ),
    )
    .await;
    let dead = format!("127.0.0.1:{}", free_port());
    // A standby that answers probes like an sshd does: the group fails over to it.
    let standby_addr = integration_tests::put_probed_group(&c.api, &dead).await;

    // One agent with one tunnel up on an endpoint.
    let files =
        pki::issue_agent(&dir.path().join("pki"), "vma-1", 1, &dir.path().join("a")).unwrap();
    let client = link::client_config(&files.ca, &files.cert, &files.key).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: "vma-1".into(),
        agent_version: "test".into(),
        labels: [("site".to_string(), "dc1".to_string())].into(),
        applied_version: None,
        started_unix_ms: 1,
    };
    let mut l = link::connect(&ep, client, c.control, "localhost", hello)
        .await
        .unwrap();
    // A push (an assignment) the agent acknowledges: one push latency sample.
    let spec = integration_tests::profile_spec("p", &["L 18082:localhost:8082"]);
    integration_tests::put_and_assign(&c.api, &spec, "vma-1").await;
    let set = loop {
        match tokio::time::timeout(Duration::from_secs(10), l.next()).await {
            Ok(Ok(CoordinatorMessage::Push(set))) if !set.profiles.is_empty() => break set,
            Ok(Ok(_)) => continue,
            other => panic!("no push: {other:?}"),
        }
    };
    l.applied(tunnelfleet_protocol::Applied {
        version: set.version,
        ok: true,
        results: vec![],
    })
    .await
    .unwrap();
    // Its tunnel up, as pushed (only what was pushed to an agent counts).
    let report = ProfileReport::new("p", TunnelState::Up, "oma-a:443");
    l.heartbeat(Heartbeat {
        seq: 1,
        sent_unix_ms: 0,
        profiles: vec![report],
    })
    .await
    .unwrap();
    // Its SSH key certified by the fleet's SSH CA: the time left is exported per agent.
    let key = russh::keys::PrivateKey::new(
        russh::keys::ssh_key::private::KeypairData::Ed25519(
            russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[7; 32]),
        ),
        "",
    )
    .unwrap();
    l.ssh_cert_request(key.public_key().to_openssh().unwrap())
        .await
        .unwrap();

    wait_until(
        20,
        "metrics with the agent, its tunnel, the dead OMA and its alert",
        || async {
            let (_, s) = scrape(port).await;
            get(&s, "tunnelfleet_agents", &[("state", "online")]) == Some(1.0)
                && get(
                    &s,
                    "tunnelfleet_tunnels",
                    &[("endpoint", "oma-a:443"), ("state", "up")],
                ) == Some(1.0)
                && get(
                    &s,
                    "tunnelfleet_oma_endpoint_up",
                    &[("endpoint", dead.as_str())],
                ) == Some(0.0)
                && get(&s, "tunnelfleet_alerts_firing", &[("kind", "oma_down")]) == Some(1.0)
                && get(&s, "tunnelfleet_push_ack_seconds_count", &[]).is_some_and(|n| n >= 1.0)
                && get(&s, "tunnelfleet_hook_deliveries_total", &[("hook", "ops")]) == Some(1.0)
                && get(&s, "tunnelfleet_oma_failovers_total", &[("group", "oma")]) == Some(1.0)
                && get(
                    &s,
                    "tunnelfleet_oma_endpoint_up",
                    &[("endpoint", standby_addr.as_str()), ("active", "true")],
                ) == Some(1.0)
                // Issued for the default 7 days (backdated 5 minutes).
                && get(
                    &s,
                    "tunnelfleet_agent_ssh_cert_expiry_seconds",
                    &[("agent", "vma-1")],
                )
                .is_some_and(|left| left > 6.9 * 86_400.0 && left <= 7.0 * 86_400.0)
        },
    )
    .await;
    let (text, s) = scrape(port).await;
    assert!(
        get(&s, "tunnelfleet_heartbeats_total", &[]).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        get(
            &s,
            "tunnelfleet_alerts_fired_total",
            &[("kind", "oma_down")]
        ) == Some(1.0),
        "{text}"
    );
    assert!(
        get(
            &s,
            "tunnelfleet_agent_heartbeat_age_seconds",
            &[("agent", "vma-1")]
        )
        .is_some(),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tunnelfleet_push_ack_seconds histogram"),
        "{text}"
    );
    assert!(text.contains("# HELP tunnelfleet_agents "), "{text}");
    assert_eq!(
        get(&s, "tunnelfleet_hook_pending", &[("hook", "ops")]),
        Some(0.0)
    );
    assert_eq!(
        get(
            &s,
            "tunnelfleet_hook_delivery_failures_total",
            &[("hook", "ops")]
        ),
        Some(0.0)
    );

    // Every metric the shipped Grafana dashboard queries is one the coordinator exports.
    let queried = dashboard_queries_exported("tunnelfleet.json", &s, &text);
    assert!(queried >= 10, "{queried}");

    // The agent gone: no longer online.
    l.close();
    wait_until(20, "the agent counted as disconnected", || async {
        let (_, s) = scrape(port).await;
        get(&s, "tunnelfleet_agents", &[("state", "disconnected")]) == Some(1.0)
    })
    .await;
    c.kill9();
}

/// The agent's own `/metrics` (opt-in) against a real sshd: the session up on its endpoint,
/// bytes each way through a forward, health checks and their latency, all equal to what
/// `tunnels status` says; then sshd killed: the tunnel down and the failures counted by endpoint
/// and kind; at shutdown the listener closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_show_sessions_bytes_health_and_errors() {
    use integration_tests::{Sshd, TestAgent, echo_roundtrip, echo_server, http_service};
    if !Sshd::available("agent_metrics") {
        return;
    }
    let mut sshd = Sshd::start();
    let api = http_service("oma-api").await;
    let (echo, _echo) = echo_server().await;
    let (l_api, l_echo) = (free_port(), free_port());
    let health = format!(
        "[profile.health]\nhttp = \"http://127.0.0.1:{l_api}/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\nthreshold = 3\n"
    );
    let profile = integration_tests::profile_toml(
        "oma",
        &[sshd.endpoint()],
        &sshd,
        &[
            format!("L {l_api}:localhost:{}", api.port),
            format!("L {l_echo}:localhost:{echo}"),
        ],
        &health,
    );
    let agent = TestAgent::start_with("metrics_listen = \"127.0.0.1:0\"", &profile).await;
    let port = agent.metrics.expect("metrics listener").port();
    agent.wait_all_active("oma").await;
    let payload = vec![5u8; 100_000];
    echo_roundtrip(l_echo, &payload).await.unwrap();
    wait_until(20, "two health checks passed", || async {
        agent
            .profile("oma")
            .await
            .health
            .is_some_and(|h| h.checks >= 2 && h.failures == 0)
    })
    .await;

    let (text, s) = scrape(port).await;
    let status = agent.profile("oma").await;
    let ep = sshd.endpoint();
    let p = ("profile", "oma");
    assert_eq!(
        get(&s, "tunnelfleet_agent_tunnel_up", &[p, ("endpoint", &ep)]),
        Some(1.0),
        "{text}"
    );
    let echo_fwd = status.forwards[1].spec.as_str();
    for (direction, n) in [("out", payload.len()), ("in", payload.len())] {
        assert_eq!(
            get(
                &s,
                "tunnelfleet_agent_forward_bytes_total",
                &[p, ("forward", echo_fwd), ("direction", direction)]
            ),
            Some(n as f64),
            "{direction}: {text}"
        );
    }
    assert_eq!(
        get(
            &s,
            "tunnelfleet_agent_forward_connections_total",
            &[p, ("forward", echo_fwd)]
        ),
        Some(1.0),
        "{text}"
    );
    for f in &status.forwards {
        assert_eq!(
            get(
                &s,
                "tunnelfleet_agent_forward_up",
                &[p, ("forward", f.spec.as_str())]
            ),
            Some(1.0),
            "{}: {text}",
            f.spec
        );
    }
    let checks = get(&s, "tunnelfleet_agent_health_checks_total", &[p]).unwrap();
    assert!(checks >= 2.0, "{text}");
    assert_eq!(
        get(&s, "tunnelfleet_agent_health_failures_total", &[p]),
        Some(0.0)
    );
    assert_eq!(
        get(&s, "tunnelfleet_agent_health_consecutive_failures", &[p]),
        Some(0.0)
    );
    // The last check's latency, as the agent's status has it (no bound on how fast a check
    // must be here: that is the benchmarks' business). Equal when no check ran between the
    // scrape and the status read.
    let latency = get(&s, "tunnelfleet_agent_health_latency_seconds", &[p]).unwrap();
    assert!(latency > 0.0, "{text}");
    let h = status.health.as_ref().unwrap();
    if checks as u64 == h.checks {
        let in_status = h.last.as_ref().unwrap().latency_ms / 1000.0;
        assert!(
            (latency - in_status).abs() < 1e-6,
            "{latency} vs {in_status}: {text}"
        );
    }
    assert_eq!(
        get(&s, "tunnelfleet_agent_reconnects_total", &[p]),
        Some(0.0)
    );

    // The OMA gone: the tunnel shows down and the failed attempts are counted against it.
    sshd.kill_all();
    wait_until(30, "tunnel down and connect failures counted", || async {
        let (_, s) = scrape(port).await;
        get(&s, "tunnelfleet_agent_tunnel_up", &[p]) == Some(0.0)
            && get(
                &s,
                "tunnelfleet_agent_session_errors_total",
                &[p, ("endpoint", &ep), ("kind", "connect")],
            )
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    // Every metric the shipped agent dashboard queries is one the agent exports.
    let (text, s) = scrape(port).await;
    let queried = dashboard_queries_exported("tunnelfleet-agent.json", &s, &text);
    assert!(queried >= 12, "{queried}");
    agent.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "the metrics listener closed at shutdown"
    );
}

/// A metrics address already in use refuses the agent at start, naming the key and the port.
#[tokio::test]
async fn agent_metrics_port_in_use_is_refused_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[agent]\ncontrol_socket = \"{}\"\nmetrics_listen = \"{addr}\"\n",
        dir.path().join("agent.sock").display()
    );
    let cfg = tunnelfleet_agent::config::AgentConfig::parse(&text, std::path::Path::new("a.toml"))
        .unwrap();
    let err = match tunnelfleet_agent::agent::Agent::prepare(&cfg).await {
        Ok(_) => panic!("an agent started on a port in use"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("agent.metrics_listen") && err.contains(&addr.to_string()),
        "{err}"
    );
    assert!(
        !dir.path().join("agent.sock").exists(),
        "nothing was started"
    );
}
