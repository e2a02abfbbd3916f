//! The control link over real QUIC on loopback with mutual TLS: who gets in, who does not,
//! and that one misbehaving connection never disturbs the others.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::path::Path;
use std::time::Duration;

use integration_tests::{TestCoordinator, wait_until};
use tunnelfleet_agent::link::{self, LinkError};
use tunnelfleet_coordinator::pki;
use tunnelfleet_protocol::{Heartbeat, Hello, PROTOCOL_VERSION};

/// A coordinator with its state in a temp dir that lives as long as it does.
struct Coordinator {
    inner: TestCoordinator,
    _state: tempfile::TempDir,
}

impl std::ops::Deref for Coordinator {
    type Target = TestCoordinator;
    fn deref(&self) -> &TestCoordinator {
        &self.inner
    }
}

async fn coordinator(pki_dir: &Path) -> Coordinator {
    let state = tempfile::tempdir().unwrap();
    Coordinator {
        inner: TestCoordinator::start(pki_dir, state.path(), 0).await,
        _state: state,
    }
}

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

fn client() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

async fn connect(
    c: &Coordinator,
    files: &pki::AgentFiles,
    hello: Hello,
) -> Result<link::ControlLink, LinkError> {
    let cfg = link::client_config(&files.ca, &files.cert, &files.key).unwrap();
    link::connect(&client(), cfg, c.addr, "localhost", hello).await
}

#[tokio::test]
async fn an_agent_with_its_certificate_is_welcomed_and_its_heartbeats_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let fp = pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    assert!(fp.starts_with("SHA256:") && fp.len() == 7 + 64);
    let files = pki::issue_agent(
        &dir.path().join("pki"),
        "vma-233",
        365,
        &dir.path().join("agent"),
    )
    .unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&files.key).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let c = coordinator(&dir.path().join("pki")).await;
    let mut l = connect(&c, &files, hello("vma-233")).await.unwrap();
    assert_eq!(l.welcome.heartbeat_interval_ms, 500);
    for seq in 1..=3 {
        l.heartbeat(Heartbeat {
            seq,
            sent_unix_ms: 0,
            profiles: vec![],
        })
        .await
        .unwrap();
    }
    wait_until(10, "three heartbeats recorded", || async {
        c.fleet
            .links
            .get("vma-233")
            .is_some_and(|a| a.heartbeats == 3)
    })
    .await;
    let a = c.fleet.links.get("vma-233").unwrap();
    assert_eq!(a.labels.get("site").map(String::as_str), Some("dc1"));
    assert_eq!(a.last_heartbeat.unwrap().seq, 3);
    l.close();
    wait_until(15, "disconnect noticed", || async {
        c.fleet.links.connected().is_empty()
    })
    .await;
    // init refuses to replace an existing CA.
    assert!(
        pki::init(&dir.path().join("pki"), &["localhost".into()])
            .unwrap_err()
            .to_string()
            .contains("refusing")
    );
}

#[tokio::test]
async fn certificates_from_another_ca_and_expired_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    pki::init(&dir.path().join("other"), &["localhost".into()]).unwrap();
    let c = coordinator(&dir.path().join("pki")).await;
    // Signed by another CA, but trusting ours (so only the coordinator's check can refuse it).
    let mut foreign = pki::issue_agent(
        &dir.path().join("other"),
        "vma-1",
        365,
        &dir.path().join("foreign"),
    )
    .unwrap();
    foreign.ca = dir.path().join("pki").join(pki::CA_CERT);
    let e = connect(&c, &foreign, hello("vma-1")).await.err().unwrap();
    assert!(matches!(e, LinkError::CertificateRefused { .. }), "{e}");
    let now = time::OffsetDateTime::now_utc();
    let expired = pki::issue_agent_valid(
        &dir.path().join("pki"),
        "vma-2",
        now - time::Duration::days(30),
        now - time::Duration::days(1),
        &dir.path().join("expired"),
    )
    .unwrap();
    let e = connect(&c, &expired, hello("vma-2")).await.err().unwrap();
    assert!(matches!(e, LinkError::CertificateRefused { .. }), "{e}");
    assert!(c.fleet.links.connected().is_empty());
    // The coordinator keeps serving.
    let good = pki::issue_agent(
        &dir.path().join("pki"),
        "vma-3",
        365,
        &dir.path().join("good"),
    )
    .unwrap();
    connect(&c, &good, hello("vma-3")).await.unwrap();
}

