//! Host key trust against real key files: known_hosts, pins, TOFU, certificates.
use super::*;
use russh::keys::{Algorithm, PrivateKey};

fn key() -> PublicKey {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .unwrap()
        .public_key()
        .clone()
}

#[test]
fn known_hosts_matching() {
    let (k1, k2) = (key(), key());
    let text = format!(
        "# comment\n\ngarbage line\n{}\n",
        known_hosts_line("[oma.example]:443", &k1)
    );
    assert_eq!(
        check_known_hosts_text(&text, "[oma.example]:443", &k1),
        KnownHostsMatch::Match
    );
    assert_eq!(
        check_known_hosts_text(&text, "[oma.example]:443", &k2),
        KnownHostsMatch::Mismatch(4)
    );
    assert_eq!(
        check_known_hosts_text(&text, "oma.example", &k1),
        KnownHostsMatch::NoEntry
    );
    let revoked = format!("@revoked * {}\n", k1.to_openssh().unwrap());
    assert_eq!(
        check_known_hosts_text(&revoked, "x", &k1),
        KnownHostsMatch::Revoked(1)
    );
}

#[test]
fn patterns() {
    assert!(hosts_match("a,b,*.example.com", "x.example.com"));
    assert!(!hosts_match(
        "*.example.com,!bad.example.com",
        "bad.example.com"
    ));
    assert!(hosts_match("[10.0.0.?]:443", "[10.0.0.5]:443"));
}

/// Hashed entries as OpenSSH writes them: a known_hosts file hashed by the real
/// `ssh-keygen -H` (not by the HMAC this module checks with).
#[test]
fn entries_hashed_by_the_real_ssh_keygen_match() {
    let program = std::path::Path::new("/usr/bin/ssh-keygen");
    if !program.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "ssh-keygen is missing and CI is set; install openssh-client"
        );
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED entries_hashed_by_the_real_ssh_keygen_match: no /usr/bin/ssh-keygen\n",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let (k1, k2) = (key(), key());
    std::fs::write(
        &kh,
        format!(
            "{}\n{}\n",
            known_hosts_line("localhost", &k1),
            known_hosts_line("[10.0.0.5]:2222", &k2)
        ),
    )
    .unwrap();
    let out = std::process::Command::new(program)
        .arg("-H")
        .arg("-f")
        .arg(&kh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hashed = std::fs::read_to_string(&kh).unwrap();
    assert!(
        hashed.lines().all(|l| l.starts_with("|1|")),
        "not hashed: {hashed}"
    );
    assert!(!hashed.contains("localhost") && !hashed.contains("10.0.0.5"));
    assert_eq!(
        check_known_hosts_text(&hashed, "localhost", &k1),
        KnownHostsMatch::Match
    );
    assert_eq!(
        check_known_hosts_text(&hashed, "[10.0.0.5]:2222", &k2),
        KnownHostsMatch::Match
    );
    assert_eq!(
        check_known_hosts_text(&hashed, "otherhost", &k1),
        KnownHostsMatch::NoEntry
    );
    assert_eq!(
        check_known_hosts_text(&hashed, "localhost", &k2),
        KnownHostsMatch::Mismatch(1)
    );
}

#[test]
fn verify_unknown_pinned_and_tofu() {
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let k = key();
    let strict = HostTrust {
        known_hosts: Some(kh.clone()),
        pinned: vec![],
        trust_on_first_use: false,
        fleet_host_ca: None,
    };
    match strict.verify("h", 2222, &k, false) {
        Verdict::Refused(e @ HostKeyError::Unknown { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&fingerprint(&k)), "{msg}");
            assert!(msg.contains("[h]:2222 ssh-ed25519 "), "{msg}");
        }
        v => panic!("{v:?}"),
    }
    let pinned = HostTrust {
        pinned: HostTrust::pins(&[fingerprint(&k)]),
        ..strict.clone()
    };
    assert_eq!(pinned.verify("h", 2222, &k, false), Verdict::Trusted);
    let tofu = HostTrust {
        trust_on_first_use: true,
        ..strict.clone()
    };
    assert_eq!(tofu.verify("h", 2222, &k, false), Verdict::Learned);
    assert_eq!(strict.verify("h", 2222, &k, false), Verdict::Trusted);
    // A different key of the same type is a change, even with TOFU on.
    assert!(matches!(
        tofu.verify("h", 2222, &key(), false),
        Verdict::Refused(HostKeyError::Changed { line_no: 1, .. })
    ));
}

#[test]
fn fingerprint_forms() {
    // What a pin is checked against at load is what this module prints for a real key.
    use tunnelfleet_protocol::fingerprint::parse_host_key_fingerprint;
    assert!(parse_host_key_fingerprint(&fingerprint(&key())).is_ok());
    assert!(parse_host_key_fingerprint("MD5:aa").is_err());
    assert!(parse_host_key_fingerprint("SHA256:short").is_err());
}

/// A known host offering a key of another algorithm is not "unknown" (to be learned with
/// TOFU): an attacker would simply offer another algorithm. Any recorded key for the host
/// and a different offered one is HOST KEY CHANGED.
#[test]
fn another_algorithm_for_a_known_host_is_a_change_not_a_new_host() {
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let recorded = key();
    std::fs::write(
        &kh,
        format!("{}\n", known_hosts_line("[h]:2222", &recorded)),
    )
    .unwrap();
    let tofu = HostTrust {
        known_hosts: Some(kh.clone()),
        pinned: vec![],
        trust_on_first_use: true,
        fleet_host_ca: None,
    };
    let other = PrivateKey::random(
        &mut rand::rng(),
        Algorithm::Ecdsa {
            curve: russh::keys::EcdsaCurve::NistP256,
        },
    )
    .unwrap()
    .public_key()
    .clone();
    assert!(
        matches!(
            tofu.verify("h", 2222, &other, false),
            Verdict::Refused(HostKeyError::Changed { line_no: 1, .. })
        ),
        "{:?}",
        tofu.verify("h", 2222, &other, false)
    );
    assert_eq!(
        std::fs::read_to_string(&kh).unwrap().lines().count(),
        1,
        "the other algorithm's key was learned"
    );
}

