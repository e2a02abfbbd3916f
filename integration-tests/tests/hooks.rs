//! The alert hooks against real receivers: the `alertmanager` hook against a real Prometheus
//! Alertmanager (Debian's `prometheus-alertmanager`): an `oma_down` incident arrives as an
//! active alert with its labels and summary, and its resolution (`endsAt`) resolves it there;
//! the `command` hook with a real program, a refusal retried; the `slack` hook over HTTPS to a
//! receiver with its own CA (`ca_file`), and refused by a receiver whose CA it does not trust.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use integration_tests::SpawnOwned;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use integration_tests::*;
use tunnelfleet_coordinator::hooks::{HookConfig, HookKind};

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

struct Alertmanager {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: nobody\n  group_wait: 0s\nreceivers:\n  - name: nobody\n",
        )
        .unwrap();
        let port = free_port();
        let child = integration_tests::children::owned(ALERTMANAGER)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn_owned()
            .unwrap();
        Alertmanager {
            port,
            child,
            _dir: dir,
        }
    }

    /// `GET /api/v2/alerts` (active, silenced, inhibited and unprocessed alike).
    async fn alerts(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.port, "/api/v2/alerts").await.ok()?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_fires_and_resolves_in_a_real_alertmanager() {
    if !Path::new(ALERTMANAGER).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{ALERTMANAGER} is missing and CI is set; install prometheus-alertmanager"
        );
        skip::skipped("alertmanager", "no prometheus-alertmanager");
        return;
    }
    let am = Alertmanager::start();
    wait_until(30, "Alertmanager answering", || async {
        am.alerts().await.is_some()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut hook = HookConfig::webhook("am", format!("http://127.0.0.1:{}", am.port), "".into());
    hook.kind = HookKind::Alertmanager;
    hook.secret_file = None;
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(500), vec![hook]).await;
    // An OMA endpoint nobody listens on yet: down after three probes.
    let endpoint = put_dead_group(&c.api).await;

    wait_until(30, "the incident active in Alertmanager", || async {
        am.alerts().await.is_some_and(|a| {
            a.as_array().unwrap().iter().any(|x| {
                x["labels"]["alertname"] == "oma_down"
                    && x["labels"]["subject"] == endpoint.as_str()
                    && x["status"]["state"] == "active"
            })
        })
    })
    .await;
    let alerts = am.alerts().await.unwrap();
    let a = &alerts[0];
    assert_eq!(a["labels"]["severity"], "critical", "{a}");
    assert!(
        a["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("OMA endpoint {endpoint} down")),
        "{a}"
    );

    // The endpoint answers like an sshd: the incident resolves, and so does Alertmanager's.
    let back = tokio::net::TcpListener::bind(&endpoint).await.unwrap();
    serve_ssh_banner(back);
    wait_until(30, "the incident resolved in Alertmanager", || async {
        am.alerts().await.is_some_and(|a| {
            !a.as_array()
                .unwrap()
                .iter()
                .any(|x| x["labels"]["alertname"] == "oma_down" && x["status"]["state"] == "active")
        })
    })
    .await;
    c.stop().await;
}

/// The `command` hook: a real program gets each alert state as JSON on stdin and in its
/// environment; an exit other than 0 is a failed delivery, retried until the program takes it
/// (delivered at least once, same idempotency key). It runs with a clean environment: nothing
/// of the coordinator's (credentials, OTLP headers) but `PATH`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_hook_gets_each_state_and_a_refusal_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hook.log");
    let env = dir.path().join("hook.env");
    let refused_once = dir.path().join("refused-once");
    // This process's environment has cargo's variables: the hook must not see them.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    // Refuses its first call (exit 1), then records status, key and the JSON it was given.
    let script = format!(
        "env > {e}; if [ ! -e {r} ]; then touch {r}; echo 'not now' >&2; exit 1; fi; \
         printf '%s %s ' \"$TUNNELFLEET_ALERT_STATUS\" \"$TUNNELFLEET_IDEMPOTENCY_KEY\" >> {l}; cat >> {l}; echo >> {l}",
        e = env.display(),
        r = refused_once.display(),
        l = log.display()
    );
    let mut hook = HookConfig::webhook("cmd", String::new(), "".into());
    hook.kind = HookKind::Command;
    hook.url = None;
    hook.secret_file = None;
    hook.command = vec!["sh".into(), "-c".into(), script];
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(500), vec![hook]).await;
    let endpoint = put_dead_group(&c.api).await;
    let lines = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    };
    wait_until(30, "the firing state taken by the command", || async {
        lines().iter().any(|l| l.starts_with("firing "))
    })
    .await;
    assert!(refused_once.exists(), "the first call was not made");
    let back = tokio::net::TcpListener::bind(&endpoint).await.unwrap();
    serve_ssh_banner(back);
    wait_until(30, "the resolved state taken by the command", || async {
        lines().iter().any(|l| l.starts_with("resolved "))
    })
    .await;
    let got = lines();
    assert_eq!(got.len(), 2, "{got:?}");
    for (line, status) in got.iter().zip(["firing", "resolved"]) {
        let mut parts = line.splitn(3, ' ');
        assert_eq!(parts.next(), Some(status));
        let key = parts.next().unwrap();
        let json: serde_json::Value = serde_json::from_str(parts.next().unwrap()).unwrap();
        assert_eq!(json["status"], status, "{json}");
        assert_eq!(json["alert"]["kind"], "oma_down", "{json}");
        assert_eq!(json["alert"]["subject"], endpoint.as_str(), "{json}");
        assert!(!key.is_empty());
    }
    let hooks: serde_json::Value = c.api.get("/v1/hooks").await.unwrap();
    assert_eq!(hooks[0]["pending"], 0, "{hooks}");
    let names: Vec<String> = std::fs::read_to_string(&env)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_string()))
        .collect();
    // What sh adds itself (PWD, SHLVL, _) aside.
    let inherited: Vec<&String> = names
        .iter()
        .filter(|n| {
            !n.starts_with("TUNNELFLEET_")
                && !["PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(&n.as_str())
        })
        .collect();
    assert!(inherited.is_empty(), "the hook inherited {inherited:?}");
    c.stop().await;
}

