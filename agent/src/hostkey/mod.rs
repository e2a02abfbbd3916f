//! Host key verification: known_hosts files, pinned SHA256 fingerprints, opt-in TOFU, and host
//! certificates signed by an `@cert-authority` of known_hosts or the fleet's SSH host CA.
//!
//! The seed ran `ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null`, which hands
//! the tunnel (and the NBD disk traffic inside it) to whoever answers on port 443. Here an
//! unknown or changed key is always refused, and the refusal carries the offered fingerprint and
//! the exact line to add, so fixing it is one copy-paste — never a silent accept.
//!
//! russh ships a known_hosts reader, but it fails the whole file on one unparsable line and
//! ignores markers and wildcards; this one follows sshd(8)'s "SSH_KNOWN_HOSTS FILE FORMAT".

use std::io::Write;
use std::path::{Path, PathBuf};

use data_encoding::BASE64;
use hmac::{Hmac, KeyInit, Mac};
use russh::keys::ssh_key::Certificate;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::{HashAlg, PublicKey};
use sha1::Sha1;
pub use tunnelfleet_protocol::fingerprint::Pin;

/// How a profile trusts host keys (built from its config).
#[derive(Debug, Clone)]
pub struct HostTrust {
    /// known_hosts file, if any.
    pub known_hosts: Option<PathBuf>,
    /// Pinned keys: bare ones for the endpoints, scoped ones for their host.
    pub pinned: Vec<Pin>,
    /// Record unknown hosts' keys into `known_hosts`.
    pub trust_on_first_use: bool,
    /// The fleet's SSH host CA as a known_hosts file (`@cert-authority * …`), when the profile
    /// trusts it (`fleet_host_ca`).
    pub fleet_host_ca: Option<PathBuf>,
}

/// The verdict on a key a server offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Matched a pin or a known_hosts line.
    Trusted,
    /// Unknown and recorded because TOFU is on.
    Learned,
    /// Refused; the error says why and how to trust it.
    Refused(HostKeyError),
}

/// Why a host key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostKeyError {
    /// Nothing trusted matches this host.
    #[error(
        "host key for {host} is not trusted: the server offered {algorithm} {fingerprint}. \
         If that is the right server, add it to host_key_fingerprints = [\"{pin}\"] \
         or add this line to {known_hosts}: {line}"
    )]
    Unknown {
        /// `host` or `[host]:port`.
        host: String,
        /// The pin that would trust it (naming the host for a jump host).
        pin: String,
        /// Key algorithm offered.
        algorithm: String,
        /// `SHA256:…` of the offered key.
        fingerprint: String,
        /// Where the line would go.
        known_hosts: String,
        /// A known_hosts line that would trust it.
        line: String,
    },
    /// known_hosts holds a different key for the host (of any type): possible man in the middle.
    #[error(
        "HOST KEY CHANGED for {host}: the server offered {algorithm} {fingerprint}, \
         but {known_hosts}:{line_no} holds a different key. Someone may be intercepting the \
         connection, or the host was reinstalled; if so, remove line {line_no} and verify the new key"
    )]
    Changed {
        /// `host` or `[host]:port`.
        host: String,
        /// Key algorithm offered.
        algorithm: String,
        /// `SHA256:…` of the offered key.
        fingerprint: String,
        /// The known_hosts file.
        known_hosts: String,
        /// The line with the old key.
        line_no: usize,
    },
    /// The key is marked `@revoked`.
    #[error("host key {fingerprint} for {host} is revoked in {known_hosts}:{line_no}")]
    Revoked {
        /// `host` or `[host]:port`.
        host: String,
        /// `SHA256:…` of the offered key.
        fingerprint: String,
        /// The known_hosts file.
        known_hosts: String,
        /// The `@revoked` line.
        line_no: usize,
    },
    /// A host certificate from a trusted authority that does not hold for this host now.
    #[error("host certificate of {host} refused: {reason}")]
    Certificate {
        /// `host` or `[host]:port`.
        host: String,
        /// Why.
        reason: String,
    },
    /// The profile trusts the fleet's host CA, and the agent has not learned it yet.
    #[error(
        "host key for {host} is not trusted: fleet_host_ca = true, but {path} is not there yet (the agent writes it when its coordinator welcomes it, if the coordinator has an SSH host CA)"
    )]
    NoFleetHostCa {
        /// `host` or `[host]:port`.
        host: String,
        /// The file.
        path: String,
    },
    /// known_hosts could not be read or (TOFU) written.
    #[error("known_hosts {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// The IO error.
        reason: String,
    },
}

/// The `SHA256:…` fingerprint of a key, as `ssh-keygen -lf` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The name known_hosts uses for `host:port`.
pub fn host_pattern_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

