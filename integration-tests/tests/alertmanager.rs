//! The `alertmanager` hook against a real Prometheus Alertmanager (Debian's
//! `prometheus-alertmanager`): an `oma_down` incident arrives as an active alert with its
//! labels and summary, and its resolution (`endsAt`) resolves it there.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use integration_tests::*;
use tunnelfleet_coordinator::admin::Changed;
use tunnelfleet_coordinator::hooks::{HookConfig, HookKind};
use tunnelfleet_coordinator::store::OmaGroup;

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
        let child = Command::new(ALERTMANAGER)
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
            .spawn()
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
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    drop(listener);
    let g = OmaGroup::probed(
        "oma",
        vec![endpoint.clone()],
        Duration::from_millis(200),
        Duration::from_millis(200),
        Duration::from_secs(300),
    );
    let _: Changed = c.api.call("PUT", "/v1/groups/oma", Some(&g)).await.unwrap();

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
