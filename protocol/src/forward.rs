//! Forward specifications written the way OpenSSH writes them (`-L`, `-R`, `-D`).
//!
//! Operators already know `L [bind:]port:host:hostport`; accepting exactly that syntax means a
//! tunnel moved from a shell script into tunnelfleet reads the same in both places. Parsing is
//! pure so the config loader can reject a bad forward with the exact text that was wrong.

use std::fmt;
use std::net::IpAddr;

/// Where a forward listens when no bind address is given: loopback, never the network.
pub const DEFAULT_BIND: &str = "127.0.0.1";

/// One forward of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardSpec {
    /// `L [bind:]port:host:hostport`: listen here, connect from the SSH server to `host:hostport`.
    Local {
        /// Local address to listen on.
        bind: String,
        /// Local port to listen on.
        port: u16,
        /// Host the server connects to (as seen from the server).
        host: String,
        /// Port the server connects to.
        host_port: u16,
    },
    /// `R [bind:]port:host:hostport`: the server listens, connections come back here to `host:hostport`.
    Remote {
        /// Address the server listens on (`localhost` when not given, as OpenSSH sends).
        bind: String,
        /// Port the server listens on (0 lets the server choose).
        port: u16,
        /// Host this agent connects to for each forwarded connection.
        host: String,
        /// Port this agent connects to.
        host_port: u16,
    },
    /// `D [bind:]port`: a SOCKS5 proxy here whose CONNECTs go out through the server.
    Dynamic {
        /// Local address to listen on.
        bind: String,
        /// Local port to listen on.
        port: u16,
    },
}

/// Why a forward string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("forward {text:?}: {reason}")]
pub struct ForwardParseError {
    /// The text as written.
    pub text: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ForwardSpec {
    /// Parses `L …`, `R …` or `D …` (also accepts `-L`, and `L8082:…` without the space).
    pub fn parse(text: &str) -> Result<Self, ForwardParseError> {
        let err = |reason: &str| ForwardParseError {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = text.trim();
        let trimmed = trimmed.strip_prefix('-').unwrap_or(trimmed);
        let mut chars = trimmed.chars();
        let kind = chars
            .next()
            .ok_or_else(|| err("empty; expected L, R or D"))?;
        let rest = chars.as_str().trim();
        let parts = split_colons(rest).map_err(err)?;
        match kind.to_ascii_uppercase() {
            'L' | 'R' => {
                let (bind, port, host, host_port) = match parts.as_slice() {
                    [port, host, host_port] => (None, port, host, host_port),
                    [bind, port, host, host_port] => (Some(bind.clone()), port, host, host_port),
                    _ => return Err(err("expected [bind:]port:host:hostport")),
                };
                let port = parse_port(port, kind == 'R').map_err(|r| err(&r.to_string()))?;
                let host_port = parse_port(host_port, false).map_err(|r| err(&r.to_string()))?;
                if host.is_empty() {
                    return Err(err("the target host is empty"));
                }
                let bind = normalize_bind(bind, kind == 'R');
                Ok(if kind.eq_ignore_ascii_case(&'L') {
                    ForwardSpec::Local {
                        bind,
                        port,
                        host: host.clone(),
                        host_port,
                    }
                } else {
                    ForwardSpec::Remote {
                        bind,
                        port,
                        host: host.clone(),
                        host_port,
                    }
                })
            }
            'D' => {
                let (bind, port) = match parts.as_slice() {
                    [port] => (None, port),
                    [bind, port] => (Some(bind.clone()), port),
                    _ => return Err(err("expected [bind:]port")),
                };
                let port = parse_port(port, false).map_err(|r| err(&r.to_string()))?;
                Ok(ForwardSpec::Dynamic {
                    bind: normalize_bind(bind, false),
                    port,
                })
            }
            _ => Err(err("expected it to start with L, R or D")),
        }
    }

    /// The local listening address of an L or D forward (`None` for R).
    pub fn local_listen(&self) -> Option<(&str, u16)> {
        match self {
            ForwardSpec::Local { bind, port, .. } | ForwardSpec::Dynamic { bind, port } => {
                Some((bind.as_str(), *port))
            }
            ForwardSpec::Remote { .. } => None,
        }
    }

    /// A short kind letter for tables.
    pub fn kind(&self) -> char {
        match self {
            ForwardSpec::Local { .. } => 'L',
            ForwardSpec::Remote { .. } => 'R',
            ForwardSpec::Dynamic { .. } => 'D',
        }
    }
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardSpec::Local {
                bind,
                port,
                host,
                host_port,
            } => write!(
                f,
                "L {}:{port}:{}:{host_port}",
                bracket(bind),
                bracket(host)
            ),
            ForwardSpec::Remote {
                bind,
                port,
                host,
                host_port,
            } => write!(
                f,
                "R {}:{port}:{}:{host_port}",
                bracket(bind),
                bracket(host)
            ),
            ForwardSpec::Dynamic { bind, port } => write!(f, "D {}:{port}", bracket(bind)),
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// OpenSSH's rules: `*` or an empty bind means every address; none means loopback. For R we send
/// `localhost` like OpenSSH does, which the server binds on loopback only.
fn normalize_bind(bind: Option<String>, remote: bool) -> String {
    match bind.as_deref() {
        None => {
            if remote {
                "localhost".to_string()
            } else {
                DEFAULT_BIND.to_string()
            }
        }
        Some("") | Some("*") => {
            if remote {
                String::new()
            } else {
                "0.0.0.0".to_string()
            }
        }
        Some(b) => b.to_string(),
    }
}

/// Splits on `:` outside `[...]`, so IPv6 literals can be written `[::1]`.
fn split_colons(s: &str) -> Result<Vec<String>, &'static str> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut in_bracket = false;
    for c in s.chars() {
        match c {
            '[' if !in_bracket => in_bracket = true,
            ']' if in_bracket => in_bracket = false,
            ':' if !in_bracket => parts.push(std::mem::take(&mut cur)),
            c if c.is_whitespace() => return Err("unexpected whitespace"),
            c => cur.push(c),
        }
    }
    if in_bracket {
        return Err("unclosed '['");
    }
    parts.push(cur);
    Ok(parts)
}

/// A port as written, or the reason it is not one (the caller adds the forward's text).
fn parse_port(s: &str, zero_ok: bool) -> Result<u16, PortReason> {
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => Err(PortReason::Zero),
        Ok(p) => Ok(p),
        Err(_) => Err(PortReason::NotAPort(s.to_string())),
    }
}

/// Why a port of a forward was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum PortReason {
    /// 0 where the peer cannot choose.
    #[error("port 0 is not allowed here")]
    Zero,
    /// Not 0-65535.
    #[error("{0:?} is not a port (1-65535)")]
    NotAPort(String),
}

