//! `tunnelfleet audit`: for every finding, a sample that triggers it and one that does not —
//! on keys made by ssh-keygen, real `sshd -T` output, real sockets and a real sshd's log.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::*;
use tunnelfleet_ops::audit::{self, Finding, Severity, keys, logins, own, sockets, sshd};

const SSHD_BIN: &str = "/usr/sbin/sshd";

fn ids(f: &[Finding]) -> Vec<&str> {
    f.iter().map(|f| f.id.as_str()).collect()
}

fn keygen_with(path: &Path, args: &[&str]) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-C", "audit-test", "-f"])
        .arg(path)
        .args(args)
        .status()
        .unwrap();
    assert!(ok.success(), "ssh-keygen {args:?}");
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn key_type_size_passphrase_and_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let k = |n: &str| dir.path().join(n);
    keygen_with(&k("ed"), &["-t", "ed25519", "-N", ""]);
    keygen_with(&k("ed-pass"), &["-t", "ed25519", "-N", "correct horse"]);
    keygen_with(&k("rsa1024"), &["-t", "rsa", "-b", "1024", "-N", ""]);
    keygen_with(&k("rsa2048"), &["-t", "rsa", "-b", "2048", "-N", ""]);
    keygen_with(&k("rsa3072"), &["-t", "rsa", "-b", "3072", "-N", ""]);
    keygen_with(
        &k("rsa2048-pem"),
        &["-t", "rsa", "-b", "2048", "-N", "", "-m", "PEM"],
    );
    keygen_with(&k("dsa"), &["-t", "dsa", "-N", ""]);

    assert_eq!(ids(&keys::audit_file(&k("ed"))), vec!["key.no-passphrase"]);
    assert!(ids(&keys::audit_file(&k("ed-pass"))).is_empty());
    let short = keys::audit_file(&k("rsa1024"));
    assert_eq!(short[0].id, "key.rsa-short");
    assert_eq!(short[0].severity, Severity::High);
    assert!(
        short[0].evidence.contains("RSA 1024 bits"),
        "{:?}",
        short[0]
    );
    let medium = keys::audit_file(&k("rsa2048"));
    assert_eq!(
        (medium[0].id.as_str(), medium[0].severity),
        ("key.rsa-short", Severity::Medium)
    );
    let pem = keys::audit_file(&k("rsa2048-pem"));
    assert!(
        pem[0].evidence.contains("RSA 2048 bits"),
        "legacy PEM keys are sized too: {pem:?}"
    );
    assert_eq!(
        ids(&keys::audit_file(&k("rsa3072"))),
        vec!["key.no-passphrase"]
    );
    assert!(ids(&keys::audit_file(&k("dsa"))).contains(&"key.dsa"));

    chmod(&k("ed"), 0o644);
    let loose = keys::audit_file(&k("ed"));
    assert_eq!(loose[0].id, "key.permissions");
    assert!(loose[0].evidence.contains("0644") && loose[0].fix.contains("chmod 600"));

    // The directory scan finds private keys (not .pub files) and checks the directory.
    chmod(dir.path(), 0o777);
    let all = keys::audit_dir(dir.path()).unwrap();
    assert!(ids(&all).contains(&"key.dir-writable"));
    assert!(!all.iter().any(|f| f.evidence.contains(".pub")));
    chmod(dir.path(), 0o700);
    assert!(!ids(&keys::audit_dir(dir.path()).unwrap()).contains(&"key.dir-writable"));
}

/// An sshd config sshd -T accepts: a host key plus `body`.
fn sshd_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let hk = dir.join("hostkey");
    if !hk.exists() {
        keygen(&hk);
    }
    let p = dir.join(name);
    std::fs::write(&p, format!("HostKey {}\n{body}", hk.display())).unwrap();
    p
}

