//! The systemd integration of the real binaries: `Type=notify` readiness, the watchdog and
//! STOPPING over a real `NOTIFY_SOCKET`, and the shipped unit files checked against the
//! binaries they start.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use integration_tests::SpawnOwned;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::Program;
use tunnelfleet_coordinator::pki;

/// Datagrams received until `until` matches one, or the deadline.
fn receive_until(sock: &UnixDatagram, secs: u64, until: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = msg.contains(until);
            got.push(msg);
            if done {
                return got;
            }
        }
    }
    panic!("no {until:?} within {secs}s; got {got:?}");
}

#[test]
fn the_agent_reports_ready_feeds_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki::init(&d.join("pki"), &["localhost".into()]).unwrap();
    let files = pki::issue_agent(&d.join("pki"), "vma-1", 1, &d.join("a")).unwrap();
    let config = d.join("agent.toml");
    // A fleet agent whose coordinator is not there: it must still be ready (tunnels run from
    // the cache without the coordinator).
    std::fs::write(
        &config,
        format!(
            "[agent]\ncontrol_socket = \"{}\"\n[coordinator]\naddress = \"127.0.0.1:9\"\nagent_id = \"vma-1\"\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nstate_dir = \"{}\"\n",
            d.join("agent.sock").display(),
            files.ca.display(),
            files.cert.display(),
            files.key.display(),
            d.join("state").display()
        ),
    )
    .unwrap();
    let notify = d.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = integration_tests::children::owned(Program::Agent.path())
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn_owned()
        .unwrap();
    let got = receive_until(&sock, 20, "READY=1");
    let ready = got.last().unwrap();
    assert!(
        ready.contains("STATUS=0 profiles; control socket"),
        "{ready}"
    );
    // Fed at half the period: several pings follow.
    let mut pings = 0;
    while pings < 3 {
        if receive_until(&sock, 5, "WATCHDOG=1")
            .last()
            .unwrap()
            .contains("WATCHDOG=1")
        {
            pings += 1;
        }
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    receive_until(&sock, 10, "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// Every `--flag` a unit's ExecStart lines pass must be one the binary knows.
fn check_unit(unit: &Path, bin: &Path) {
    let text = std::fs::read_to_string(unit).unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "User=tunnelfleet",
    ] {
        assert!(text.contains(want), "{}: no {want}", unit.display());
    }
    let help = Command::new(bin).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let mut checked = 0;
    for line in text.lines().filter(|l| l.starts_with("ExecStart")) {
        for flag in line.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(flag),
                "{}: {flag} is not an option of {}",
                unit.display(),
                bin.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{}: no ExecStart flags", unit.display());
}

#[test]
fn the_shipped_units_use_options_the_binaries_have() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/systemd");
    check_unit(
        &units.join("tunnelfleet-agent.service"),
        &Program::Agent.path(),
    );
    check_unit(
        &units.join("tunnelfleet-coordinator.service"),
        &Program::Coordinator.path(),
    );
}
