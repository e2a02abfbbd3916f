//! `tunnelfleet pki init | issue-agent` through the binary: files, modes, JSON, refusals.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn tf(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tunnelfleet"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn init_issue_and_refuse_to_replace_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let out = dir.path().join("agent");
    let (p, o) = (pki.to_str().unwrap(), out.to_str().unwrap());
    let r = tf(&[
        "pki",
        "init",
        "--dir",
        p,
        "--name",
        "coordinator.example",
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert!(v["ca_fingerprint"].as_str().unwrap().starts_with("SHA256:"));
    assert_eq!(
        std::fs::metadata(&pki).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(pki.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let r = tf(&[
        "pki",
        "issue-agent",
        "vma-233",
        "--dir",
        p,
        "--out",
        o,
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["agent"], "vma-233");
    assert_eq!(
        std::fs::metadata(out.join("vma-233.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let cert = std::fs::read(out.join("vma-233.pem")).unwrap();
    let der = rustls_pem_to_der(&cert);
    assert_eq!(
        tunnelfleet_coordinator::tls::agent_id(&der.into()).unwrap(),
        "vma-233"
    );

    let r = tf(&["pki", "init", "--dir", p]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("refusing to replace it"));
    let r = tf(&["pki", "issue-agent", "no/slashes", "--dir", p, "--out", o]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("agent id \"no/slashes\""));
}

fn rustls_pem_to_der(pem: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(pem);
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    data_encoding::BASE64.decode(b64.as_bytes()).unwrap()
}
