//! The OMA side's sshd settings, as they take effect for the tunnel user.
//!
//! `sshd -T` prints the effective configuration after `Include` and (with `-C`) `Match`; that is
//! the truth when sshd can run. Otherwise the files are parsed here: `Include` with globs, the
//! first value of a keyword wins, and `Match User` blocks apply for the tunnel user (other
//! `Match` criteria cannot be evaluated offline and are reported as skipped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Finding, Severity};

/// Effective settings: lower-case keyword → values (keywords such as `permitopen` may have
/// several).
pub type Settings = BTreeMap<String, Vec<String>>;

/// How the settings were obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// From `sshd -T`.
    SshdT,
    /// Parsed from the files; the strings are what could not be evaluated.
    Parsed(Vec<String>),
}

/// Why sshd's settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SshdConfigError {
    /// `sshd` could not be run.
    #[error("{}: {source}", program.display())]
    Run {
        /// The program.
        program: std::path::PathBuf,
        /// The spawn error.
        source: std::io::Error,
    },
    /// `sshd -T` refused the config (its message).
    #[error("{0}")]
    Refused(String),
    /// A config file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// `Include` deeper than sshd itself allows.
    #[error("{}: Include nested too deeply", .0.display())]
    TooDeep(std::path::PathBuf),
}

/// Reads the effective settings: `sshd -T` when it runs, else the files.
pub fn effective(
    sshd: &Path,
    config: &Path,
    user: Option<&str>,
) -> Result<(Settings, Source), SshdConfigError> {
    match sshd_t(sshd, config, user) {
        Ok(s) => Ok((s, Source::SshdT)),
        Err(_) => {
            let mut notes = Vec::new();
            let s = parse_files(config, user, &mut notes)?;
            Ok((s, Source::Parsed(notes)))
        }
    }
}

