//! `tunnelfleet net`: the network checks of seed 004's `check_network_health.sh`, as data.
//!
//! For each host: DNS (every address, time, failure reason), reachability and latency over N
//! probes (ICMP echo when the process may send it, otherwise TCP connect timing, and the report
//! says which), TCP port checks, and the SSH banner on SSH ports. Results are values so the CLI
//! can print a table or JSON and derive the exit code from `ok`.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

mod bandwidth;
pub use bandwidth::{BandwidthError, BandwidthReport, bandwidth};

/// What to check on every host.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// TCP ports that must accept a connection.
    pub ports: Vec<u16>,
    /// Ports that must accept and greet with an SSH banner.
    pub ssh_ports: Vec<u16>,
    /// Latency probes.
    pub probes: u32,
    /// Deadline per probe, connect and banner read.
    pub timeout: Duration,
}

/// DNS outcome.
#[derive(Debug, Clone, Serialize)]
pub struct DnsResult {
    /// Whether the name resolved to at least one address.
    pub ok: bool,
    /// Every address returned.
    pub addresses: Vec<IpAddr>,
    /// Time taken, ms.
    pub ms: f64,
    /// Why it failed.
    pub error: Option<String>,
}

/// Reachability and latency.
#[derive(Debug, Clone, Serialize)]
pub struct Reachability {
    /// `icmp`, or `tcp:PORT` when ICMP is not permitted to this process.
    pub method: String,
    /// Probes sent.
    pub sent: u32,
    /// Probes answered.
    pub received: u32,
    /// Loss in percent.
    pub loss_pct: f64,
    /// Fastest answer, ms.
    pub min_ms: Option<f64>,
    /// Mean answer, ms.
    pub avg_ms: Option<f64>,
    /// Slowest answer, ms.
    pub max_ms: Option<f64>,
    /// Why probing could not run at all.
    pub error: Option<String>,
}

impl Reachability {
    /// No probe could be sent at all, and why.
    fn unavailable(error: String) -> Self {
        Reachability {
            method: "none".into(),
            sent: 0,
            received: 0,
            loss_pct: 100.0,
            min_ms: None,
            avg_ms: None,
            max_ms: None,
            error: Some(error),
        }
    }
}

/// A TCP port's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortState {
    /// The connection was accepted.
    Open,
    /// Refused (RST).
    Closed,
    /// No answer within the timeout (filtered or host down).
    Timeout,
    /// Another error (unreachable network, …).
    Error,
}

/// One port check.
#[derive(Debug, Clone, Serialize)]
pub struct PortResult {
    /// The port.
    pub port: u16,
    /// Its state.
    pub state: PortState,
    /// Connect time, ms (when open).
    pub connect_ms: Option<f64>,
    /// An SSH banner is expected here.
    pub ssh: bool,
    /// The banner line, when one arrived.
    pub banner: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// Everything about one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// The target as given.
    pub target: String,
    /// How the host name resolved.
    pub dns: DnsResult,
    /// ICMP and TCP reachability of its addresses.
    pub reachability: Reachability,
    /// Each port checked, in order.
    pub ports: Vec<PortResult>,
    /// Every check passed.
    pub ok: bool,
}

/// Checks one target: `host` or `host:port` (a port in the target is an SSH port, as in
/// a profile's endpoints).
pub async fn check(target: &str, opts: &CheckOptions) -> HostReport {
    let (host, target_port) = match tunnelfleet_protocol::addr::split_host_port(target, Some(0)) {
        Ok((h, p)) => (h, (p != 0).then_some(p)),
        Err(_) => (target.to_string(), None),
    };
    let mut ssh_ports = opts.ssh_ports.clone();
    ssh_ports.extend(target_port);
    let dns = resolve(&host, opts.timeout).await;
    let mut all: Vec<(u16, bool)> = opts.ports.iter().map(|&p| (p, false)).collect();
    for p in &ssh_ports {
        all.retain(|(q, _)| q != p);
        all.push((*p, true));
    }
    all.sort();
    all.dedup();
    let (ports, answered) = check_ports(&dns.addresses, &all, opts.timeout).await;
    let addr = answered.or(dns.addresses.first().copied());
    let tcp_port = ports
        .iter()
        .find(|p| p.state == PortState::Open)
        .map(|p| p.port);
    let reachability = match addr {
        Some(ip) => reach(ip, tcp_port, opts.probes, opts.timeout).await,
        None => Reachability::unavailable("not resolved".into()),
    };
    let ok = dns.ok
        && reachability.received > 0
        && ports
            .iter()
            .all(|p| p.state == PortState::Open && (!p.ssh || p.banner.is_some()));
    HostReport {
        target: target.to_string(),
        dns,
        reachability,
        ports,
        ok,
    }
}