/// The `slack` hook: an incident and its resolution arrive as Slack incoming-webhook messages
/// (`{"text": …}`) over HTTPS at a receiver whose certificate chains to the hook's `ca_file`;
/// the same receiver is refused by a hook without it (the certificate is really checked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_hook_posts_each_state_over_verified_https() {
    let dir = tempfile::tempdir().unwrap();
    let receiver_pki = dir.path().join("receiver-pki");
    tunnelfleet_coordinator::pki::init(&receiver_pki, &["localhost".into()]).unwrap();
    let sink = WebhookSink::start_with(0, Some(tls_acceptor(&receiver_pki).unwrap()))
        .await
        .unwrap();
    let url = format!("https://localhost:{}/services/T0/B0/s3cret", sink.port);
    let slack = |name: &str, ca: Option<std::path::PathBuf>| {
        let mut h = HookConfig::webhook(name, url.clone(), "".into());
        h.kind = HookKind::Slack;
        h.secret_file = None;
        h.ca_file = ca;
        h
    };
    let hooks = vec![
        slack("slack", Some(receiver_pki.join("ca.pem"))),
        slack("slack-untrusting", None),
    ];
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(500), hooks).await;
    let endpoint = put_dead_group(&c.api).await;
    wait_until(30, "the incident in Slack", || async {
        !sink.delivered().is_empty()
    })
    .await;
    let firing = sink.delivered()[0].json();
    let text = firing["text"].as_str().unwrap();
    assert!(
        text.contains("FIRING [oma_down]") && text.contains(&endpoint),
        "{firing}"
    );
    assert_eq!(
        sink.delivered()[0].header("content-type"),
        Some("application/json")
    );

    let back = tokio::net::TcpListener::bind(&endpoint).await.unwrap();
    serve_ssh_banner(back);
    wait_until(30, "the resolution in Slack", || async {
        sink.delivered().len() == 2
    })
    .await;
    let resolved = sink.delivered()[1].json();
    assert!(
        resolved["text"]
            .as_str()
            .unwrap()
            .contains("RESOLVED [oma_down]"),
        "{resolved}"
    );
    // Both messages came through the trusting hook; the other never got past TLS.
    let hook = |n: &'static str| {
        let api = &c.api;
        async move {
            let h: serde_json::Value = api.get("/v1/hooks").await.unwrap();
            h.as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == n)
                .cloned()
                .unwrap()
        }
    };
    wait_until(
        30,
        "the untrusting hook refusing the certificate",
        || async {
            hook("slack-untrusting").await["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("UnknownIssuer"))
        },
    )
    .await;
    // The receiver records before it answers: the hook counts once the answer is back.
    wait_until(30, "both messages counted as delivered", || async {
        hook("slack").await["delivered"] == 2
    })
    .await;
    assert_eq!(hook("slack-untrusting").await["delivered"], 0);
    assert_eq!(
        sink.received().len(),
        2,
        "only the trusting hook's requests arrived"
    );
    c.stop().await;
}
