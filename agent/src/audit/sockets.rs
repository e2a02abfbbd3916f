//! Listening TCP sockets, from /proc/net/tcp{,6}, and which are bound beyond loopback.
//!
//! Read from /proc rather than running `ss`, so the audit needs no extra package and the
//! parser is tested on real kernel output.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::{Finding, Severity};

/// A listening socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// Bound address.
    pub addr: IpAddr,
    /// The TCP port it listens on.
    pub port: u16,
    /// Socket inode (to find the process).
    pub inode: u64,
    /// The owning process, when /proc lets us see it.
    pub process: Option<String>,
}

/// Every listening TCP socket on this host.
pub fn listeners() -> std::io::Result<Vec<Listener>> {
    let mut v = parse_proc_net_tcp(&std::fs::read_to_string("/proc/net/tcp")?, false);
    if let Ok(t6) = std::fs::read_to_string("/proc/net/tcp6") {
        v.extend(parse_proc_net_tcp(&t6, true));
    }
    let owners = socket_owners();
    for l in &mut v {
        l.process = owners.get(&l.inode).cloned();
    }
    Ok(v)
}

/// Parses /proc/net/tcp (or tcp6 with `v6`): the sockets in state 0A (LISTEN).
pub fn parse_proc_net_tcp(text: &str, v6: bool) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((addr_hex, port_hex)) = f[1].split_once(':') else {
            continue;
        };
        let (Some(addr), Ok(port), Ok(inode)) = (
            parse_addr(addr_hex, v6),
            u16::from_str_radix(port_hex, 16),
            f[9].parse::<u64>(),
        ) else {
            continue;
        };
        out.push(Listener {
            addr,
            port,
            inode,
            process: None,
        });
    }
    out
}

/// The kernel prints each 32-bit word of the address in host (little-endian) order.
fn parse_addr(hex: &str, v6: bool) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    if !v6 {
        return Some(IpAddr::V4(Ipv4Addr::from(words.first()?.to_le_bytes())));
    }
    let mut bytes = [0u8; 16];
    for (i, w) in words.iter().enumerate().take(4) {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// socket inode → `name[pid]`, from /proc/*/fd (only the processes we may inspect).
fn socket_owners() -> HashMap<u64, String> {
    let mut map = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return map;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let name = std::fs::read_to_string(p.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']'))
                    && let Ok(inode) = inode.parse()
                {
                    map.insert(inode, format!("{name}[{pid}]"));
                }
            }
        }
    }
    map
}

fn loopback(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_loopback(),
        // ::ffff:127.0.0.1 is loopback too.
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|m| m.is_loopback()),
    }
}

/// One finding per socket bound beyond loopback (Low; Info for SSH's own port 22).
pub fn audit(listeners: &[Listener]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for l in listeners.iter().filter(|l| !loopback(&l.addr)) {
        if !seen.insert((l.addr, l.port)) {
            continue;
        }
        let who = l
            .process
            .clone()
            .unwrap_or_else(|| "unknown process".into());
        let any = l.addr.is_unspecified();
        let (sev, title) = if l.port == 22 {
            (
                Severity::Info,
                format!(
                    "SSH listening on {}",
                    if any {
                        "every address"
                    } else {
                        "a network address"
                    }
                ),
            )
        } else {
            (
                Severity::Low,
                format!("port {} listening beyond loopback", l.port),
            )
        };
        out.push(Finding::new(
            "socket.exposed",
            sev,
            title,
            format!("{}:{} ({who})", l.addr, l.port),
            format!("bind it to 127.0.0.1 if only local clients (or tunnels) need port {}, or firewall it", l.port),
        ));
    }
    out
}