/// Each port on the host's addresses in the order they resolved, as ssh connects: a port is
/// open when one address answers on it (`localhost` is often `::1` first, and a service may
/// listen on `127.0.0.1` only); else the first address's failure stands. Also returns the
/// first address that answered.
async fn check_ports(
    addrs: &[IpAddr],
    ports: &[(u16, bool)],
    timeout: Duration,
) -> (Vec<PortResult>, Option<IpAddr>) {
    let mut results = Vec::new();
    let mut answered = None;
    for &(port, ssh) in ports {
        let mut result: Option<PortResult> = None;
        for &ip in addrs {
            let r = check_port(SocketAddr::new(ip, port), ssh, timeout).await;
            if r.state == PortState::Open {
                answered.get_or_insert(ip);
                result = Some(r);
                break;
            }
            result.get_or_insert(r);
        }
        results.extend(result);
    }
    (results, answered)
}

async fn resolve(host: &str, timeout: Duration) -> DnsResult {
    let start = Instant::now();
    let res = tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0))).await;
    let ms = ms(start.elapsed());
    match res {
        Ok(Ok(addrs)) => {
            let mut addresses: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
            addresses.dedup();
            DnsResult {
                ok: !addresses.is_empty(),
                error: addresses.is_empty().then(|| "no addresses".to_string()),
                addresses,
                ms,
            }
        }
        Ok(Err(e)) => DnsResult {
            ok: false,
            addresses: vec![],
            ms,
            error: Some(e.to_string()),
        },
        Err(_) => DnsResult {
            ok: false,
            addresses: vec![],
            ms,
            error: Some(format!("no answer within {timeout:?}")),
        },
    }
}

async fn check_port(addr: SocketAddr, ssh: bool, timeout: Duration) -> PortResult {
    let start = Instant::now();
    let mut r = PortResult {
        port: addr.port(),
        state: PortState::Open,
        connect_ms: None,
        ssh,
        banner: None,
        error: None,
    };
    let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            r.state = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                PortState::Closed
            } else {
                PortState::Error
            };
            r.error = Some(e.to_string());
            return r;
        }
        Err(_) => {
            r.state = PortState::Timeout;
            r.error = Some(format!("no answer within {timeout:?}"));
            return r;
        }
    };
    r.connect_ms = Some(ms(start.elapsed()));
    if ssh {
        match read_banner(&mut stream, timeout).await {
            Ok(b) if b.starts_with("SSH-") => r.banner = Some(b),
            Ok(b) => r.error = Some(format!("not an SSH banner: {b:?}")),
            Err(e) => r.error = Some(format!("no SSH banner: {e}")),
        }
    }
    r
}

/// The server's identification line within `timeout`.
async fn read_banner(s: &mut TcpStream, timeout: Duration) -> std::io::Result<String> {
    tokio::time::timeout(timeout, tunnelfleet_runtime::banner::read_banner(s))
        .await
        .map_err(|_| std::io::Error::other(format!("nothing within {timeout:?}")))?
}