const LAX: &str = "PasswordAuthentication yes\nPermitRootLogin yes\nX11Forwarding yes\nGatewayPorts yes\nAllowTcpForwarding yes\n";
/// Strict main settings, with the OMA drop-in we ship (ops/deploy/oma/) doing the rest: the
/// ClientAlive probes and the tunnel account's forwards.
fn strict() -> String {
    let drop_in = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/deploy/oma/tunnelfleet.conf");
    format!(
        "PasswordAuthentication no\nPermitRootLogin no\nX11Forwarding no\nGatewayPorts no\nAllowTcpForwarding yes\nInclude {}\n",
        drop_in.display()
    )
}

#[test]
fn sshd_settings_from_real_sshd_t() {
    if !Sshd::available("audit_sshd_t") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lax = sshd_config(dir.path(), "lax", LAX);
    let s = sshd::sshd_t(Path::new(SSHD_BIN), &lax, Some("vma")).unwrap();
    let f = sshd::audit(&s, "lax");
    for id in [
        "sshd.password-auth",
        "sshd.root-login",
        "sshd.x11",
        "sshd.gatewayports",
        "sshd.permitopen-any",
        "sshd.permitlisten-any",
        "sshd.client-alive",
    ] {
        assert!(ids(&f).contains(&id), "{id} missing from {:?}", ids(&f));
    }
    let strict = sshd_config(dir.path(), "strict", &strict());
    let s = sshd::sshd_t(Path::new(SSHD_BIN), &strict, Some("vma")).unwrap();
    assert!(
        sshd::audit(&s, "strict").is_empty(),
        "{:?}",
        sshd::audit(&s, "strict")
    );
    // For another user the Match block does not apply: forwarding is open again.
    let s = sshd::sshd_t(Path::new(SSHD_BIN), &strict, Some("alice")).unwrap();
    assert!(ids(&sshd::audit(&s, "strict")).contains(&"sshd.permitopen-any"));
    // The milder forms.
    let mild = sshd_config(
        dir.path(),
        "mild",
        "PermitRootLogin prohibit-password\nGatewayPorts clientspecified\n",
    );
    let f = sshd::audit(
        &sshd::sshd_t(Path::new(SSHD_BIN), &mild, None).unwrap(),
        "mild",
    );
    let root = f.iter().find(|f| f.id == "sshd.root-login-key").unwrap();
    assert_eq!(root.severity, Severity::Low);
    let gw = f.iter().find(|f| f.id == "sshd.gatewayports").unwrap();
    assert_eq!(gw.severity, Severity::Low);
    // An OMA with the fleet's drop-in (`oma sshd-config`) before its first `oma sync`: sshd
    // would refuse every key; after it, the drop-in's files are in place.
    let files = dir.path().join("fleet");
    let oma = sshd_config(
        dir.path(),
        "oma",
        &tunnelfleet_ops::cli::oma_sync::sshd_config("oma-dc1", &files),
    );
    let before = sshd::audit(
        &sshd::sshd_t(Path::new(SSHD_BIN), &oma, Some("vma")).unwrap(),
        "oma",
    );
    for id in [
        "sshd.ssh-ca-missing",
        "sshd.revoked-keys-unreadable",
        "sshd.principals-missing",
    ] {
        assert!(
            ids(&before).contains(&id),
            "{id} missing from {:?}",
            ids(&before)
        );
    }
    tunnelfleet_ops::cli::oma_sync::write(
        &files,
        &tunnelfleet_coordinator::admin::SshAccess {
            group: "oma-dc1".into(),
            version: 1,
            ca_public_key: Some(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOdQYl3nYxYz1dQ4r9oJrB3V6vY8b7bqkfq8Jv1yXr6l ca"
                    .into(),
            ),
            principals: Vec::new(),
            revoked_keys: Vec::new(),
            revoked_agents: Vec::new(),
        },
    )
    .unwrap();
    let after = sshd::audit(
        &sshd::sshd_t(Path::new(SSHD_BIN), &oma, Some("vma")).unwrap(),
        "oma",
    );
    assert!(
        !ids(&after)
            .iter()
            .any(|id| id.contains("revoked") || id.contains("principals") || id.contains("ssh-ca")),
        "{:?}",
        ids(&after)
    );
}