/// True when `bind` is a loopback address or name (what "secure by default" means for listeners).
pub fn is_loopback_bind(bind: &str) -> bool {
    bind == "localhost"
        || bind
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn colons_split_outside_brackets_only() {
        let parts = |s: &str| split_colons(s).unwrap();
        assert_eq!(parts("[::1]:22"), ["::1", "22"]);
        // A bracket inside brackets, or a closing one outside, is a character like another
        // (the host check refuses it later, naming it).
        assert_eq!(parts("[a[b]:c"), ["a[b", "c"]);
        assert_eq!(parts("a]b:c"), ["a]b", "c"]);
        assert!(split_colons("a b:c").is_err());
        assert!(split_colons("a\tb").is_err());
        assert!(split_colons("[::1:2").is_err());
    }

    #[test]
    fn each_kind_has_its_letter() {
        for (line, letter) in [
            ("L 8082:localhost:8082", 'L'),
            ("R 9081:localhost:8081", 'R'),
            ("D 1080", 'D'),
        ] {
            assert_eq!(ForwardSpec::parse(line).unwrap().kind(), letter, "{line}");
        }
    }

    #[test]
    fn parses_the_seed_set() {
        let l = ForwardSpec::parse("L 8082:localhost:8082").unwrap();
        assert_eq!(
            l,
            ForwardSpec::Local {
                bind: "127.0.0.1".into(),
                port: 8082,
                host: "localhost".into(),
                host_port: 8082
            }
        );
        let r = ForwardSpec::parse("-R 9081:localhost:8081").unwrap();
        assert_eq!(
            r,
            ForwardSpec::Remote {
                bind: "localhost".into(),
                port: 9081,
                host: "localhost".into(),
                host_port: 8081
            }
        );
        assert_eq!(r.to_string(), "R localhost:9081:localhost:8081");
    }

    #[test]
    fn parses_binds_ipv6_and_dynamic() {
        let l = ForwardSpec::parse("L [::1]:8000:[fe80::1]:80").unwrap();
        assert_eq!(l.local_listen(), Some(("::1", 8000)));
        assert_eq!(l.to_string(), "L [::1]:8000:[fe80::1]:80");
        let d = ForwardSpec::parse("D 1080").unwrap();
        assert_eq!(d.local_listen(), Some(("127.0.0.1", 1080)));
        let d = ForwardSpec::parse("D *:1080").unwrap();
        assert_eq!(d.local_listen(), Some(("0.0.0.0", 1080)));
    }

    #[test]
    fn refuses_bad_forwards_with_a_reason() {
        for (text, why) in [
            ("L 8082:localhost", "expected [bind:]port:host:hostport"),
            ("L 99999:localhost:80", "not a port"),
            ("L 0:localhost:80", "port 0"),
            ("X 1:a:2", "start with L, R or D"),
            ("", "empty"),
            ("D a:b:c", "expected [bind:]port"),
            ("L [::1:80:a:1", "unclosed"),
        ] {
            let e = ForwardSpec::parse(text).unwrap_err();
            assert!(e.to_string().contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn loopback_binds() {
        assert!(is_loopback_bind("127.0.0.1"));
        assert!(is_loopback_bind("::1"));
        assert!(is_loopback_bind("localhost"));
        assert!(!is_loopback_bind("0.0.0.0"));
    }
}
