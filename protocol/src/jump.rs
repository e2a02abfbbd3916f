//! Jump hosts (OpenSSH's `ProxyJump`, `ssh -J`): a profile's `jump = ["user@bastion:22"]` reaches
//! its endpoints through one or more SSH hosts, each hop a `direct-tcpip` channel of the one
//! before, the way appliances behind a bastion reach their OMA.
//!
//! This module parses and prints a hop; the agent's `jump` module opens the chain. Every hop's host key
//! is verified with the profile's trust (known_hosts or pinned fingerprints), as the endpoint's
//! is, and a hop's failure is reported as the path's problem (`ErrorKind::Jump`), not the
//! endpoint's, so the coordinator does not fail over an OMA because a bastion is down.

use std::fmt;

use crate::addr::{AddrError, join_host_port, split_host_port};

/// Why a jump host was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JumpError {
    /// Nothing was written.
    #[error("empty jump host (expected [user@]host[:port])")]
    Empty,
    /// `@host`.
    #[error("{0:?}: empty user before '@'")]
    EmptyUser(String),
    /// The host part is not an address.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// Several hops in one entry, or a path.
    #[error("{0:?}: not a host name (one hop per list entry: jump = [\"a\", \"b\"])")]
    NotAHost(String),
}

/// One jump host: `[user@]host[:port]` (or `ssh://[user@]host[:port]`), port 22 by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpHost {
    /// Login on the jump host; the profile's user when absent (as OpenSSH does).
    pub user: Option<String>,
    /// Host name or address (IPv6 in brackets when a port follows).
    pub host: String,
    /// SSH port.
    pub port: u16,
}

impl JumpHost {
    /// Parses one hop as `ssh -J` writes it.
    pub fn parse(text: &str) -> Result<JumpHost, JumpError> {
        let t = text.trim();
        let t = t.strip_prefix("ssh://").unwrap_or(t);
        if t.is_empty() {
            return Err(JumpError::Empty);
        }
        let (user, rest) = match t.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(JumpError::EmptyUser(text.into())),
            None => (None, t),
        };
        let (host, port) = split_host_port(rest, Some(22))?;
        if host.contains(['/', ' ', ',']) {
            return Err(JumpError::NotAHost(text.into()));
        }
        Ok(JumpHost { user, host, port })
    }

    /// `host:port`, as endpoints are written (logs, errors, known_hosts lookups).
    pub fn endpoint(&self) -> String {
        join_host_port(&self.host, self.port)
    }
}

impl fmt::Display for JumpHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.endpoint())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn hops_as_ssh_j_writes_them() {
        let h = JumpHost::parse("ops@bastion.example:2222").unwrap();
        assert_eq!(
            h,
            JumpHost {
                user: Some("ops".into()),
                host: "bastion.example".into(),
                port: 2222
            }
        );
        assert_eq!(h.to_string(), "ops@bastion.example:2222");
        let h = JumpHost::parse("bastion").unwrap();
        assert_eq!((h.user, h.port), (None, 22));
        let h = JumpHost::parse("ssh://me@[2001:db8::1]:23").unwrap();
        assert_eq!(h.host, "2001:db8::1");
        assert_eq!(h.endpoint(), "[2001:db8::1]:23");
        for bad in ["", "@host", "a,b", "host:notaport", "host:70000"] {
            assert!(JumpHost::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
