//! One enrolled agent against the coordinator (a stolen appliance speaking the protocol with
//! its own certificate): what it reports counts only for what it was given. Made-up profiles
//! and endpoints raise nothing; `Applied` frames for versions never pushed change nothing; a
//! revoked certificate keeps no connection.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;
use std::time::Duration;

use integration_tests::{FullCoordinator, assign_to_site, profile_spec, wait_until};
use tunnelfleet_agent::link::{self, ControlLink};
use tunnelfleet_coordinator::pki;
use tunnelfleet_coordinator::store::AlertKind;
use tunnelfleet_protocol::{
    Applied, CoordinatorMessage, ErrorCount, ErrorKind, Heartbeat, Hello, PROTOCOL_VERSION,
    ProfileReport, ProfileSet, TunnelState,
};

fn hello(id: &str) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: id.into(),
        agent_version: "test".into(),
        labels: [("site".to_string(), "dc1".to_string())].into(),
        applied_version: None,
        started_unix_ms: 1,
    }
}

async fn connect(c: &FullCoordinator, dir: &Path, id: &str) -> ControlLink {
    let files = pki::issue_agent(&dir.join("pki"), id, 365, &dir.join(id)).unwrap();
    connect_with(c, &files, id).await
}

async fn connect_with(c: &FullCoordinator, files: &pki::AgentFiles, id: &str) -> ControlLink {
    let cfg = link::client_config(&files.ca, &files.cert, &files.key).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    link::connect(&endpoint, cfg, c.control, "localhost", hello(id))
        .await
        .unwrap()
}

/// The next push on `l`, skipping nothing else.
async fn push(l: &mut ControlLink) -> ProfileSet {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), l.next())
            .await
            .unwrap()
            .unwrap()
        {
            CoordinatorMessage::Push(set) => return set,
            _ => continue,
        }
    }
}

/// A profile failing its health checks (and its sessions) for many checks in a row.
fn failing(name: &str, endpoint: &str) -> ProfileReport {
    ProfileReport {
        up_since_unix_ms: Some(1),
        last_error: Some("health check failed: HTTP 503".into()),
        consecutive_failures: 10,
        errors: vec![ErrorCount {
            endpoint: endpoint.into(),
            kind: ErrorKind::Auth,
            count: 5,
            last_detail: "refused".into(),
            last_unix_ms: 1,
        }],
        ..ProfileReport::new(name, TunnelState::Up, endpoint)
    }
}

/// Pushes profile `oma` (endpoints oma-a:443, oma-b:443) to site dc1; returns the version.
async fn push_oma(c: &FullCoordinator) -> u64 {
    let v = assign_to_site(
        &c.fleet,
        &profile_spec("oma", &["L 8082:localhost:8082"]),
        "dc1",
    )
    .await;
    c.fleet.push_changed().unwrap();
    v
}