async fn reach(ip: IpAddr, tcp_port: Option<u16>, probes: u32, timeout: Duration) -> Reachability {
    let kind = if ip.is_ipv4() {
        surge_ping::ICMP::V4
    } else {
        surge_ping::ICMP::V6
    };
    let client = surge_ping::Client::new(&surge_ping::Config::builder().kind(kind).build());
    let mut samples = Vec::new();
    let method;
    let mut sent = 0;
    match client {
        Ok(client) => {
            method = "icmp".to_string();
            let mut pinger = client
                .pinger(ip, surge_ping::PingIdentifier(rand::random()))
                .await;
            pinger.timeout(timeout);
            for seq in 0..probes {
                sent += 1;
                if let Ok((_, rtt)) = pinger
                    .ping(surge_ping::PingSequence(seq as u16), &[0u8; 32])
                    .await
                {
                    samples.push(ms(rtt));
                }
                pause_between(seq, probes).await;
            }
        }
        Err(icmp_err) => {
            let Some(port) = tcp_port else {
                return Reachability::unavailable(format!(
                    "ICMP not permitted ({icmp_err}) and no open port to time a TCP connect"
                ));
            };
            method = format!("tcp:{port}");
            for seq in 0..probes {
                sent += 1;
                let start = Instant::now();
                if let Ok(Ok(_)) =
                    tokio::time::timeout(timeout, TcpStream::connect(SocketAddr::new(ip, port)))
                        .await
                {
                    samples.push(ms(start.elapsed()));
                }
                pause_between(seq, probes).await;
            }
        }
    }
    let received = samples.len() as u32;
    let (min, max, avg) = if samples.is_empty() {
        (None, None, None)
    } else {
        let sum: f64 = samples.iter().sum();
        (
            samples.iter().copied().reduce(f64::min),
            samples.iter().copied().reduce(f64::max),
            Some(sum / samples.len() as f64),
        )
    };
    Reachability {
        method,
        sent,
        received,
        loss_pct: if sent == 0 {
            100.0
        } else {
            100.0 * f64::from(sent - received) / f64::from(sent)
        },
        min_ms: min,
        avg_ms: avg,
        max_ms: max,
        error: None,
    }
}

async fn pause_between(seq: u32, probes: u32) {
    if seq + 1 < probes {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Human report of several hosts.
pub fn render(reports: &[HostReport]) -> String {
    let mut out = String::new();
    for r in reports {
        out.push_str(&format!(
            "{}  {}\n",
            r.target,
            if r.ok { "OK" } else { "FAILED" }
        ));
        if r.dns.ok {
            let addrs: Vec<String> = r.dns.addresses.iter().map(|a| a.to_string()).collect();
            out.push_str(&format!(
                "  dns      {} ({:.1} ms)\n",
                addrs.join(", "),
                r.dns.ms
            ));
        } else {
            out.push_str(&format!(
                "  dns      FAILED: {} ({:.1} ms)\n",
                r.dns.error.as_deref().unwrap_or("?"),
                r.dns.ms
            ));
        }
        let re = &r.reachability;
        match (re.min_ms, re.avg_ms, re.max_ms) {
            (Some(min), Some(avg), Some(max)) => out.push_str(&format!(
                "  latency  {}: {}/{} answered, {:.0}% loss, min/avg/max {min:.2}/{avg:.2}/{max:.2} ms\n",
                re.method, re.received, re.sent, re.loss_pct
            )),
            _ => out.push_str(&format!(
                "  latency  {}: {}\n",
                re.method,
                re.error.clone().unwrap_or_else(|| format!("0/{} answered, 100% loss", re.sent))
            )),
        }
        for p in &r.ports {
            let state = match p.state {
                PortState::Open => "open",
                PortState::Closed => "CLOSED",
                PortState::Timeout => "TIMEOUT",
                PortState::Error => "ERROR",
            };
            let mut line = format!("  tcp/{:<5} {state}", p.port);
            if let Some(c) = p.connect_ms {
                line.push_str(&format!(" ({c:.2} ms)"));
            }
            if let Some(b) = &p.banner {
                line.push_str(&format!("  banner {b:?}"));
            }
            if let Some(e) = &p.error {
                line.push_str(&format!("  {e}"));
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[tokio::test]
    async fn a_port_answering_on_the_second_address_is_open() {
        // `localhost` as a fresh Debian resolves it: ::1 first, then 127.0.0.1.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let addrs: [IpAddr; 2] = ["::1".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let timeout = Duration::from_secs(2);
        let (ports, answered) = check_ports(&addrs, &[(port, false)], timeout).await;
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].state, PortState::Open, "{:?}", ports[0]);
        assert_eq!(answered, Some(addrs[1]));
        // Nobody on either: not open, and no address answered.
        drop(listener);
        let (ports, answered) = check_ports(&addrs, &[(port, false)], timeout).await;
        assert_ne!(ports[0].state, PortState::Open);
        assert_eq!(answered, None);
    }
}
