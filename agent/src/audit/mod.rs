//! `tunnelfleet audit`: seed 004's security audit, done as findings with evidence and a fix.
//!
//! Every check returns [`Finding`]s — severity, what was seen, how to fix it — so the CLI can
//! print a report or JSON and set the exit code from the worst severity. Each source lives in its
//! own module and parses text separately from reading it, so every finding is tested on real
//! files and real `sshd -T` output.
//!
//! - [`keys`]: SSH private keys: type and size, passphrase, file and directory permissions.
//! - [`sshd`]: the OMA's sshd settings (`sshd -T`, else the files with `Include` and `Match`).
//! - [`sockets`]: listening sockets, and which are bound beyond loopback.
//! - [`logins`]: failed SSH logins per source address (auth.log or the journal).
//! - [`own`]: tunnelfleet's own configuration.

pub mod keys;
pub mod logins;
pub mod own;
pub mod sockets;
pub mod sshd;

use serde::Serialize;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing; nothing to fix.
    Info,
    /// Tighten when convenient.
    Low,
    /// Fix soon.
    Medium,
    /// Fix now.
    High,
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier, e.g. `key.rsa-short` (for scripts and suppression lists).
    pub id: String,
    /// How bad, from info to critical.
    pub severity: Severity,
    /// One line.
    pub title: String,
    /// What was seen, with the file, setting, address or port.
    pub evidence: String,
    /// What to do about it.
    pub fix: String,
}

impl Finding {
    /// A finding.
    pub fn new(
        id: &str,
        severity: Severity,
        title: impl Into<String>,
        evidence: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Finding {
            id: id.to_string(),
            severity,
            title: title.into(),
            evidence: evidence.into(),
            fix: fix.into(),
        }
    }
}

/// The whole audit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Findings, worst first.
    pub findings: Vec<Finding>,
    /// Sources that could not be checked, and why.
    pub skipped: Vec<String>,
}

impl Report {
    /// Adds findings.
    pub fn extend(&mut self, f: Vec<Finding>) {
        self.findings.extend(f);
    }

    /// Notes a source that was not checked.
    pub fn skip(&mut self, why: impl Into<String>) {
        self.skipped.push(why.into());
    }

    /// Sorts worst first.
    pub fn finish(mut self) -> Self {
        self.findings
            .sort_by(|a, b| b.severity.cmp(&a.severity).then(a.id.cmp(&b.id)));
        self
    }

    /// The worst severity found.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// Human report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let sev = format!("{:?}", f.severity).to_uppercase();
            out.push_str(&format!("[{sev}] {} ({})\n", f.title, f.id));
            out.push_str(&format!("    evidence: {}\n", f.evidence));
            out.push_str(&format!("    fix:      {}\n", f.fix));
        }
        if self.findings.is_empty() {
            out.push_str("no findings\n");
        }
        for s in &self.skipped {
            out.push_str(&format!("not checked: {s}\n"));
        }
        let count = |s| self.findings.iter().filter(|f| f.severity == s).count();
        out.push_str(&format!(
            "\n{} high, {} medium, {} low, {} info\n",
            count(Severity::High),
            count(Severity::Medium),
            count(Severity::Low),
            count(Severity::Info)
        ));
        out
    }
}

/// What to audit; `None`/empty means the system default, skipped when absent. Also the
/// `tunnelfleet audit` arguments, so the CLI and the library cannot drift apart.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuditOptions {
    /// Directory of private keys to check (repeatable; default ~/.ssh).
    #[arg(long = "keys")]
    pub key_dirs: Vec<std::path::PathBuf>,
    /// A single private key to check (repeatable).
    #[arg(long = "key")]
    pub keys: Vec<std::path::PathBuf>,
    /// sshd config to audit (default /etc/ssh/sshd_config).
    #[arg(long)]
    pub sshd_config: Option<std::path::PathBuf>,
    /// sshd binary used for `sshd -T`.
    #[arg(long, default_value = "/usr/sbin/sshd")]
    pub sshd: std::path::PathBuf,
    /// Evaluate sshd's `Match User` blocks for this tunnel user.
    #[arg(long)]
    pub tunnel_user: Option<String>,
    /// sshd log to scan (default /var/log/auth.log, else the journal).
    #[arg(long)]
    pub auth_log: Option<std::path::PathBuf>,
    /// tunnelfleet agent config (default /etc/tunnelfleet/agent.toml).
    #[arg(long)]
    pub agent_config: Option<std::path::PathBuf>,
    /// Do not list listening sockets.
    #[arg(long)]
    pub no_sockets: bool,
}

/// Runs every check.
pub fn run(o: &AuditOptions) -> Report {
    use std::path::{Path, PathBuf};
    let mut r = Report::default();
    let mut dirs = o.key_dirs.clone();
    if dirs.is_empty()
        && o.keys.is_empty()
        && let Some(home) = std::env::var_os("HOME")
    {
        let d = PathBuf::from(home).join(".ssh");
        if d.is_dir() {
            dirs.push(d);
        } else {
            r.skip(format!("keys: {} does not exist", d.display()));
        }
    }
    for d in &dirs {
        match keys::audit_dir(d) {
            Ok(f) => r.extend(f),
            Err(e) => r.skip(format!("keys in {}: {e}", d.display())),
        }
    }
    for k in &o.keys {
        r.extend(keys::audit_file(k));
    }

    let sshd_config = o.sshd_config.clone().or_else(|| {
        let d = PathBuf::from("/etc/ssh/sshd_config");
        d.exists().then_some(d)
    });
    match sshd_config {
        Some(cfg) => match sshd::effective(&o.sshd, &cfg, o.tunnel_user.as_deref()) {
            Ok((settings, source)) => {
                let how = match &source {
                    sshd::Source::SshdT => "sshd -T",
                    sshd::Source::Parsed(_) => "parsed",
                };
                let user = o
                    .tunnel_user
                    .as_deref()
                    .map(|u| format!(", user {u}"))
                    .unwrap_or_default();
                r.extend(sshd::audit(
                    &settings,
                    &format!("{} ({how}{user})", cfg.display()),
                ));
                if let sshd::Source::Parsed(notes) = source {
                    for n in notes {
                        r.skip(n);
                    }
                }
            }
            Err(e) => r.skip(format!("sshd config: {e}")),
        },
        None => {
            r.skip("sshd config: /etc/ssh/sshd_config not found (not an OMA? pass --sshd-config)")
        }
    }

    if o.no_sockets {
        r.skip("listening sockets: --no-sockets");
    } else {
        match sockets::listeners() {
            Ok(l) => r.extend(sockets::audit(&l)),
            Err(e) => r.skip(format!("listening sockets: /proc/net/tcp: {e}")),
        }
    }

    let log = match &o.auth_log {
        Some(p) => logins::file_log(p),
        None => logins::system_log(),
    };
    match log {
        Ok((text, source)) => r.extend(logins::audit(&logins::failed_by_source(&text), &source)),
        Err(e) => r.skip(format!("failed logins: {e}")),
    }

    let agent = o.agent_config.clone().or_else(|| {
        let d = Path::new("/etc/tunnelfleet/agent.toml");
        d.exists().then(|| d.to_path_buf())
    });
    match agent {
        Some(p) => r.extend(own::audit(&p)),
        None => r.skip(
            "tunnelfleet config: /etc/tunnelfleet/agent.toml not found (pass --agent-config)",
        ),
    }
    r.finish()
}