/// Heartbeats with 1,000 made-up failing profiles (beside the real one, failing too):
/// only the real profile's alerts fire. And 1,000 `Applied` frames for versions never pushed
/// leave the agent's record at the version it was really given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_profiles_raise_nothing_and_unsolicited_applies_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(500), vec![]).await;
    let mut l = connect(&c, dir.path(), "vma-stolen").await;
    let v = push_oma(&c).await;
    let set = loop {
        let set = push(&mut l).await;
        if set.version == v {
            break set;
        }
    };
    assert_eq!(set.profiles[0].name, "oma");
    l.applied(Applied {
        version: v,
        ok: true,
        results: vec![],
    })
    .await
    .unwrap();
    wait_until(10, "the real version acknowledged", || async {
        c.fleet
            .store
            .agent("vma-stolen")
            .unwrap()
            .is_some_and(|r| r.applied_version == Some(v))
    })
    .await;

    // 1,000 made-up profiles over four heartbeats (a heartbeat carries at most 256).
    for seq in 0..4u64 {
        let mut profiles = vec![failing("oma", "oma-a:443")];
        // The real profile also claims failures against an endpoint never pushed to it.
        profiles[0].errors.push(ErrorCount {
            endpoint: "victim-x:22".into(),
            kind: ErrorKind::Timeout,
            count: 50 * (seq + 1),
            last_detail: "timeout".into(),
            last_unix_ms: 1,
        });
        for i in 0..250 {
            let n = seq * 250 + i;
            profiles.push(failing(&format!("made-up-{n}"), &format!("victim-{n}:22")));
        }
        l.heartbeat(Heartbeat {
            seq: seq + 1,
            sent_unix_ms: 0,
            profiles,
        })
        .await
        .unwrap();
    }
    // The real profile's failing checks are its tunnel_health alert (the positive control:
    // the heartbeats were judged).
    wait_until(20, "tunnel_health for the real profile", || async {
        c.fleet
            .store
            .alerts(false)
            .unwrap()
            .iter()
            .any(|a| a.kind == AlertKind::TunnelHealth && a.subject == "vma-stolen/oma")
    })
    .await;
    let firing = c.fleet.store.alerts(false).unwrap();
    let invented: Vec<_> = firing
        .iter()
        .filter(|a| a.subject.contains("made-up") || a.subject.contains("victim"))
        .map(|a| format!("{} {}", a.kind.as_str(), a.subject))
        .collect();
    assert!(
        invented.is_empty(),
        "{} alerts from invented names, e.g. {:?}",
        invented.len(),
        &invented[..invented.len().min(3)]
    );
    let groups: serde_json::Value = c.api.get("/v1/oma").await.unwrap_or_default();
    assert!(
        !groups.to_string().contains("victim"),
        "an endpoint never pushed became evidence: {groups}"
    );

    // Unsolicited acknowledgements.
    for i in 0..1000u64 {
        l.applied(Applied {
            version: v + 1 + i,
            ok: false,
            results: vec![],
        })
        .await
        .unwrap();
    }
    // A heartbeat after them: once it is seen, every Applied before it was read.
    l.heartbeat(Heartbeat {
        seq: 5,
        sent_unix_ms: 0,
        profiles: vec![],
    })
    .await
    .unwrap();
    wait_until(10, "the heartbeat after the applies", || async {
        c.fleet
            .links
            .get("vma-stolen")
            .and_then(|a| a.last_heartbeat)
            .is_some_and(|hb| hb.seq == 5)
    })
    .await;
    let rec = c.fleet.store.agent("vma-stolen").unwrap().unwrap();
    assert_eq!(
        rec.applied_version,
        Some(v),
        "a version never pushed was recorded"
    );
    assert!(rec.applied_ok);
    c.stop().await;
}

/// Whether the coordinator closed `l` (within 10 s), and with what.
async fn closed(l: &mut ControlLink) -> Option<link::LinkError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), l.next()).await {
            Err(_) => return None,
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => return Some(e),
        }
    }
}

/// One certificate, two connections: the newer replaces the older (closed, not left serving
/// heartbeats beside it), and a revoke closes what is left. No link stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_agent_and_a_revoke_leaves_none() {
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(500), vec![]).await;
    let files =
        pki::issue_agent(&dir.path().join("pki"), "vma-2", 365, &dir.path().join("a")).unwrap();
    let mut first = connect_with(&c, &files, "vma-2").await;
    let mut second = connect_with(&c, &files, "vma-2").await;
    let e = closed(&mut first).await;
    assert!(
        e.as_ref()
            .is_some_and(|e| e.to_string().contains("newer connection")),
        "the older connection is still open: {e:?}"
    );
    c.fleet.revoke("vma-2", "appliance stolen").await.unwrap();
    let e = closed(&mut second).await;
    // Told apart by its close code, with the reason.
    assert!(
        matches!(&e, Some(link::LinkError::Revoked { reason, .. }) if reason.contains("appliance stolen")),
        "{e:?}"
    );
    assert!(c.fleet.links.connected().is_empty());
    c.stop().await;
}

