//! The admin API on a network (`admin_tls = true`): the real coordinator serves it over TLS with
//! its certificate from the fleet PKI; the CLI reaches it over `https://` checked against the
//! fleet CA; a client trusting another CA is refused in the handshake, and a plain-HTTP request
//! (a token in clear) gets no answer.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::process::Command;

use integration_tests::{CoordinatorProcess, Program};
use tunnelfleet_coordinator::pki;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_over_tls_with_the_fleet_ca() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    // `start_with` sees `admin_tls` and waits on it over https with the fleet CA.
    let c = CoordinatorProcess::start_with(dir.path(), "500ms", "admin_tls = true\n").await;
    let agents: serde_json::Value = c.api.get("/v1/agents").await.unwrap();
    assert!(agents.as_array().is_some(), "{agents}");

    // The CLI, as an operator on another machine would run it.
    let url = format!("https://localhost:{}", c.admin.port());
    let cli_at = |url: &str, ca: Option<&std::path::Path>| {
        let mut cmd = Command::new(Program::Cli.path());
        cmd.args([
            "token",
            "create",
            "--json",
            "--coordinator",
            url,
            "--token-file",
        ])
        .arg(&c.token_file);
        if let Some(ca) = ca {
            cmd.arg("--ca-file").arg(ca);
        }
        cmd.env_remove("TUNNELFLEET_CA_FILE").output().unwrap()
    };
    let cli = |ca: Option<&std::path::Path>| cli_at(&url, ca);
    let o = cli(Some(&dir.path().join("pki/ca.pem")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(t["token"].as_str().unwrap().starts_with("tfj_"), "{t}");

    // Several coordinators: the first that takes the connection answers; when none does,
    // the error names each.
    let dead = integration_tests::free_port();
    let several = format!("https://localhost:{dead},{url}");
    let o = cli_at(&several, Some(&dir.path().join("pki/ca.pem")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dead2 = integration_tests::free_port();
    let none = format!("https://localhost:{dead},https://localhost:{dead2}");
    let o = cli_at(&none, Some(&dir.path().join("pki/ca.pem")));
    assert_eq!(o.status.code(), Some(3), "unreachable");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("localhost:{dead}:")) && err.contains(&format!("localhost:{dead2}:")),
        "{err}"
    );

    // Without the CA it says what is missing; with another CA the handshake fails.
    let o = cli(None);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--ca-file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    pki::init(&dir.path().join("other"), &["localhost".into()]).unwrap();
    let o = cli(Some(&dir.path().join("other/ca.pem")));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TLS: invalid peer certificate"), "{err}");

    // Plain HTTP with the token to the TLS port: no HTTP answer, nothing done.
    let plain = tunnelfleet_ops::api::ApiClient::new(
        &c.admin.to_string(),
        "integration-test-admin-token-0123456789",
    );
    let before: serde_json::Value = c.api.get("/v1/tokens").await.unwrap();
    let r = plain
        .call::<_, serde_json::Value>(
            "POST",
            "/v1/tokens",
            Some(&serde_json::json!({ "ttl_s": 60 })),
        )
        .await;
    assert!(r.is_err(), "{r:?}");
    let after: serde_json::Value = c.api.get("/v1/tokens").await.unwrap();
    assert_eq!(before, after);
}

/// With TLS, an admin API off loopback starts (no plaintext consent needed).
#[tokio::test]
async fn admin_tls_may_listen_on_the_network() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let token = dir.path().join("admin.token");
    integration_tests::write_secret(&token, b"0123456789abcdef0123");
    let path = dir.path().join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\nadmin_tls = true\npki_dir = \"{0}/pki\"\nstate_dir = \"{0}/state\"\nadmin_token_file = \"{1}\"\n",
            dir.path().display(),
            token.display()
        ),
    )
    .unwrap();
    let cfg = tunnelfleet_coordinator::server::CoordinatorConfig::load(&path).unwrap();
    let bound = tunnelfleet_coordinator::server::bind(&cfg).await.unwrap();
    assert!(!bound.admin.ip().is_loopback());
}

/// Opens `n` connections to `to` from `from` (any 127/8 address is loopback) and sends nothing.
async fn idle_connections(
    from: &str,
    to: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        out.push(s.connect(to).await.unwrap());
    }
    out
}

/// How many of `conns` the server has closed (EOF or reset on a read that does not wait).
fn closed_by_server(conns: &[tokio::net::TcpStream]) -> usize {
    let mut buf = [0u8; 64];
    conns
        .iter()
        .filter(|c| match c.try_read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        })
        .count()
}

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A flood of idle connections from one address, to the admin API over TLS and to `/metrics`,
/// holds a bounded number of the coordinator's descriptors (64 and 16 from one address; the
/// rest are closed as soon as accepted), the API and `/metrics` still answer others at once,
/// and the held ones are closed by the coordinator when their time is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_holds_bounded_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(&dir.path().join("pki"), &["localhost".into()]).unwrap();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], integration_tests::free_port()));
    let c = CoordinatorProcess::start_with(
        dir.path(),
        "500ms",
        &format!("admin_tls = true\nmetrics_listen = \"{metrics}\"\n"),
    )
    .await;
    let before = open_descriptors(c.pid());
    let admin_flood = idle_connections("127.0.0.2", c.admin, 300).await;
    let metrics_flood = idle_connections("127.0.0.2", metrics, 100).await;
    integration_tests::wait_until(
        30,
        "all but 64 admin and 16 metrics connections closed at once",
        || async {
            closed_by_server(&admin_flood) == 300 - 64
                && closed_by_server(&metrics_flood) == 100 - 16
        },
    )
    .await;
    let during = open_descriptors(c.pid());
    assert!(
        during <= before + 64 + 16 + 8,
        "{during} descriptors open during the flood, {before} before"
    );
    // Others are served at once.
    let agents: serde_json::Value = c.api.get("/v1/agents").await.unwrap();
    assert!(agents.as_array().is_some(), "{agents}");
    let scrape = plain_get(metrics).await;
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("tunnelfleet_"), "{scrape}");
    // The held ones are closed by the coordinator (handshake and head limits), not the client.
    integration_tests::wait_until(
        60,
        "every idle connection closed by the coordinator",
        || async {
            closed_by_server(&admin_flood) == 300 && closed_by_server(&metrics_flood) == 100
        },
    )
    .await;
    assert!(open_descriptors(c.pid()) <= before + 8);
}

/// `GET /metrics` over a plain socket; the whole answer.
async fn plain_get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