#[tokio::test]
async fn a_hello_claiming_another_id_or_version_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let files =
        pki::issue_agent(&dir.path().join("pki"), "vma-7", 365, &dir.path().join("a")).unwrap();
    let c = coordinator(&dir.path().join("pki")).await;
    match connect(&c, &files, hello("vma-8")).await {
        Err(LinkError::Refused { reason, .. }) => {
            assert!(
                reason.contains("\"vma-8\"") && reason.contains("\"vma-7\""),
                "{reason}"
            )
        }
        other => panic!("{:?}", other.err()),
    }
    let mut old = hello("vma-7");
    old.protocol = PROTOCOL_VERSION + 1;
    match connect(&c, &files, old).await {
        Err(LinkError::Refused { reason, .. }) => {
            assert!(reason.contains("version mismatch"), "{reason}")
        }
        other => panic!("{:?}", other.err()),
    }
    assert!(c.fleet.links.connected().is_empty());
    assert!(pki::issue_agent(&dir.path().join("pki"), "bad id/../x", 1, dir.path()).is_err());
}

#[tokio::test]
async fn malformed_frames_close_that_connection_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let good =
        pki::issue_agent(&dir.path().join("pki"), "good", 365, &dir.path().join("g")).unwrap();
    let bad = pki::issue_agent(&dir.path().join("pki"), "bad", 365, &dir.path().join("b")).unwrap();
    let c = coordinator(&dir.path().join("pki")).await;
    let mut g = connect(&c, &good, hello("good")).await.unwrap();
    for junk in [
        vec![0xffu8, 0xff, 0xff, 0xff],
        b"\x00\x00\x00\x05hello".to_vec(),
    ] {
        let cfg = link::client_config(&bad.ca, &bad.cert, &bad.key).unwrap();
        let conn = client()
            .connect_with(cfg, c.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&junk).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .unwrap();
        match closed {
            quinn::ConnectionError::ApplicationClosed(a) => {
                assert_eq!(a.error_code, tunnelfleet_protocol::close::MALFORMED.into());
            }
            other => panic!("{other}"),
        }
    }
    // The well-behaved agent never noticed.
    still_served(&c, &mut g).await;
}

/// The agent `good` on `g` is still connected and its first heartbeat is counted.
async fn still_served(c: &Coordinator, g: &mut link::ControlLink) {
    g.heartbeat(Heartbeat {
        seq: 1,
        sent_unix_ms: 0,
        profiles: vec![],
    })
    .await
    .unwrap();
    wait_until(10, "good agent's heartbeat", || async {
        c.fleet
            .links
            .get("good")
            .is_some_and(|a| a.heartbeats == 1 && a.connected)
    })
    .await;
}

async fn expect_push(l: &mut link::ControlLink) -> tunnelfleet_protocol::ProfileSet {
    match tokio::time::timeout(Duration::from_secs(10), l.next())
        .await
        .unwrap()
        .unwrap()
    {
        tunnelfleet_protocol::CoordinatorMessage::Push(set) => set,
        other => panic!("expected a push, got {other:?}"),
    }
}

#[tokio::test]
async fn a_profile_change_reaches_every_assigned_agent_and_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::init(&pki_dir, &["localhost".into()]).unwrap();
    let c = coordinator(&pki_dir).await;
    let mut agents = Vec::new();
    for (id, site) in [("dc1-a", "dc1"), ("dc1-b", "dc1"), ("dc2-a", "dc2")] {
        let files = pki::issue_agent(&pki_dir, id, 365, &dir.path().join(id)).unwrap();
        let mut h = hello(id);
        h.labels = [("site".to_string(), site.to_string())].into();
        let mut l = connect(&c, &files, h).await.unwrap();
        // On connect every agent learns its current set (empty so far).
        assert!(expect_push(&mut l).await.profiles.is_empty());
        agents.push((id, files, l));
    }
    let v = integration_tests::assign_to_site(
        &c.fleet,
        &integration_tests::profile_spec("oma", &["L 8082:localhost:8082"]),
        "dc1",
    )
    .await;
    // Every agent gets every version; dc2's set is empty.
    assert_eq!(
        c.fleet.push_changed().unwrap(),
        vec!["dc1-a", "dc1-b", "dc2-a"]
    );
    // Nothing changed since: nothing is pushed again.
    assert!(c.fleet.push_changed().unwrap().is_empty());
    // dc2's push is read too: the new version, with nothing in it for dc2.
    let (_, _, dc2) = agents.iter_mut().find(|(id, _, _)| *id == "dc2-a").unwrap();
    let set = expect_push(dc2).await;
    assert_eq!(set.version, v, "dc2-a got another version");
    assert!(set.profiles.is_empty(), "dc2-a got dc1's profile: {set:?}");
    for (id, _, l) in agents.iter_mut().filter(|(id, _, _)| id.starts_with("dc1")) {
        let set = expect_push(l).await;
        assert_eq!((set.version, set.profiles.len()), (v, 1), "{id}");
        l.applied(tunnelfleet_protocol::Applied {
            version: set.version,
            ok: true,
            results: vec![tunnelfleet_protocol::ForwardResult {
                profile: "oma".into(),
                forward: "L 8082:localhost:8082".into(),
                ok: true,
                detail: "bound".into(),
            }],
        })
        .await
        .unwrap();
    }
    wait_until(10, "both dc1 agents acknowledged the version", || async {
        ["dc1-a", "dc1-b"].iter().all(|id| {
            c.fleet
                .store
                .agent(id)
                .unwrap()
                .is_some_and(|r| r.applied_version == Some(v) && r.applied_ok)
        })
    })
    .await;
    assert_eq!(
        c.fleet
            .store
            .agent("dc2-a")
            .unwrap()
            .unwrap()
            .applied_version,
        None
    );

    // An agent that was offline during the change gets it when it connects.
    let late = pki::issue_agent(&pki_dir, "dc1-late", 365, &dir.path().join("late")).unwrap();
    let mut h = hello("dc1-late");
    h.labels = [("site".to_string(), "dc1".to_string())].into();
    let mut l = connect(&c, &late, h).await.unwrap();
    let set = expect_push(&mut l).await;
    assert_eq!(set.profiles[0].name, "oma");
}