/// A revoke that lands while a hello is being handled (after its revocation check, before the
/// connection is registered): registering reads the revocation again, so the connection is
/// closed as revoked instead of staying live. Driven step by step on a real QUIC connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_during_a_held_hello_leaves_no_link() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &["localhost".into()]).unwrap();
    let files = pki::issue_agent(&pki_dir, "vma-3", 365, &dir.path().join("a")).unwrap();
    let server = quinn::Endpoint::server(
        tunnelfleet_coordinator::tls::server_config(&pki_dir).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let cfg = link::client_config(&files.ca, &files.cert, &files.key).unwrap();
    let (agent_side, coordinator_side) = tokio::join!(
        async {
            client
                .connect_with(cfg, addr, "localhost")
                .unwrap()
                .await
                .unwrap()
        },
        async { server.accept().await.unwrap().await.unwrap() }
    );
    let store = tunnelfleet_coordinator::store::Store::open(&dir.path().join("state")).unwrap();
    let (fleet, _events) =
        tunnelfleet_coordinator::fleet::Fleet::new(store, Duration::from_secs(5));
    // The hello was checked (not revoked); now the operator revokes, before registration.
    assert!(fleet.store.revocation("vma-3").unwrap().is_none());
    fleet.revoke("vma-3", "appliance stolen").await.unwrap();
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let r = fleet.attach(
        "vma-3",
        addr,
        Default::default(),
        tx,
        coordinator_side.clone(),
        1,
    );
    assert!(
        r.as_ref().is_err_and(|e| e.to_string().contains("revoked")),
        "{r:?}"
    );
    assert!(fleet.links.connected().is_empty());
    // The caller closes it with the error's code and reason, as the control link does.
    let e = r.unwrap_err();
    coordinator_side.close(e.close_code().into(), e.to_string().as_bytes());
    match tokio::time::timeout(Duration::from_secs(10), agent_side.closed())
        .await
        .unwrap()
    {
        quinn::ConnectionError::ApplicationClosed(a) => {
            assert_eq!(a.error_code, tunnelfleet_protocol::close::REVOKED.into())
        }
        other => panic!("{other}"),
    }
}

/// `f` polled once: its output if it is ready now.
async fn now<F: std::future::Future>(f: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        r = f => Some(r),
        _ = std::future::ready(()) => None,
    }
}

/// A client without a certificate (anyone who can reach the port) gets the enrollment ALPN
/// and exactly one bidirectional stream, no unidirectional one: the protocol uses one stream per
/// connection, and every other stream would be up to a window of buffered memory held on the
/// coordinator. Checked by polling each open once: stream credit is known after the handshake,
/// so an open either completes at once or waits for credit that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_gets_one_stream_and_no_more() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(500), vec![]).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.path().join("pki/ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![tunnelfleet_protocol::ENROLL_ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(cfg, c.control, "localhost")
        .unwrap()
        .await
        .unwrap();
    let first = now(conn.open_bi()).await;
    assert!(first.is_some_and(|r| r.is_ok()), "no first stream");
    assert!(
        now(conn.open_bi()).await.is_none(),
        "a second bidirectional stream was granted"
    );
    assert!(
        now(conn.open_uni()).await.is_none(),
        "a unidirectional stream was granted"
    );
    c.stop().await;
}

/// One agent reporting 40 pushed profiles all failing raises at most
/// `MAX_ALERTS_PER_AGENT` alerts; another agent's alert still fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_raises_at_most_its_cap_of_alerts() {
    use tunnelfleet_coordinator::watch::MAX_ALERTS_PER_AGENT;
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(500), vec![]).await;
    let mut busy = connect(&c, dir.path(), "vma-busy").await;
    let mut other = connect(&c, dir.path(), "vma-other").await;
    let mut last = 0;
    for i in 0..40 {
        last = assign_to_site(
            &c.fleet,
            &profile_spec(
                &format!("p{i}"),
                &[&format!("L {}:localhost:8082", 10000 + i)],
            ),
            "dc1",
        )
        .await;
    }
    c.fleet.push_changed().unwrap();
    for l in [&mut busy, &mut other] {
        while push(l).await.version != last {}
    }
    let alerts_about = |agent: &'static str| {
        let store = c.fleet.store.clone();
        move || {
            store
                .alerts(false)
                .unwrap()
                .iter()
                .filter(|a| a.affected_agents.first().is_some_and(|x| x == agent))
                .count()
        }
    };
    let (busy_alerts, other_alerts) = (alerts_about("vma-busy"), alerts_about("vma-other"));
    for seq in 1..=2 {
        busy.heartbeat(Heartbeat {
            seq,
            sent_unix_ms: 0,
            profiles: (0..40)
                .map(|i| failing(&format!("p{i}"), "oma-a:443"))
                .collect(),
        })
        .await
        .unwrap();
        other
            .heartbeat(Heartbeat {
                seq,
                sent_unix_ms: 0,
                profiles: vec![failing("p7", "oma-a:443")],
            })
            .await
            .unwrap();
    }
    wait_until(
        20,
        "the busy agent's alerts up to its cap, the other's one",
        || async { busy_alerts() >= MAX_ALERTS_PER_AGENT && other_alerts() == 1 },
    )
    .await;
    // p0 recovers: its alert resolves and a held one takes its place, never more than the cap.
    let p0_firing = || {
        c.fleet
            .store
            .alerts(false)
            .unwrap()
            .iter()
            .any(|a| a.subject == "vma-busy/p0")
    };
    assert!(p0_firing(), "p0 is among the first alerts");
    for seq in 3..=4 {
        let mut profiles: Vec<_> = (1..40)
            .map(|i| failing(&format!("p{i}"), "oma-a:443"))
            .collect();
        profiles.push(ProfileReport::new("p0", TunnelState::Up, "oma-a:443"));
        busy.heartbeat(Heartbeat {
            seq,
            sent_unix_ms: 0,
            profiles,
        })
        .await
        .unwrap();
    }
    wait_until(
        20,
        "p0 resolved and a held alert raised in its place",
        || async { !p0_firing() && busy_alerts() == MAX_ALERTS_PER_AGENT },
    )
    .await;
    let held = c
        .fleet
        .store
        .alerts(true)
        .unwrap()
        .iter()
        .filter(|a| a.affected_agents.first().is_some_and(|x| x == "vma-busy"))
        .count();
    assert_eq!(
        held,
        MAX_ALERTS_PER_AGENT + 1,
        "one resolved, the cap firing"
    );
    c.stop().await;
}

