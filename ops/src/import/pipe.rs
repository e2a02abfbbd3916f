//! Seed 004's profile lines: `NAME|HOST|USER|LOCAL_PORT|REMOTE_HOST|REMOTE_PORT|DESCRIPTION`.

use tunnelfleet_protocol::ProfileSpec;

use super::{Defaults, ImportError, base_profile, endpoint};

/// One seed-004 line.
pub(super) fn pipe_line(
    line: usize,
    text: &str,
    defaults: &Defaults,
) -> Result<(ProfileSpec, Vec<String>), ImportError> {
    let err = |reason: String| ImportError { line, reason };
    let f: Vec<&str> = text.splitn(7, '|').map(str::trim).collect();
    if f.len() < 6 {
        return Err(err(format!(
            "{} fields, expected NAME|HOST|USER|LOCAL_PORT|REMOTE_HOST|REMOTE_PORT|DESCRIPTION",
            f.len()
        )));
    }
    let (name, host, user, lport, rhost, rport) = (f[0], f[1], f[2], f[3], f[4], f[5]);
    let port = |what: &str, v: &str| {
        v.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| err(format!("{what} {v:?} is not a port")))
    };
    let lport = port("LOCAL_PORT", lport)?;
    let rport = port("REMOTE_PORT", rport)?;
    if host.is_empty() || user.is_empty() || rhost.is_empty() {
        return Err(err("HOST, USER and REMOTE_HOST must not be empty".into()));
    }
    let mut p = base_profile(name, defaults);
    p.description = f.get(6).copied().unwrap_or_default().to_string();
    p.user = user.to_string();
    p.endpoints = vec![endpoint(host, 22)];
    p.forwards = vec![format!("L {lport}:{rhost}:{rport}")];
    let notes = vec![
        format!(
            "identity file {} (the profile line names none)",
            defaults.identity_file.display()
        ),
        format!(
            "host key verified against {}: record it first (ssh-keyscan -p 22 {host} >> {})",
            defaults.known_hosts.display(),
            defaults.known_hosts.display()
        ),
        "health: the script's check (a connect to the local port) only proves the listener; add [profile.health] with an http URL or tcp target behind the forward for an end-to-end check".into(),
    ];
    Ok((p, notes))
}
