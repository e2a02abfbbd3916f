//! The control link over real QUIC on loopback with mutual TLS: who gets in, who does not,
//! and that one misbehaving connection never disturbs the others.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use integration_tests::wait_until;
use tokio_util::sync::CancellationToken;
use tunnelfleet_agent::link::{self, LinkError};
use tunnelfleet_coordinator::{link::Links, pki, tls};
use tunnelfleet_protocol::{Heartbeat, Hello, PROTOCOL_VERSION};

struct Coordinator {
    addr: SocketAddr,
    links: Arc<Links>,
    stop: CancellationToken,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn coordinator(pki_dir: &Path) -> Coordinator {
    let cfg = tls::server_config(pki_dir).unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let links = Arc::new(Links::default());
    let stop = CancellationToken::new();
    tokio::spawn(tunnelfleet_coordinator::link::serve(
        endpoint,
        links.clone(),
        Duration::from_secs(5),
        stop.clone(),
    ));
    Coordinator { addr, links, stop }
}

fn hello(id: &str) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: id.into(),
        agent_version: "test".into(),
        labels: [("site".to_string(), "dc1".to_string())].into(),
        applied_version: None,
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
    assert_eq!(l.welcome.heartbeat_interval_ms, 5000);
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
        c.links.get("vma-233").is_some_and(|a| a.heartbeats == 3)
    })
    .await;
    let a = c.links.get("vma-233").unwrap();
    assert_eq!(a.labels.get("site").map(String::as_str), Some("dc1"));
    assert_eq!(a.last_heartbeat.unwrap().seq, 3);
    l.close();
    wait_until(15, "disconnect noticed", || async {
        c.links.connected().is_empty()
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
    assert!(c.links.connected().is_empty());
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
    assert!(c.links.connected().is_empty());
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
                assert_eq!(
                    a.error_code,
                    tunnelfleet_coordinator::link::close::MALFORMED.into()
                );
            }
            other => panic!("{other}"),
        }
    }
    // The well-behaved agent never noticed.
    g.heartbeat(Heartbeat {
        seq: 1,
        sent_unix_ms: 0,
        profiles: vec![],
    })
    .await
    .unwrap();
    wait_until(10, "good agent's heartbeat", || async {
        c.links
            .get("good")
            .is_some_and(|a| a.heartbeats == 1 && a.connected)
    })
    .await;
}