#[test]
fn sshd_files_parsed_with_include_and_match_when_sshd_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    std::fs::write(
        dir.path().join("conf.d/10-lax.conf"),
        "PasswordAuthentication yes\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("conf.d/ignored.txt"), "X11Forwarding yes\n").unwrap();
    let main = dir.path().join("sshd_config");
    std::fs::write(
        &main,
        format!(
            "Include {}/conf.d/*.conf\nPasswordAuthentication no\nPermitRootLogin no\nGatewayPorts no\nClientAliveInterval 5\n\
             Match User vma\n  PermitOpen localhost:8082\n  PermitListen localhost:9081\nMatch Address 10.0.0.0/8\n  X11Forwarding yes\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (s, source) = sshd::effective(Path::new("/nonexistent/sshd"), &main, Some("vma")).unwrap();
    let sshd::Source::Parsed(notes) = source else {
        panic!("expected the parser")
    };
    assert!(
        notes.iter().any(|n| n.contains("Match address")),
        "{notes:?}"
    );
    let f = sshd::audit(&s, "parsed");
    // The included file came first, so its value wins (sshd's first-value rule).
    assert_eq!(ids(&f), vec!["sshd.password-auth"], "{f:?}");
    let (s, _) = sshd::effective(Path::new("/nonexistent/sshd"), &main, Some("alice")).unwrap();
    assert!(ids(&sshd::audit(&s, "parsed")).contains(&"sshd.permitopen-any"));
}

#[test]
fn listeners_beyond_loopback_are_named_and_loopback_ones_are_not() {
    let exposed = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (ep, lp) = (
        exposed.local_addr().unwrap().port(),
        local.local_addr().unwrap().port(),
    );
    let l = sockets::listeners().unwrap();
    let mine = l.iter().find(|x| x.port == ep).unwrap();
    assert!(
        mine.process
            .as_deref()
            .is_some_and(|p| p.contains(&std::process::id().to_string())),
        "{mine:?}"
    );
    let f = sockets::audit(&l);
    let hit = f
        .iter()
        .find(|f| f.evidence.starts_with(&format!("0.0.0.0:{ep} ")))
        .unwrap();
    assert_eq!(
        (hit.id.as_str(), hit.severity),
        ("socket.exposed", Severity::Low)
    );
    assert!(!f.iter().any(|f| f.evidence.contains(&format!(":{lp} "))));
}

#[test]
fn failed_logins_counted_per_source_from_a_real_sshd_log() {
    if !Sshd::available("audit_logins") {
        return;
    }
    let sshd = Sshd::start();
    let wrong = tempfile::tempdir().unwrap();
    keygen(&wrong.path().join("k"));
    for _ in 0..6 {
        let _ = Command::new("ssh")
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-i",
            ])
            .arg(wrong.path().join("k"))
            .args([
                "-p",
                &sshd.port.to_string(),
                &format!("{}@127.0.0.1", sshd.user),
                "true",
            ])
            .output()
            .unwrap();
    }
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..100 {
        counts = logins::failed_by_source(&sshd.log());
        if counts.get("127.0.0.1").is_some_and(|&n| n >= 6) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(counts.get("127.0.0.1"), Some(&6), "log:\n{}", sshd.log());
    let f = logins::audit(&counts, "sshd.log");
    assert_eq!(
        (f[0].id.as_str(), f[0].severity),
        ("logins.repeated-failures", Severity::Medium)
    );

    // Below the threshold: noted, not flagged. Password failures and invalid users count too.
    let sample = "Nov 23 01:02:03 oma sshd[1]: Failed password for invalid user admin from 203.0.113.9 port 4242 ssh2\n\
                  Nov 23 01:02:04 oma sshd[1]: Invalid user test from 198.51.100.7 port 1\n\
                  Nov 23 01:02:05 oma sshd[1]: Accepted publickey for vma from 192.0.2.1 port 2 ssh2\n";
    let counts = logins::failed_by_source(sample);
    assert_eq!(counts.len(), 2);
    // Three password guesses on one connection are three failures; the invalid-user line of
    // the same connection is not a fourth.
    let guesses = "sshd[2]: Invalid user admin from 203.0.113.9 port 7\n\
                   sshd[2]: Failed password for invalid user admin from 203.0.113.9 port 7 ssh2\n\
                   sshd[2]: Failed password for invalid user admin from 203.0.113.9 port 7 ssh2\n\
                   sshd[2]: Failed password for invalid user admin from 203.0.113.9 port 7 ssh2\n";
    assert_eq!(
        logins::failed_by_source(guesses).get("203.0.113.9"),
        Some(&3)
    );
    let f = logins::audit(&counts, "auth.log");
    assert_eq!(ids(&f), vec!["logins.failures"]);
    assert!(
        logins::audit(
            &logins::failed_by_source("Accepted publickey for vma from 192.0.2.1"),
            "x"
        )
        .is_empty()
    );
}

#[test]
fn own_config_tofu_exposed_forwards_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    keygen(&key);
    let kh = dir.path().join("known_hosts");
    std::fs::write(&kh, "").unwrap();
    chmod(&kh, 0o644);
    let write = |name: &str, extra: &str, forward: &str, metrics: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[agent]\ncontrol_socket = \"{}/run/agent.sock\"\nmetrics_listen = \"{metrics}\"\n[[profile]]\nname = \"oma\"\nendpoints = [\"oma:443\"]\nuser = \"vma\"\n\
                 identity_file = \"{}\"\nknown_hosts = \"{}\"\nforwards = [\"{forward}\"]\n{extra}\n",
                dir.path().display(),
                key.display(),
                kh.display()
            ),
        )
        .unwrap();
        p
    };
    let lax = write(
        "lax.toml",
        "trust_on_first_use = true",
        "L 0.0.0.0:8082:localhost:8082",
        "0.0.0.0:9465",
    );
    let f = own::audit(&lax);
    for id in [
        "tunnelfleet.tofu",
        "tunnelfleet.exposed-forward",
        "tunnelfleet.exposed-metrics",
        "key.no-passphrase",
    ] {
        assert!(ids(&f).contains(&id), "{id} missing: {:?}", ids(&f));
    }
    let strict = write("strict.toml", "", "L 8082:localhost:8082", "127.0.0.1:9465");
    assert_eq!(ids(&own::audit(&strict)), vec!["key.no-passphrase"]);
    chmod(&key, 0o640);
    chmod(&kh, 0o666);
    let f = own::audit(&strict);
    assert!(
        ids(&f).contains(&"key.permissions")
            && ids(&f).contains(&"tunnelfleet.known-hosts-writable"),
        "{f:?}"
    );
    let broken = write("broken.toml", "", "L 8082:nowhere", "127.0.0.1:9465");
    let f = own::audit(&broken);
    assert_eq!(f[0].id, "tunnelfleet.config-invalid");
    assert!(f[0].evidence.contains("broken.toml"));
}

