//! `tunnelfleet net`: checks against a real sshd, a real listener, a closed port, DNS that
//! resolves and DNS that cannot; bandwidth through a real tunnel.

#![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

use std::time::Duration;

use integration_tests::*;
use tunnelfleet_ops::net::{self, CheckOptions, PortState};

fn opts(ports: Vec<u16>, ssh_ports: Vec<u16>) -> CheckOptions {
    CheckOptions {
        ports,
        ssh_ports,
        probes: 2,
        timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn an_sshd_endpoint_and_an_open_port_pass_with_the_banner() {
    if !Sshd::available("net_check_sshd") {
        return;
    }
    let sshd = Sshd::start();
    let api = http_service("api").await;
    let r = net::check(&sshd.endpoint(), &opts(vec![api.port], vec![])).await;
    assert!(r.ok, "{}", net::render(std::slice::from_ref(&r)));
    assert!(r.dns.ok && r.dns.addresses == vec![std::net::IpAddr::from([127, 0, 0, 1])]);
    assert_eq!(r.reachability.received, 2);
    let ssh = r.ports.iter().find(|p| p.port == sshd.port).unwrap();
    assert!(
        ssh.banner
            .as_deref()
            .unwrap()
            .starts_with("SSH-2.0-OpenSSH"),
        "{ssh:?}"
    );
    let http = r.ports.iter().find(|p| p.port == api.port).unwrap();
    assert_eq!((http.state, http.ssh), (PortState::Open, false));
}

#[tokio::test]
async fn a_closed_port_and_a_port_without_an_ssh_banner_fail() {
    let api = http_service("api").await;
    let closed = free_port();
    let r = net::check("localhost", &opts(vec![closed], vec![api.port])).await;
    assert!(!r.ok);
    assert!(r.dns.ok);
    let c = r.ports.iter().find(|p| p.port == closed).unwrap();
    assert_eq!(c.state, PortState::Closed);
    let h = r.ports.iter().find(|p| p.port == api.port).unwrap();
    assert_eq!(h.state, PortState::Open);
    assert!(
        h.banner.is_none() && h.error.as_deref().unwrap().contains("no SSH banner"),
        "{h:?}"
    );
    let text = net::render(&[r]);
    assert!(
        text.contains(&format!("tcp/{closed}")) && text.contains("CLOSED"),
        "{text}"
    );
}

#[tokio::test]
async fn a_name_that_cannot_resolve_fails_with_the_reason() {
    // .invalid is reserved (RFC 2606): it never resolves, and nothing is sent anywhere.
    let r = net::check("no-such-host.invalid", &opts(vec![22], vec![])).await;
    assert!(!r.ok && !r.dns.ok);
    assert!(r.dns.error.is_some());
    assert!(r.ports.is_empty());
    assert_eq!(r.reachability.received, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_is_measured_through_the_tunnel_and_other_ports_are_refused() {
    if !Sshd::available("net_bandwidth") {
        return;
    }
    let sshd = Sshd::start();
    let api = http_service("api").await;
    let l = free_port();
    let agent = TestAgent::on(&sshd, &[format!("L {l}:localhost:{}", api.port)], "").await;
    agent.wait_all_active("oma").await;
    let url = format!("http://127.0.0.1:{l}/bytes/20000000");
    let r = net::bandwidth(&agent.socket, "oma", Some(&url), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(r.bytes, 20_000_000);
    assert!(r.tunnel_bytes_in >= r.bytes, "{r:?}");
    assert!(r.mbit_s > 0.0);
    // A URL that bypasses the tunnel is refused, naming the port.
    let direct = format!("http://127.0.0.1:{}/bytes/10", api.port);
    let err = net::bandwidth(&agent.socket, "oma", Some(&direct), Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("port {} ", api.port)) && err.contains("not a local forward"),
        "{err}"
    );
    // No URL and no HTTP health check: say what to do.
    let err = net::bandwidth(&agent.socket, "oma", None, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("pass --url"), "{err}");
    agent.shutdown().await;
}
