//! The rest of this target's tests (helpers in `main.rs`).

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_under_a_running_stream_loses_no_byte_and_no_session() {
    if !Sshd::available("SSH certificates") {
        return;
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ShortLived {
        c,
        sshd: _sshd,
        agent,
        local,
        first,
        _echo,
    } = short_lived(dir.path(), "vma-renew").await;

    // One connection, numbered chunks echoed back and compared, until a new certificate is
    // issued, and a while after.
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    let mut sent = 0u64;
    let mut renewed_at = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while renewed_at.is_none_or(|at: u64| sent < at + 200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no renewal within 60 s"
        );
        let chunk: Vec<u8> = (0..4096u32)
            .map(|i| (sent as u32).wrapping_mul(31).wrapping_add(i) as u8)
            .collect();
        stream.write_all(&chunk).await.unwrap();
        let mut back = vec![0u8; chunk.len()];
        stream.read_exact(&mut back).await.unwrap();
        assert_eq!(back, chunk, "chunk {sent} came back changed");
        sent += 1;
        if renewed_at.is_none()
            && c.fleet
                .store
                .ssh_cert("vma-renew")
                .unwrap()
                .is_some_and(|now| now.serial != first.serial)
        {
            renewed_at = Some(sent);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renewed = c.fleet.store.ssh_cert("vma-renew").unwrap().unwrap();
    assert!(renewed.valid_before > first.valid_before);
    assert_eq!(
        renewed.key_fingerprint, first.key_fingerprint,
        "the same key"
    );
    // The agent holds the new one, and its session never came down.
    wait_until(10, "the agent holding the renewed certificate", || async {
        std::fs::read_to_string(
            dir.path()
                .join("vma-renew/state/ssh")
                .join(tunnelfleet_agent::sshcert::CERT_FILE),
        )
        .ok()
        .and_then(|t| russh::keys::ssh_key::Certificate::from_openssh(t.trim()).ok())
        .is_some_and(|c| c.serial() == renewed.serial)
    })
    .await;
    let p = agent.profile("oma").await;
    assert_eq!(p.reconnects, 0, "{p:?}");
    agent.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_coordinator_away_the_agent_logs_in_with_the_certificate_it_holds_until_it_runs_out()
 {
    if !Sshd::available("SSH certificates") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let validity = tunnelfleet_coordinator::sshca::MIN_VALIDITY;
    let ShortLived {
        c,
        mut sshd,
        agent,
        local,
        first: held,
        _echo,
    } = short_lived(dir.path(), "vma-away").await;
    let now_s = || tunnelfleet_runtime::clock::now_unix_ms() / 1000;

    // The coordinator goes away past the certificate's half-life: nothing renews it.
    c.stop().await;
    let half_life = held.valid_after + (held.valid_before - held.valid_after) / 2;
    wait_until(60, "past the held certificate's half-life", || async {
        now_s() > half_life + 1
    })
    .await;
    assert!(echo_roundtrip(local, b"still up").await.is_ok());
    // Its session dropped: the agent logs in again with the certificate it holds.
    sshd.kill_all();
    sshd.restart();
    wait_until(30, "the tunnel back on the held certificate", || async {
        echo_roundtrip(local, b"back").await.is_ok()
    })
    .await;
    assert!(agent.profile("oma").await.reconnects >= 1);

    // A coordinator on the same state that this agent cannot reach (a new address): the
    // certificate runs toward its end unrenewed, and the alert says when it runs out.
    let c =
        FullCoordinator::start_with_ssh_validity(dir.path(), Duration::from_millis(300), validity)
            .await;
    wait_until(60, "ssh_cert_expiring firing for vma-away", || async {
        let alerts: Vec<tunnelfleet_coordinator::store::Alert> =
            c.api.get("/v1/alerts").await.unwrap();
        alerts.iter().any(|a| {
            a.kind.as_str() == "ssh_cert_expiring"
                && a.subject == "vma-away"
                && a.summary.contains(&format!("(serial {})", held.serial))
                && (a.summary.contains("expires at") || a.summary.contains("expired at"))
        })
    })
    .await;
    let shown: serde_json::Value = c.api.get("/v1/agents/vma-away").await.unwrap();
    assert_eq!(shown["ssh_cert"]["serial"], held.serial, "{shown}");
    assert_eq!(shown["ssh_cert"]["expiring"], true, "{shown}");

    // Run out: sshd refuses it; the tunnel stays down until a coordinator renews it.
    wait_until(60, "past the held certificate's end", || async {
        now_s() > held.valid_before + 1
    })
    .await;
    sshd.kill_all();
    sshd.restart();
    wait_until(30, "the expired certificate refused by sshd", || async {
        agent
            .profile("oma")
            .await
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("refused by the server"))
    })
    .await;
    assert!(echo_roundtrip(local, b"out").await.is_err());
    assert!(sshd.log().contains("expired"), "{}", sshd.log());
    agent.shutdown().await;
    c.stop().await;
}

#[test]
fn not_yet_valid_and_wrongly_signed_certificates_are_refused_by_sshd() {
    if !Sshd::available("SSH certificates") {
        return;
    }
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    tunnelfleet_coordinator::pki::init(&pki, &["localhost".into()]).unwrap();
    let sshd = oma_trusting_the_fleet(dir.path(), "restrict,port-forwarding vma-x\n");
    let key = dir.path().join("id_ed25519");
    integration_tests::keygen(&key);
    let other_ca = dir.path().join("other_ca");
    integration_tests::keygen(&other_ca);
    // A certificate as the fleet's CA writes it, from `ca` for `validity` (ssh-keygen -V).
    let sign = |ca: &std::path::Path, validity: &str| {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-s"])
            .arg(ca)
            .args(["-I", "vma-x", "-n", "vma-x", "-V", validity])
            .args(["-O", "clear", "-O", "permit-port-forwarding"])
            .arg(key.with_extension("pub"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen -s: {out:?}");
    };
    let logs_in = || integration_tests::ssh_login(&sshd, &key).0;
    let fleet_ca = pki.join(tunnelfleet_coordinator::sshca::SSH_CA_KEY);
    sign(&fleet_ca, "-5m:+1h");
    assert!(logs_in(), "a valid certificate refused: {}", sshd.log());
    sign(&fleet_ca, "+1h:+2h");
    assert!(!logs_in(), "a certificate not yet valid let in");
    sign(&other_ca, "-5m:+1h");
    assert!(!logs_in(), "a certificate of another CA let in");
    let log = sshd.log();
    assert!(log.contains("not yet valid"), "{log}");
}

/// `tunnelfleet oma host-cert ENDPOINT --key KEY` against `c` (admin token in `root`).
fn host_cert(c: &FullCoordinator, root: &std::path::Path, endpoint: &str, key: &std::path::Path) {
    let out = std::process::Command::new(integration_tests::Program::Cli.path())
        .args(["oma", "host-cert", endpoint, "--key"])
        .arg(key)
        .arg("--coordinator")
        .arg(c.admin.to_string())
        .arg("--token-file")
        .arg(root.join("admin.token"))
        .output()
        .unwrap();
    assert!(out.status.success(), "oma host-cert: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oma_with_a_host_certificate_of_the_fleet_is_trusted_without_a_known_hosts_line() {
    if !Sshd::available("SSH host certificates") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(root.path(), Duration::from_millis(300), Vec::new()).await;
    let (echo, _e) = echo_server().await;
    let trust_lines = format!(
        "TrustedUserCAKeys {}\nAuthorizedPrincipalsFile {}\n",
        root.path().join("pki").join(SSH_CA_PUB).display(),
        root.path().join("principals").display()
    );
    std::fs::write(
        root.path().join("principals"),
        format!("restrict,port-forwarding,permitopen=\"127.0.0.1:{echo}\" vma-h\n"),
    )
    .unwrap();
    // Three OMAs of one group, each presenting a host certificate: from the fleet's host CA
    // (`oma host-cert`), from the fleet's CA for another name, from another CA.
    let mut omas: Vec<Sshd> = (0..3).map(|_| Sshd::start_with(&trust_lines)).collect();
    let endpoints: Vec<String> = omas.iter().map(Sshd::endpoint).collect();
    let group = serde_json::json!({"name": "oma-dc1", "endpoints": endpoints, "probe": false});
    let _: tunnelfleet_coordinator::admin::Changed = c
        .api
        .call("PUT", "/v1/groups/oma-dc1", Some(&group))
        .await
        .unwrap();
    let host_key = |s: &Sshd| s.dir.path().join("ssh_host_ed25519_key.pub");
    host_cert(&c, root.path(), &endpoints[0], &host_key(&omas[0]));
    let sign = |ca: &std::path::Path, name: &str, key: &std::path::Path| {
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-h", "-s"])
            .arg(ca)
            .args(["-I", "oma", "-n", name, "-V", "-5m:+1d"])
            .arg(key)
            .output()
            .unwrap();
        assert!(out.status.success(), "ssh-keygen -s: {out:?}");
    };
    sign(
        &root
            .path()
            .join("pki")
            .join(tunnelfleet_coordinator::sshca::SSH_HOST_CA_KEY),
        "oma-elsewhere",
        &host_key(&omas[1]),
    );
    let other_ca = root.path().join("other_ca");
    integration_tests::keygen(&other_ca);
    sign(&other_ca, "127.0.0.1", &host_key(&omas[2]));
    for s in &mut omas {
        let cert = s.dir.path().join("ssh_host_ed25519_key-cert.pub");
        assert!(cert.exists());
        s.restart_with(&format!(
            "{trust_lines}HostCertificate {}\n",
            cert.display()
        ));
    }

    // An enrolled agent with no known_hosts line and no pin: one profile per OMA.
    let agent = TestAgent::start(&c.agent_section(root.path(), "vma-h", "")).await;
    let mut ports = Vec::new();
    for (i, s) in omas.iter().enumerate() {
        let local = free_port();
        let mut spec = certified_profile(s, vec![format!("L {local}:127.0.0.1:{echo}")]);
        spec.name = format!("oma{i}");
        spec.known_hosts = None;
        spec.fleet_host_ca = true;
        put_and_assign(&c.api, &spec, "vma-h").await;
        ports.push(local);
    }
    wait_until(30, "the tunnel to the OMA the fleet certified", || async {
        echo_roundtrip(ports[0], b"certified host").await.is_ok()
    })
    .await;
    let learned = std::fs::read_to_string(
        root.path()
            .join("vma-h/state/ssh")
            .join(tunnelfleet_agent::sshcert::HOST_CA_FILE),
    )
    .unwrap();
    let host_ca = std::fs::read_to_string(
        root.path()
            .join("pki")
            .join(tunnelfleet_coordinator::sshca::SSH_HOST_CA_PUB),
    )
    .unwrap();
    let ca_b64 = host_ca.split_whitespace().nth(1).unwrap();
    assert!(
        learned.contains(&format!("@cert-authority * ssh-ed25519 {ca_b64}")),
        "{learned}"
    );
    for (name, why) in [
        ("oma1", "valid for oma-elsewhere, not 127.0.0.1"),
        ("oma2", "is not trusted"),
    ] {
        wait_until(30, &format!("{name} refused: {why}"), || async {
            agent
                .profile(name)
                .await
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(why))
        })
        .await;
    }
    for p in &ports[1..] {
        assert!(echo_roundtrip(*p, b"x").await.is_err());
    }
    agent.shutdown().await;
    c.stop().await;
}