/// The next SSH certificate answer on `l`, skipping pushes.
async fn ssh_answer(l: &mut ControlLink) -> tunnelfleet_protocol::SshCert {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), l.next())
            .await
            .unwrap()
            .unwrap()
        {
            CoordinatorMessage::SshCert(answer) => return answer,
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssh_ca_certifies_one_ed25519_key_per_interval_and_nothing_else() {
    use tunnelfleet_protocol::SshCert;
    let dir = tempfile::tempdir().unwrap();
    let c = FullCoordinator::start(dir.path(), Duration::from_millis(300), Vec::new()).await;
    let mut l = connect(&c, dir.path(), "vma-thief").await;
    let refused = |a: &SshCert| matches!(a, SshCert::Refused { .. });
    // Not keys it certifies: garbage, an oversized line, an ECDSA key, the CA's own key.
    let ca_line = std::fs::read_to_string(
        dir.path()
            .join("pki")
            .join(tunnelfleet_coordinator::sshca::SSH_CA_PUB),
    )
    .unwrap();
    for bad in [
        "not a key".to_string(),
        format!("ssh-ed25519 {}", "A".repeat(8192)),
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg= x".to_string(),
        ca_line.trim().to_string(),
    ] {
        l.ssh_cert_request(bad.clone()).await.unwrap();
        let answer = ssh_answer(&mut l).await;
        assert!(refused(&answer), "{bad}: {answer:?}");
    }
    assert!(c.fleet.store.ssh_cert("vma-thief").unwrap().is_none());
    // One key is certified, for this agent only; a second request at once is refused, also
    // for another key, and also on a new connection.
    let key = |seed: u8| {
        russh::keys::PrivateKey::new(
            russh::keys::ssh_key::private::KeypairData::Ed25519(
                russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]),
            ),
            "",
        )
        .unwrap()
        .public_key()
        .to_openssh()
        .unwrap()
    };
    l.ssh_cert_request(key(1)).await.unwrap();
    let SshCert::Granted { certificate } = ssh_answer(&mut l).await else {
        panic!("a good key refused")
    };
    let cert = russh::keys::ssh_key::Certificate::from_openssh(&certificate).unwrap();
    assert_eq!(cert.valid_principals(), ["vma-thief".to_string()]);
    let first = c.fleet.store.ssh_cert("vma-thief").unwrap().unwrap();
    assert_eq!(first.serial, cert.serial());
    l.ssh_cert_request(key(2)).await.unwrap();
    assert!(refused(&ssh_answer(&mut l).await));
    l.close();
    let mut again = connect_with(
        &c,
        &pki::AgentFiles {
            cert: dir.path().join("vma-thief/vma-thief.pem"),
            key: dir.path().join("vma-thief/vma-thief.key"),
            ca: dir.path().join("vma-thief/ca.pem"),
        },
        "vma-thief",
    )
    .await;
    again.ssh_cert_request(key(3)).await.unwrap();
    assert!(refused(&ssh_answer(&mut again).await));
    assert_eq!(c.fleet.store.ssh_cert("vma-thief").unwrap().unwrap(), first);
    c.stop().await;
}
