//! The Prometheus files we ship (ops/deploy/prometheus/), checked by Prometheus's own
//! `promtool` (Debian's `prometheus` package): the scrape config with the rule files it names,
//! and the rules with unit tests of their own (series in, alerts out).

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::{Path, PathBuf};
use std::process::Command;

const PROMTOOL: &str = "/usr/bin/promtool";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/prometheus")
}

fn available(test: &str) -> bool {
    if Path::new(PROMTOOL).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {PROMTOOL} is missing and CI is set; install prometheus");
    }
    integration_tests::skip::skipped(test, "no promtool (apt-get install prometheus)");
    false
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_shipped_scrape_config_and_rules_pass_promtool() {
    if !available("promtool_check") {
        return;
    }
    let dir = deploy();
    let config = promtool(&["check", "config", "prometheus.yml"], &dir);
    assert!(config.contains("tunnelfleet-rules.yml"), "{config}");
    let rules = promtool(&["check", "rules", "tunnelfleet-rules.yml"], &dir);
    assert!(rules.contains("SUCCESS"), "{rules}");
}

/// The rules behave: a diverged tunnel for 30 minutes pages, 29 do not; a hook backlog for
/// 10 minutes pages; no coordinator leading for a minute pages, and stops once one leads.
#[test]
fn the_shipped_rules_fire_when_and_only_when_they_should() {
    if !available("promtool_test_rules") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        deploy().join("tunnelfleet-rules.yml"),
        dir.path().join("tunnelfleet-rules.yml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tests.yml"),
        r#"rule_files:
  - tunnelfleet-rules.yml
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'tunnelfleet_tunnels_diverged{group="oma-dc1"}'
        values: '0 1x40'
      - series: 'tunnelfleet_hook_pending{hook="ops"}'
        values: '3x20'
      - series: 'tunnelfleet_coordinator_leader{instance="c1"}'
        values: '1 1 1 0x10'
      - series: 'tunnelfleet_coordinator_leader{instance="c2"}'
        values: '0 0 0 0 0 0 0 0 1x5'
    alert_rule_test:
      - eval_time: 3m
        alertname: TunnelfleetNoLeader
        exp_alerts: []
      - eval_time: 5m
        alertname: TunnelfleetNoLeader
        exp_alerts:
          - exp_annotations:
              summary: "no tunnelfleet coordinator has led the fleet for a minute: etcd without quorum, or every coordinator cut off from it (tunnelfleet coordinators)"
      - eval_time: 9m
        alertname: TunnelfleetNoLeader
        exp_alerts: []
      - eval_time: 30m
        alertname: TunnelfleetTunnelsDiverged
        exp_alerts: []
      - eval_time: 32m
        alertname: TunnelfleetTunnelsDiverged
        exp_alerts:
          - exp_labels:
              group: oma-dc1
            exp_annotations:
              summary: "1 tunnel(s) of group oma-dc1 have been on another endpoint than the group's for 30 min: cut off from it, or a move refused (tunnelfleet oma list)"
      - eval_time: 9m
        alertname: TunnelfleetHookBacklog
        exp_alerts: []
      - eval_time: 11m
        alertname: TunnelfleetHookBacklog
        exp_alerts:
          - exp_labels:
              hook: ops
            exp_annotations:
              summary: "alerts waiting 10 min in hook ops's outbox: the receiver refuses them (tunnelfleet alerts hooks)"
"#,
    )
    .unwrap();
    let out = promtool(&["test", "rules", "tests.yml"], dir.path());
    assert!(out.contains("SUCCESS"), "{out}");
}
