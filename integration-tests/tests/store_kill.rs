//! The coordinator's store against a real SIGKILL.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use integration_tests::SpawnOwned;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use integration_tests::Program;
use tunnelfleet_coordinator::store::Store;

/// `test-store-writer DIR what` until it acknowledged 50 writes, then SIGKILL (no destructors,
/// no final flush): the `(id, name)` pairs it acknowledged.
fn write_then_kill(dir: &std::path::Path, what: &str) -> Vec<(u64, String)> {
    let mut child = integration_tests::children::owned(Program::StoreWriter.path())
        .arg(dir)
        .arg(what)
        .stdout(Stdio::piped())
        .spawn_owned()
        .unwrap();
    let mut acked = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("acked ") {
            let (v, name) = rest.split_once(' ').unwrap();
            acked.push((v.parse::<u64>().unwrap(), name.to_string()));
            if acked.len() == 50 {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(acked.len(), 50, "the writer stopped early");
    acked
}

/// A real process (`test-store-writer`) killed with SIGKILL mid-stream: every write it
/// acknowledged is there after reopening. sled keeps writes in its own buffers until a
/// flush, so this catches an acknowledgement before the flush (and the ordering: acknowledge
/// only after the write returned). It cannot tell an fsync from none — the kernel's page
/// cache outlives a killed process — which is why every write awaits `flush_async`: that is
/// what covers losing the machine.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let acked = write_then_kill(dir.path(), "profiles");
    let s = Store::open(dir.path()).unwrap();
    let (last_version, _) = acked.last().unwrap();
    assert!(s.fleet_version().unwrap() >= *last_version);
    let names: std::collections::HashSet<String> =
        s.profiles().unwrap().into_iter().map(|p| p.name).collect();
    for (_, name) in &acked {
        assert!(
            names.contains(name),
            "acknowledged {name} lost after kill -9"
        );
    }
}

/// The same for alerts: every alert acknowledged as fired is there after a kill -9, firing,
/// with its delivery queued (an alert is delivered at least once).
#[test]
fn acknowledged_alerts_and_their_deliveries_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let acked = write_then_kill(dir.path(), "alerts");
    let s = Store::open(dir.path()).unwrap();
    let alerts: std::collections::HashMap<u64, String> = s
        .alerts(true)
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.subject))
        .collect();
    let queued: std::collections::HashSet<u64> = s
        .deliveries()
        .unwrap()
        .into_iter()
        .map(|d| d.alert.id)
        .collect();
    for (id, subject) in &acked {
        assert_eq!(
            alerts.get(id),
            Some(subject),
            "acknowledged alert {id} ({subject}) lost after kill -9"
        );
        assert!(
            queued.contains(id),
            "the delivery of alert {id} lost after kill -9"
        );
    }
}