#[tokio::test]
async fn a_client_without_a_certificate_gets_no_control_link() {
    use quinn::rustls::pki_types::{CertificateDer, pem::PemObject};
    // The server allows a handshake without a client certificate (new agents enroll that
    // way); the control link must still refuse such a connection before reading a byte.
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let c = coordinator(&dir.path().join("pki")).await;
    let mut roots = quinn::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(dir.path().join("pki").join(pki::CA_CERT)).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(quinn::rustls::crypto::ring::default_provider());
    let mut tls = quinn::rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tunnelfleet_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let conn = client()
        .connect_with(
            quinn::ClientConfig::new(std::sync::Arc::new(quic)),
            c.addr,
            "localhost",
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let frame =
        tunnelfleet_protocol::encode(&tunnelfleet_protocol::AgentMessage::Hello(hello("vma-1")))
            .unwrap();
    let _ = send.write_all(&frame).await;
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code,
                tunnelfleet_protocol::close::REFUSED.into()
            );
            assert_eq!(&close.reason[..], b"no client certificate");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(c.fleet.links.connected().is_empty());
}

/// bincode's serde path does not charge sequence elements to the frame limit: 50,000 empty
/// profile reports fit in one frame and its limit (about 0.6 MB on the wire) and decode to about
/// 15 MB, held under the fleet's lock; 300,000 trip bincode's own limit. Both are bounded while
/// decoding (at most 256 profiles): that link is closed as malformed, its heartbeat never
/// counted, and no other link notices.
#[tokio::test]
async fn a_heartbeat_of_300000_empty_reports_closes_that_link_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let issue = |id: &str| {
        pki::issue_agent(&dir.path().join("pki"), id, 365, &dir.path().join(id)).unwrap()
    };
    let c = coordinator(&dir.path().join("pki")).await;
    let mut g = connect(&c, &issue("good"), hello("good")).await.unwrap();
    let empty =
        tunnelfleet_protocol::ProfileReport::new("", tunnelfleet_protocol::TunnelState::Up, "");
    for (id, n) in [("bad-300k", 300_000), ("bad-50k", 50_000), ("bad-257", 257)] {
        let mut b = connect(&c, &issue(id), hello(id)).await.unwrap();
        let hb = Heartbeat {
            seq: 1,
            sent_unix_ms: 0,
            profiles: vec![empty.clone(); n],
        };
        let frame = tunnelfleet_protocol::encode(&tunnelfleet_protocol::AgentMessage::Heartbeat(
            hb.clone(),
        ))
        .unwrap();
        assert!(frame.len() < tunnelfleet_protocol::MAX_FRAME_LEN as usize);
        b.heartbeat(hb).await.unwrap();
        wait_until(10, &format!("the hostile link {id} closed"), || async {
            !c.fleet.links.get(id).is_some_and(|a| a.connected)
        })
        .await;
        assert!(
            c.fleet
                .links
                .get(id)
                .is_none_or(|a| a.heartbeats == 0 && a.last_heartbeat.is_none()),
            "{id}: the oversized heartbeat was taken"
        );
        // The push of its (empty) set on connect may still arrive; then the refusal.
        let mut next = b.next().await;
        if let Ok(tunnelfleet_protocol::CoordinatorMessage::Push(_)) = next {
            next = b.next().await;
        }
        match next {
            Err(LinkError::Refused { reason, .. }) => {
                assert!(reason.starts_with("malformed message"), "{id}: {reason}")
            }
            other => panic!("{id}: the hostile link still answers: {other:?}"),
        }
    }
    still_served(&c, &mut g).await;
}