impl HostTrust {
    /// Pins from a profile's `host_key_fingerprints` (checked when the profile was loaded; one
    /// that does not parse trusts nothing).
    pub fn pins(written: &[String]) -> Vec<Pin> {
        written
            .iter()
            .filter_map(|p| tunnelfleet_protocol::fingerprint::parse_pin(p).ok())
            .collect()
    }

    /// Decides on `key` offered by `host:port`, an endpoint of the profile or (`jump`) a jump
    /// host on the way to one.
    pub fn verify(&self, host: &str, port: u16, key: &PublicKey, jump: bool) -> Verdict {
        let fp = fingerprint(key);
        let name = host_pattern_name(host, port);
        let pinned = self
            .pinned
            .iter()
            .any(|p| p.fingerprint == fp && p.covers(host, port, jump));
        let kh_display = self
            .known_hosts
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "a known_hosts file".to_string());
        let mut changed = None;
        if let Some(path) = &self.known_hosts {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    return Verdict::Refused(HostKeyError::File {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    });
                }
            };
            match check_known_hosts_text(&text, &name, key) {
                KnownHostsMatch::Match => return Verdict::Trusted,
                KnownHostsMatch::Revoked(line_no) => {
                    return Verdict::Refused(HostKeyError::Revoked {
                        host: name,
                        fingerprint: fp,
                        known_hosts: kh_display,
                        line_no,
                    });
                }
                KnownHostsMatch::Mismatch(line_no) => changed = Some(line_no),
                KnownHostsMatch::NoEntry => {}
            }
        }
        if pinned {
            return Verdict::Trusted;
        }
        if let Some(line_no) = changed {
            return Verdict::Refused(HostKeyError::Changed {
                host: name,
                algorithm: key.algorithm().to_string(),
                fingerprint: fp,
                known_hosts: kh_display,
                line_no,
            });
        }
        if self.trust_on_first_use
            && let Some(path) = &self.known_hosts
        {
            return match append_known_host(path, &name, key) {
                Ok(()) => Verdict::Learned,
                Err(e) => Verdict::Refused(HostKeyError::File {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }),
            };
        }
        let pin = if jump {
            format!(
                "{} {fp}",
                tunnelfleet_protocol::addr::join_host_port(host, port)
            )
        } else {
            fp.clone()
        };
        Verdict::Refused(HostKeyError::Unknown {
            pin,
            host: name.clone(),
            algorithm: key.algorithm().to_string(),
            fingerprint: fp,
            known_hosts: kh_display,
            line: known_hosts_line(&name, key),
        })
    }
}

impl HostTrust {
    /// Whether any authority could vouch for a host certificate (the fleet's host CA, or an
    /// `@cert-authority` line in known_hosts): only then are servers asked for one.
    pub fn has_cert_authorities(&self) -> bool {
        self.fleet_host_ca.is_some()
            || self.known_hosts.as_ref().is_some_and(|p| {
                std::fs::read_to_string(p).is_ok_and(|t| t.contains("@cert-authority"))
            })
    }

    /// Decides on a host certificate offered by `host:port` at `now_unix`. Signed by an
    /// authority trusted for that host (an `@cert-authority` line of known_hosts naming it, or
    /// the fleet's host CA), it must be a host certificate, valid now, for `host` among its
    /// principals, with no critical option. Signed by none: its key is judged as a plain key
    /// (pins and known_hosts lines still work). `@revoked` on the key or the CA refuses it.
    pub fn verify_certificate(
        &self,
        host: &str,
        port: u16,
        cert: &Certificate,
        jump: bool,
        now_unix: u64,
    ) -> Verdict {
        let name = host_pattern_name(host, port);
        let key = PublicKey::new(cert.public_key().clone(), "");
        let ca = PublicKey::new(cert.signature_key().clone(), "");
        let mut authorities = Vec::new();
        let files = self.known_hosts.iter().chain(self.fleet_host_ca.iter());
        for path in files {
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Verdict::Refused(HostKeyError::File {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    });
                }
            };
            for k in [&key, &ca] {
                if let KnownHostsMatch::Revoked(line_no) = check_known_hosts_text(&text, &name, k) {
                    return Verdict::Refused(HostKeyError::Revoked {
                        host: name,
                        fingerprint: fingerprint(k),
                        known_hosts: path.display().to_string(),
                        line_no,
                    });
                }
            }
            authorities.extend(cert_authorities(&text, &name));
        }
        if !authorities.iter().any(|a| a.key_data() == ca.key_data()) {
            if let Some(path) = &self.fleet_host_ca
                && !path.exists()
                && self.known_hosts.is_none()
                && self.pinned.is_empty()
            {
                return Verdict::Refused(HostKeyError::NoFleetHostCa {
                    host: name,
                    path: path.display().to_string(),
                });
            }
            return self.verify(host, port, &key, jump);
        }
        let refused = |reason: String| {
            Verdict::Refused(HostKeyError::Certificate {
                host: name.clone(),
                reason,
            })
        };
        if cert.cert_type() != CertType::Host {
            return refused("a user certificate, not a host certificate".into());
        }
        if let Some((option, _)) = cert.critical_options().iter().next() {
            return refused(format!("unknown critical option {option:?}"));
        }
        if !cert
            .valid_principals()
            .iter()
            .any(|p| p.eq_ignore_ascii_case(host))
        {
            return refused(format!(
                "valid for {}, not {host}",
                cert.valid_principals().join(", ")
            ));
        }
        if now_unix < cert.valid_after() {
            return refused(format!("not valid before {}", rfc3339(cert.valid_after())));
        }
        if now_unix >= cert.valid_before() {
            return refused(format!("expired at {}", rfc3339(cert.valid_before())));
        }
        match cert.validate_at(now_unix, [&ca.fingerprint(HashAlg::Sha256)]) {
            Ok(()) => Verdict::Trusted,
            Err(e) => refused(format!("signature: {e}")),
        }
    }
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
}