#[test]
fn the_whole_report_sorts_worst_first_and_lists_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("id");
    keygen_with(&key, &["-t", "rsa", "-b", "1024", "-N", ""]);
    let log = dir.path().join("auth.log");
    std::fs::write(&log, "sshd[1]: Invalid user x from 192.0.2.44 port 1\n").unwrap();
    let r = audit::run(&audit::AuditOptions {
        keys: vec![key],
        sshd_config: Some(dir.path().join("missing_sshd_config")),
        sshd: PathBuf::from("/nonexistent/sshd"),
        auth_log: Some(log),
        agent_config: Some(dir.path().join("missing.toml")),
        no_sockets: true,
        ..Default::default()
    });
    assert_eq!(r.worst(), Some(Severity::High));
    assert_eq!(r.findings[0].id, "key.rsa-short");
    assert!(
        r.findings
            .windows(2)
            .all(|w| w[0].severity >= w[1].severity)
    );
    assert!(
        r.skipped.iter().any(|s| s.contains("missing_sshd_config")),
        "{:?}",
        r.skipped
    );
    assert!(r.skipped.iter().any(|s| s.contains("--no-sockets")));
    let text = r.render();
    assert!(
        text.contains("[HIGH] RSA key of 1024 bits") && text.contains("fix:"),
        "{text}"
    );
}