const NOW: u64 = 1_800_000_000;

/// A certificate of `kind` for `principals`, valid `from..until`, signed by `ca`.
fn certificate(
    ca: &PrivateKey,
    kind: CertType,
    principals: &[&str],
    from: u64,
    until: u64,
) -> Certificate {
    let host = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let mut b = russh::keys::ssh_key::certificate::Builder::new(
        [7; 32],
        host.public_key().key_data().clone(),
        from,
        until,
    )
    .unwrap();
    b.serial(1)
        .unwrap()
        .key_id("oma")
        .unwrap()
        .cert_type(kind)
        .unwrap();
    for p in principals {
        b.valid_principal(*p).unwrap();
    }
    b.sign(ca).unwrap()
}

fn fleet_trust(dir: &Path, ca: &PrivateKey) -> HostTrust {
    let file = dir.join("fleet_known_hosts");
    std::fs::write(
        &file,
        format!(
            "@cert-authority * {}\n",
            ca.public_key().to_openssh().unwrap()
        ),
    )
    .unwrap();
    HostTrust {
        known_hosts: None,
        pinned: vec![],
        trust_on_first_use: false,
        fleet_host_ca: Some(file),
    }
}

fn refusal(v: Verdict) -> String {
    match v {
        Verdict::Refused(e) => e.to_string(),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_host_certificate_of_the_fleet_ca_is_trusted_for_its_names_now() {
    let dir = tempfile::tempdir().unwrap();
    let ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let trust = fleet_trust(dir.path(), &ca);
    assert!(trust.has_cert_authorities());
    let good = certificate(&ca, CertType::Host, &["oma-a"], NOW - 60, NOW + 60);
    assert_eq!(
        trust.verify_certificate("oma-a", 22, &good, false, NOW),
        Verdict::Trusted
    );
    assert_eq!(
        trust.verify_certificate("OMA-A", 2222, &good, false, NOW),
        Verdict::Trusted
    );
    // Another name, another time, a user certificate, an unknown critical option.
    let e = refusal(trust.verify_certificate("oma-b", 22, &good, false, NOW));
    assert!(e.contains("valid for oma-a, not oma-b"), "{e}");
    let e = refusal(trust.verify_certificate("oma-a", 22, &good, false, NOW + 60));
    assert!(e.contains("expired at"), "{e}");
    let e = refusal(trust.verify_certificate("oma-a", 22, &good, false, NOW - 61));
    assert!(e.contains("not valid before"), "{e}");
    let user = certificate(&ca, CertType::User, &["oma-a"], NOW - 60, NOW + 60);
    let e = refusal(trust.verify_certificate("oma-a", 22, &user, false, NOW));
    assert!(e.contains("not a host certificate"), "{e}");
}

#[test]
fn a_certificate_of_another_ca_is_judged_by_its_key_alone() {
    let dir = tempfile::tempdir().unwrap();
    let ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let other = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let trust = fleet_trust(dir.path(), &ca);
    let forged = certificate(&other, CertType::Host, &["oma-a"], NOW - 60, NOW + 60);
    let e = refusal(trust.verify_certificate("oma-a", 22, &forged, false, NOW));
    assert!(e.contains("is not trusted"), "{e}");
    // Its key pinned: trusted as a plain key would be.
    let pinned = HostTrust {
        pinned: HostTrust::pins(&[fingerprint(&PublicKey::new(
            forged.public_key().clone(),
            "",
        ))]),
        ..trust.clone()
    };
    assert_eq!(
        pinned.verify_certificate("oma-a", 22, &forged, false, NOW),
        Verdict::Trusted
    );
    // No fleet CA learned yet, nothing else trusted: the error says what is missing.
    let unlearned = HostTrust {
        fleet_host_ca: Some(dir.path().join("not-yet")),
        ..trust
    };
    let e = refusal(unlearned.verify_certificate("oma-a", 22, &forged, false, NOW));
    assert!(e.contains("fleet_host_ca = true"), "{e}");
}

#[test]
fn known_hosts_authorities_are_scoped_and_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let ca = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
    let ca_line = ca.public_key().to_openssh().unwrap();
    std::fs::write(&kh, format!("@cert-authority *.dc1 {ca_line}\n")).unwrap();
    let trust = HostTrust {
        known_hosts: Some(kh.clone()),
        pinned: vec![],
        trust_on_first_use: false,
        fleet_host_ca: None,
    };
    assert!(trust.has_cert_authorities());
    let c = certificate(
        &ca,
        CertType::Host,
        &["oma.dc1", "oma.dc2"],
        NOW - 60,
        NOW + 60,
    );
    assert_eq!(
        trust.verify_certificate("oma.dc1", 22, &c, false, NOW),
        Verdict::Trusted
    );
    // The authority does not speak for dc2's hosts.
    let e = refusal(trust.verify_certificate("oma.dc2", 22, &c, false, NOW));
    assert!(e.contains("is not trusted"), "{e}");
    // A revoked CA vouches for nothing.
    std::fs::write(
        &kh,
        format!("@cert-authority *.dc1 {ca_line}\n@revoked * {ca_line}\n"),
    )
    .unwrap();
    let e = refusal(trust.verify_certificate("oma.dc1", 22, &c, false, NOW));
    assert!(e.contains("revoked"), "{e}");
}
