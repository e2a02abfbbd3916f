//! tunnelfleet's own configuration: what the agent config allows that weakens it.
//!
//! The config loader already refuses what cannot be safe (no host-key trust at all); the audit
//! reports what is allowed but deserves a second look.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::AgentConfig;

use super::{Finding, Severity, keys};

/// Audits an agent config file and the files it names.
pub fn audit(path: &Path) -> Vec<Finding> {
    let shown = path.display();
    let cfg = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::new(
                "tunnelfleet.config-invalid",
                Severity::High,
                "agent config is refused",
                e.to_string(),
                "fix the named key; the agent will not start with this file",
            )];
        }
    };
    let mut out = Vec::new();
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o002 != 0
    {
        out.push(Finding::new(
            "tunnelfleet.config-writable",
            Severity::High,
            "agent config writable by anyone",
            format!("{shown} has mode {:04o}", m.permissions().mode() & 0o7777),
            format!("chmod 644 {shown}"),
        ));
    }
    for p in &cfg.profiles {
        let key = format!("{shown}: profile.{}", p.name);
        if p.trust_on_first_use {
            out.push(Finding::new(
                "tunnelfleet.tofu",
                Severity::Medium,
                "trust on first use is on",
                format!("{key}.trust_on_first_use = true"),
                "pin the OMA keys (host_key_fingerprints) or fill known_hosts, then turn TOFU off",
            ));
        }
        if let Some(kh) = &p.known_hosts {
            if kh == Path::new("/dev/null") && p.host_key_fingerprints.is_empty() {
                out.push(Finding::new(
                    "tunnelfleet.trust-disabled",
                    Severity::High,
                    "host-key trust points at /dev/null",
                    format!("{key}.known_hosts = \"/dev/null\""),
                    "use a real known_hosts file or pinned fingerprints",
                ));
            } else if let Ok(m) = std::fs::metadata(kh)
                && m.permissions().mode() & 0o022 != 0
            {
                out.push(Finding::new(
                    "tunnelfleet.known-hosts-writable",
                    Severity::High,
                    "known_hosts writable by group or others",
                    format!(
                        "{key}.known_hosts {} has mode {:04o}",
                        kh.display(),
                        m.permissions().mode() & 0o7777
                    ),
                    format!("chmod 644 {}", kh.display()),
                ));
            }
        }
        for f in p.exposed_forwards() {
            out.push(Finding::new(
                "tunnelfleet.exposed-forward",
                Severity::Medium,
                "forward listens beyond loopback",
                format!("{key}.forwards: {f}"),
                "drop the bind address (127.0.0.1 is the default) unless other hosts must use it",
            ));
        }
        match &p.identity_file {
            Some(file) if file.exists() => out.extend(keys::audit_file(file)),
            Some(file) => out.push(Finding::new(
                "tunnelfleet.identity-missing",
                Severity::High,
                "identity file missing",
                format!("{key}.identity_file {} does not exist", file.display()),
                "create it (ssh-keygen -t ed25519 -N '' -f FILE) and install its .pub on the OMA",
            )),
            // The agent's own certified key, audited once below.
            None => {}
        }
    }
    if let Some(c) = &cfg.coordinator {
        let key = c.state_dir.join("ssh").join(crate::sshcert::KEY_FILE);
        if key.exists() {
            out.extend(keys::audit_file(&key));
        }
    }
    if let Some(addr) = cfg.agent.metrics_listen
        && !addr.ip().is_loopback()
    {
        out.push(Finding::new(
            "tunnelfleet.exposed-metrics",
            Severity::Low,
            "agent metrics served beyond loopback",
            format!("agent.metrics_listen = {addr}"),
            "listen on 127.0.0.1 unless the Prometheus server is on another host (and then firewall the port to it)",
        ));
    }
    if let Some(dir) = cfg.agent.control_socket.parent()
        && let Ok(m) = std::fs::metadata(dir)
        && m.permissions().mode() & 0o002 != 0
    {
        out.push(Finding::new(
            "tunnelfleet.socket-dir",
            Severity::Medium,
            "control socket directory writable by anyone",
            format!(
                "{} has mode {:04o}",
                dir.display(),
                m.permissions().mode() & 0o7777
            ),
            "set agent.control_socket in a directory of its own (the agent creates it 0700)",
        ));
    }
    out
}