/// The keys of `@cert-authority` lines whose host patterns match `name`.
fn cert_authorities(text: &str, name: &str) -> Vec<PublicKey> {
    text.lines()
        .filter_map(|raw| {
            let mut fields = raw.split_whitespace();
            if fields.next()? != "@cert-authority" {
                return None;
            }
            let (patterns, kind, b64) = (fields.next()?, fields.next()?, fields.next()?);
            if !hosts_match(patterns, name) {
                return None;
            }
            PublicKey::from_openssh(&format!("{kind} {b64}")).ok()
        })
        .collect()
}

/// A known_hosts line for `name` and `key`.
pub fn known_hosts_line(name: &str, key: &PublicKey) -> String {
    let mut k = key.clone();
    k.set_comment("");
    let openssh = k.to_openssh().unwrap_or_default();
    format!("{name} {}", openssh.trim())
}

fn append_known_host(path: &Path, name: &str, key: &PublicKey) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(path)?;
    writeln!(f, "{}", known_hosts_line(name, key))?;
    f.sync_all()
}

/// Result of looking a host up in known_hosts text.
#[derive(Debug, PartialEq, Eq)]
enum KnownHostsMatch {
    Match,
    Mismatch(usize),
    Revoked(usize),
    NoEntry,
}

fn check_known_hosts_text(text: &str, name: &str, key: &PublicKey) -> KnownHostsMatch {
    let mut mismatch = None;
    let mut matched = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let mut marker = None;
        if first.starts_with('@') {
            marker = Some(first);
            first = fields.next().unwrap_or_default();
        }
        let (Some(kind), Some(b64)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !hosts_match(first, name) {
            continue;
        }
        let Ok(recorded) = PublicKey::from_openssh(&format!("{kind} {b64}")) else {
            continue;
        };
        let same = recorded.key_data() == key.key_data();
        match marker {
            Some("@revoked") if same => return KnownHostsMatch::Revoked(line_no),
            Some(_) => continue,
            None => {}
        }
        if same {
            matched = true;
        } else if mismatch.is_none() {
            // Any recorded key and a different offered one, whatever its algorithm: an
            // attacker would otherwise just offer another algorithm and be learned (TOFU).
            mismatch = Some(line_no);
        }
    }
    if matched {
        KnownHostsMatch::Match
    } else if let Some(l) = mismatch {
        KnownHostsMatch::Mismatch(l)
    } else {
        KnownHostsMatch::NoEntry
    }
}

/// Matches a comma-separated host pattern list: hashed `|1|salt|hash`, `!negation`, `*`/`?`.
fn hosts_match(patterns: &str, name: &str) -> bool {
    let mut positive = false;
    for pat in patterns.split(',') {
        let (negated, pat) = match pat.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pat),
        };
        let hit = if let Some(hashed) = pat.strip_prefix("|1|") {
            hashed_match(hashed, name)
        } else {
            wildcard_match(&pat.to_ascii_lowercase(), &name.to_ascii_lowercase())
        };
        if hit && negated {
            return false;
        }
        positive |= hit;
    }
    positive
}

fn hashed_match(hashed: &str, name: &str) -> bool {
    let Some((salt, hash)) = hashed.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (
        BASE64.decode(salt.as_bytes()),
        BASE64.decode(hash.as_bytes()),
    ) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha1> as KeyInit>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

fn wildcard_match(pat: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests;
