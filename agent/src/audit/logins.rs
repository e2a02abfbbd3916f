//! Failed SSH logins per source address, from auth.log or the journal.

use std::collections::BTreeMap;

use super::{Finding, Severity};

/// Failures from one address at or above this count look like guessing, not a typo.
pub const BRUTE_FORCE_THRESHOLD: usize = 5;

/// Counts failed logins per source address in sshd log text.
///
/// One SSH connection can log several lines for one failure (`Failed publickey` per key tried,
/// then `Connection closed by authenticating user … [preauth]`), so lines are grouped by
/// connection (address and port): a connection counts once, except that every
/// `Failed password`/`keyboard-interactive` in it is a separate guess and counts on its own.
/// Recognised: `Failed <method> for [invalid user] U from A port P`, `Invalid user U from A
/// port P`, `Connection closed by authenticating user U A port P [preauth]`.
pub fn failed_by_source(text: &str) -> BTreeMap<String, usize> {
    // (address, port or line number) -> (password guesses, any other failure)
    let mut conns: BTreeMap<(String, String), (usize, bool)> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let failed = line.split("Failed ").nth(1).filter(|r| r.contains(" for "));
        let (addr, port, guess) = if let Some(rest) = failed {
            let guess = rest.starts_with("password") || rest.starts_with("keyboard-interactive");
            let Some((a, p)) = addr_port(line, " from ") else {
                continue;
            };
            (a, p, guess)
        } else if line.contains("Invalid user ") {
            let Some((a, p)) = addr_port(line, " from ") else {
                continue;
            };
            (a, p, false)
        } else if let Some(rest) = line
            .split("Connection closed by authenticating user ")
            .nth(1)
        {
            // "<user> <addr> port <n> [preauth]"
            let mut w = rest.split_whitespace().skip(1);
            let Some(a) = w.next() else {
                continue;
            };
            let p = match (w.next(), w.next()) {
                (Some("port"), Some(p)) => p.to_string(),
                _ => String::new(),
            };
            (a.to_string(), p, false)
        } else {
            continue;
        };
        // Without a port, every line is its own connection.
        let port = if port.is_empty() {
            format!("line{n}")
        } else {
            port
        };
        let e = conns.entry((addr, port)).or_insert((0, false));
        if guess {
            e.0 += 1;
        } else {
            e.1 = true;
        }
    }
    let mut counts = BTreeMap::new();
    for ((addr, _), (guesses, other)) in conns {
        *counts.entry(addr).or_insert(0) += guesses.max(usize::from(other));
    }
    counts
}

/// The address after `marker`, and the port after the `port` word that follows it.
fn addr_port(line: &str, marker: &str) -> Option<(String, String)> {
    let (_, rest) = line.rsplit_once(marker)?;
    let mut w = rest.split_whitespace();
    let addr = w.next()?.to_string();
    let port = match (w.next(), w.next()) {
        (Some("port"), Some(p)) => p.to_string(),
        _ => String::new(),
    };
    Some((addr, port))
}

/// Medium for each address at or over the threshold; one Info line summarising the rest.
pub fn audit(counts: &BTreeMap<String, usize>, source: &str) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut below = Vec::new();
    for (addr, &n) in counts {
        if n >= BRUTE_FORCE_THRESHOLD {
            out.push(Finding::new(
                "logins.repeated-failures",
                Severity::Medium,
                format!("{n} failed SSH logins from {addr}"),
                format!("{source}: {n} failures from {addr}"),
                format!("if {addr} is not yours, block it (nft add rule inet filter input ip saddr {addr} drop) or rate-limit with MaxStartups/fail2ban; make sure PasswordAuthentication is no"),
            ));
        } else {
            below.push(format!("{addr}: {n}"));
        }
    }
    if !below.is_empty() {
        out.push(Finding::new(
            "logins.failures",
            Severity::Info,
            "occasional failed SSH logins",
            format!("{source}: {}", below.join(", ")),
            "nothing to do unless an address is unexpected",
        ));
    }
    out
}

/// Why no sshd log could be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log file named could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// No auth.log, and journalctl could not run.
    #[error("no /var/log/auth.log and no journal: {0}")]
    NoJournal(std::io::Error),
    /// No auth.log, and journalctl failed (its message).
    #[error("no /var/log/auth.log, and journalctl failed: {0}")]
    Journal(String),
}

/// Reads the log at `path` (`--auth-log`), naming it as the source.
pub fn file_log(path: &std::path::Path) -> Result<(String, String), LogError> {
    std::fs::read_to_string(path)
        .map(|t| (t, path.display().to_string()))
        .map_err(|source| LogError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Reads the system's sshd log: `/var/log/auth.log`, else the journal of ssh/sshd.
pub fn system_log() -> Result<(String, String), LogError> {
    if let Ok(t) = std::fs::read_to_string("/var/log/auth.log") {
        return Ok((t, "/var/log/auth.log".into()));
    }
    let out = std::process::Command::new("journalctl")
        .args([
            "-u",
            "ssh",
            "-u",
            "sshd",
            "--since",
            "-7d",
            "-o",
            "cat",
            "--no-pager",
            "-q",
        ])
        .output()
        .map_err(LogError::NoJournal)?;
    if !out.status.success() {
        return Err(LogError::Journal(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok((
        String::from_utf8_lossy(&out.stdout).to_string(),
        "journal (ssh, sshd; 7 days)".into(),
    ))
}