/// Runs `sshd -T -f CONFIG [-C user=USER,host=localhost,addr=127.0.0.1]`.
pub fn sshd_t(sshd: &Path, config: &Path, user: Option<&str>) -> Result<Settings, SshdConfigError> {
    let mut cmd = Command::new(sshd);
    cmd.arg("-T").arg("-f").arg(config);
    if let Some(u) = user {
        cmd.arg("-C")
            .arg(format!("user={u},host=localhost,addr=127.0.0.1"));
    }
    let out = cmd.output().map_err(|source| SshdConfigError::Run {
        program: sshd.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        return Err(SshdConfigError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(parse_sshd_t(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `sshd -T` output.
pub fn parse_sshd_t(text: &str) -> Settings {
    let mut s = Settings::new();
    for line in text.lines() {
        if let Some((k, v)) = line.trim().split_once(char::is_whitespace) {
            s.entry(k.to_ascii_lowercase())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    s
}

/// Parses config files: `Include` (globs, relative to /etc/ssh), first value wins,
/// `Match User` applied for `user`.
pub fn parse_files(
    config: &Path,
    user: Option<&str>,
    notes: &mut Vec<String>,
) -> Result<Settings, SshdConfigError> {
    let mut s = Settings::new();
    read_into(config, user, &mut s, notes, 0)?;
    Ok(s)
}

fn read_into(
    path: &Path,
    user: Option<&str>,
    s: &mut Settings,
    notes: &mut Vec<String>,
    depth: usize,
) -> Result<(), SshdConfigError> {
    if depth > 16 {
        return Err(SshdConfigError::TooDeep(path.to_path_buf()));
    }
    let text = std::fs::read_to_string(path).map_err(|source| SshdConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    // Ok(true): inside a Match block that applies; Ok(false): one that does not.
    let mut matching = true;
    let mut in_match = false;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(|c: char| c.is_whitespace() || c == '=') {
            Some((k, v)) => (
                k.to_ascii_lowercase(),
                v.trim().trim_start_matches('=').trim().to_string(),
            ),
            None => (line.to_ascii_lowercase(), String::new()),
        };
        match key.as_str() {
            "match" => {
                in_match = true;
                matching = match_applies(&value, user, notes, path, n + 1);
            }
            "include" => {
                if in_match && !matching {
                    continue;
                }
                for pat in value.split_whitespace() {
                    let full = if Path::new(pat).is_absolute() {
                        PathBuf::from(pat)
                    } else {
                        Path::new("/etc/ssh").join(pat)
                    };
                    for inc in glob(&full) {
                        read_into(&inc, user, s, notes, depth + 1)?;
                    }
                }
            }
            _ if in_match && !matching => {}
            _ => {
                // Within a file, the first value obtained is used (sshd_config(5)); for
                // multi-valued keywords the first line's values are the list.
                s.entry(key)
                    .or_insert_with(|| vec![value.to_ascii_lowercase()]);
            }
        }
    }
    Ok(())
}

fn match_applies(
    criteria: &str,
    user: Option<&str>,
    notes: &mut Vec<String>,
    path: &Path,
    line: usize,
) -> bool {
    let words: Vec<&str> = criteria.split_whitespace().collect();
    if words.first().is_some_and(|w| w.eq_ignore_ascii_case("all")) {
        return true;
    }
    let mut applies = true;
    for pair in words.chunks(2) {
        let (k, v) = (
            pair[0].to_ascii_lowercase(),
            pair.get(1).copied().unwrap_or(""),
        );
        if k == "user" {
            applies &= user.is_some_and(|u| v.split(',').any(|p| pattern(p, u)));
        } else {
            notes.push(format!(
                "{}:{line}: Match {k} {v} cannot be evaluated without sshd; treated as not applying",
                path.display()
            ));
            applies = false;
        }
    }
    applies
}

fn pattern(p: &str, s: &str) -> bool {
    if let Some(neg) = p.strip_prefix('!') {
        return !pattern(neg, s);
    }
    match p.split_once('*') {
        Some((pre, post)) => {
            s.starts_with(pre) && s.ends_with(post) && s.len() >= pre.len() + post.len()
        }
        None => p == s,
    }
}

fn glob(path: &Path) -> Vec<PathBuf> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if !name.contains('*') {
        return vec![path.to_path_buf()];
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| pattern(&name, &n.to_string_lossy()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn first<'a>(s: &'a Settings, key: &str) -> Option<&'a str> {
    s.get(key).and_then(|v| v.first()).map(|v| v.as_str())
}

/// Findings from effective settings; `what` names the source (file and user) in evidence.
pub fn audit(s: &Settings, what: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let ev = |k: &str, v: &str| format!("{what}: {k} {v}");
    if let Some(v @ "yes") = first(s, "passwordauthentication") {
        out.push(Finding::new(
            "sshd.password-auth",
            Severity::High,
            "password authentication enabled",
            ev("PasswordAuthentication", v),
            "PasswordAuthentication no (tunnels authenticate with keys)",
        ));
    }
    match first(s, "permitrootlogin") {
        Some(v @ "yes") => out.push(Finding::new(
            "sshd.root-login",
            Severity::High,
            "root may log in, with a password too",
            ev("PermitRootLogin", v),
            "PermitRootLogin no",
        )),
        Some(v @ ("prohibit-password" | "without-password")) => out.push(Finding::new(
            "sshd.root-login-key",
            Severity::Low,
            "root may log in with a key",
            ev("PermitRootLogin", v),
            "PermitRootLogin no, and tunnel as a dedicated user",
        )),
        _ => {}
    }
    if let Some(v @ "yes") = first(s, "x11forwarding") {
        out.push(Finding::new(
            "sshd.x11",
            Severity::Low,
            "X11 forwarding enabled",
            ev("X11Forwarding", v),
            "X11Forwarding no",
        ));
    }
    let tcp = first(s, "allowtcpforwarding").unwrap_or("yes");
    let permit_open: Vec<&str> = s
        .get("permitopen")
        .map(|v| v.iter().map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if matches!(tcp, "yes" | "all" | "local")
        && (permit_open.is_empty()
            || permit_open
                .iter()
                .any(|p| p.split_whitespace().any(|x| x == "any")))
    {
        out.push(Finding::new(
            "sshd.permitopen-any",
            Severity::Medium,
            "tunnel users may open forwards to any host and port",
            ev("AllowTcpForwarding", &format!("{tcp}, PermitOpen {}", if permit_open.is_empty() { "(unset: any)".to_string() } else { permit_open.join(" ") })),
            "Match User <tunnel user>: PermitOpen localhost:8082 localhost:10809 (only what the tunnels need)",
        ));
    }
    let permit_listen: Vec<&str> = s
        .get("permitlisten")
        .map(|v| v.iter().map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if matches!(tcp, "yes" | "all" | "remote")
        && (permit_listen.is_empty()
            || permit_listen
                .iter()
                .any(|p| p.split_whitespace().any(|x| x == "any")))
    {
        out.push(Finding::new(
            "sshd.permitlisten-any",
            Severity::Low,
            "tunnel users may listen on any port of the server",
            ev(
                "PermitListen",
                if permit_listen.is_empty() {
                    "(unset: any)"
                } else {
                    "any"
                },
            ),
            "Match User <tunnel user>: PermitListen localhost:9081 (only the reverse forwards)",
        ));
    }
    // A session whose client is gone keeps its reverse-forward ports until sshd notices; with
    // ClientAlive probes off (sshd's default) that is when TCP gives up, hours later.
    let interval: u64 = first(s, "clientaliveinterval")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let count: u64 = first(s, "clientalivecountmax")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    if interval == 0 || count == 0 || interval.saturating_mul(count) > 15 {
        out.push(Finding::new(
            "sshd.client-alive",
            Severity::Medium,
            "a dead tunnel session keeps its reverse-forward ports (R 9081) until TCP gives up",
            ev(
                "ClientAliveInterval",
                &format!("{interval}, ClientAliveCountMax {count}"),
            ),
            "install ops/deploy/oma/tunnelfleet.conf into /etc/ssh/sshd_config.d/ (ClientAliveInterval 5, ClientAliveCountMax 3: a dead session dropped within 15 s)",
        ));
    }
    match first(s, "gatewayports") {
        Some(v @ "yes") => out.push(Finding::new(
            "sshd.gatewayports",
            Severity::Medium,
            "remote forwards listen on every address of the server",
            ev("GatewayPorts", v),
            "GatewayPorts no (remote forwards on loopback only)",
        )),
        Some(v @ "clientspecified") => out.push(Finding::new(
            "sshd.gatewayports",
            Severity::Low,
            "clients may choose to expose remote forwards beyond loopback",
            ev("GatewayPorts", v),
            "GatewayPorts no",
        )),
        _ => {}
    }
    out.extend(fleet_access(s, what, std::time::SystemTime::now()));
    out
}

/// How old the sync's files may be before the timer (every 10 s) counts as stopped.
const SYNC_STALE: std::time::Duration = std::time::Duration::from_secs(300);

/// An OMA that trusts the fleet's SSH CA (`TrustedUserCAKeys`): the drop-in of `tunnelfleet
/// oma sshd-config` complete, and the files `oma sync` keeps there and fresh.
fn fleet_access(s: &Settings, what: &str, now: std::time::SystemTime) -> Vec<Finding> {
    let set = |k: &str| first(s, k).filter(|v| *v != "none");
    let Some(ca) = set("trustedusercakeys") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let ev = |k: &str, v: &str| format!("{what}: {k} {v}");
    let fix = "tunnelfleet oma sshd-config GROUP > /etc/ssh/sshd_config.d/tunnelfleet.conf, then enable tunnelfleet-oma-sync@GROUP.timer";
    if !Path::new(ca).is_file() {
        out.push(Finding::new(
            "sshd.ssh-ca-missing",
            Severity::Medium,
            "the SSH CA sshd trusts is not there: no certificate logs in",
            ev("TrustedUserCAKeys", ca),
            fix,
        ));
    }
    match set("revokedkeys") {
        None => out.push(Finding::new(
            "sshd.no-revoked-keys",
            Severity::High,
            "certificates are trusted with no RevokedKeys: a revoked appliance keeps logging in",
            ev("TrustedUserCAKeys", &format!("{ca}, RevokedKeys (unset)")),
            fix,
        )),
        Some(file) if std::fs::File::open(file).is_err() => out.push(Finding::new(
            "sshd.revoked-keys-unreadable",
            Severity::High,
            "RevokedKeys names a file sshd cannot read: every public-key login is refused",
            ev("RevokedKeys", file),
            "systemctl start tunnelfleet-oma-sync@GROUP.service (it writes the file and never leaves it absent)",
        )),
        Some(file) => {
            let age = std::fs::metadata(file)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            if let Some(age) = age.filter(|a| *a > SYNC_STALE) {
                out.push(Finding::new(
                    "sshd.oma-sync-stale",
                    Severity::Medium,
                    "oma sync has not written the revocation file for a while: revokes and new agents do not reach this OMA",
                    ev("RevokedKeys", &format!("{file}, written {} ago", humantime::format_duration(std::time::Duration::from_secs(age.as_secs())))),
                    "systemctl status tunnelfleet-oma-sync@GROUP.timer; journalctl -u tunnelfleet-oma-sync@GROUP",
                ));
            }
        }
    }
    match set("authorizedprincipalsfile") {
        None => out.push(Finding::new(
            "sshd.no-principals-file",
            Severity::Medium,
            "certificates are trusted with no AuthorizedPrincipalsFile: no per-agent port limits",
            ev(
                "TrustedUserCAKeys",
                &format!("{ca}, AuthorizedPrincipalsFile (unset)"),
            ),
            fix,
        )),
        // %u, %h: one file per user, not ours to find.
        Some(file) if !file.contains('%') && !Path::new(file).is_file() => out.push(Finding::new(
            "sshd.principals-missing",
            Severity::Medium,
            "the principals file is not there: no agent logs in by certificate",
            ev("AuthorizedPrincipalsFile", file),
            "systemctl start tunnelfleet-oma-sync@GROUP.service",
        )),
        Some(_) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    fn ids(f: &[Finding]) -> Vec<&str> {
        f.iter().map(|f| f.id.as_str()).collect()
    }

    fn settings(pairs: &[(&str, &Path)]) -> Settings {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.display().to_string()]))
            .collect()
    }

    #[test]
    fn an_oma_trusting_the_fleet_needs_its_three_files_and_a_running_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, principals, revoked) = (
            dir.path().join("ssh_user_ca.pub"),
            dir.path().join("principals"),
            dir.path().join("revoked_keys"),
        );
        let all = settings(&[
            ("trustedusercakeys", &ca),
            ("authorizedprincipalsfile", &principals),
            ("revokedkeys", &revoked),
        ]);
        let now = std::time::SystemTime::now();
        // Before the first sync: nothing is there, and sshd would refuse every key.
        assert_eq!(
            ids(&fleet_access(&all, "t", now)),
            vec![
                "sshd.ssh-ca-missing",
                "sshd.revoked-keys-unreadable",
                "sshd.principals-missing"
            ]
        );
        for f in [&ca, &principals, &revoked] {
            std::fs::write(f, "").unwrap();
        }
        assert!(fleet_access(&all, "t", now).is_empty());
        // Ten minutes without a sync: the timer is not running.
        let later = now + std::time::Duration::from_secs(600);
        assert_eq!(
            ids(&fleet_access(&all, "t", later)),
            vec!["sshd.oma-sync-stale"]
        );
        // Certificates trusted without the rest of the drop-in.
        let ca_only = settings(&[("trustedusercakeys", &ca)]);
        let f = fleet_access(&ca_only, "t", now);
        assert_eq!(
            ids(&f),
            vec!["sshd.no-revoked-keys", "sshd.no-principals-file"]
        );
        assert_eq!(f[0].severity, Severity::High);
        // Not an OMA of the fleet: nothing to say.
        let mut plain = all.clone();
        plain.insert("trustedusercakeys".into(), vec!["none".into()]);
        assert!(fleet_access(&plain, "t", now).is_empty());
    }
}
