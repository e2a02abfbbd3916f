//! The coordinator's store against a real SIGKILL.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use integration_tests::SpawnOwned;
use std::io::{BufRead, BufReader};
use std::process::Stdio;

use integration_tests::Program;
use tunnelfleet_coordinator::store::Store;

/// A real process (`test-store-writer`) killed with SIGKILL mid-stream: every write it
/// acknowledged is there after reopening. This guards the ordering (acknowledge only after the
/// write returned). It cannot tell an fsync from none — the kernel's page cache outlives a
/// killed process — which is why every write also awaits `flush_async`: that is what covers
/// losing the machine.
#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = integration_tests::children::owned(Program::StoreWriter.path())
        .arg(dir.path())
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
    child.kill().unwrap(); // SIGKILL: no destructors, no final flush.
    child.wait().unwrap();
    assert_eq!(acked.len(), 50, "the writer stopped early");
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
