//! OpenSSH (and autossh) command lines as scripts and unit files hold them: `ssh -i KEY -p 443
//! -R … -L … -o … user@host`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tunnelfleet_protocol::ProfileSpec;

use super::{Defaults, ImportError, base_profile, derive_name, endpoint};

/// Index of the `ssh`/`autossh` word (after `sudo -u vma`, `exec`, `ExecStart=` and the like).
pub(super) fn ssh_start(words: &[String]) -> Option<usize> {
    words.iter().position(|w| {
        let base = w.rsplit(['/', '=']).next().unwrap_or(w);
        base == "ssh" || base == "autossh"
    })
}

/// One ssh/autossh command line; `start` is the index of the ssh word.
pub(super) fn ssh_line(
    line: usize,
    words: &[String],
    start: usize,
    name: Option<String>,
    defaults: &Defaults,
) -> Result<(ProfileSpec, Vec<String>), ImportError> {
    let err = |reason: String| ImportError { line, reason };
    let autossh = words[start].ends_with("autossh");
    let mut notes = Vec::new();
    let mut identity: Option<String> = None;
    let mut jump: Option<String> = None;
    let mut port: Option<u16> = None;
    let mut user: Option<String> = None;
    let mut forwards: Vec<String> = Vec::new();
    let mut options: BTreeMap<String, String> = BTreeMap::new();
    let mut dest: Option<String> = None;
    let mut rest: Vec<String> = Vec::new();
    // ssh's flags that take an argument (ssh(1) SYNOPSIS).
    const WITH_ARG: &str = "BbcDEeFIiJLlMmOoPpQRSWw";
    let mut i = start + 1;
    while i < words.len() {
        let w = &words[i];
        i += 1;
        // As ssh does, options may follow the destination; the first word after it that is
        // not one starts the remote command.
        if !rest.is_empty() || (dest.is_some() && !w.starts_with('-')) {
            rest.push(w.clone());
            continue;
        }
        if !w.starts_with('-') || w == "-" {
            dest = Some(w.clone());
            continue;
        }
        if w == "--" {
            if dest.is_some() {
                rest.extend(words[i..].iter().cloned());
                break;
            }
            if let Some(d) = words.get(i) {
                dest = Some(d.clone());
                i += 1;
            }
            continue;
        }
        // Bundled flags: `-fN`, `-p443`, `-oKey=Value`.
        for (j, c) in w[1..].char_indices() {
            if autossh && c == 'M' {
                let _ = take_arg(words, &mut i, &w[1 + j + 1..]);
                notes.push(
                    "autossh -M: its monitor port is replaced by SSH keepalive and health checks"
                        .into(),
                );
                break;
            }
            if WITH_ARG.contains(c) {
                let arg = take_arg(words, &mut i, &w[1 + j + 1..])
                    .ok_or_else(|| err(format!("-{c} needs an argument")))?;
                match c {
                    'i' => identity = Some(arg),
                    'p' => {
                        port = Some(
                            arg.parse()
                                .map_err(|_| err(format!("-p {arg:?} is not a port")))?,
                        )
                    }
                    'l' => user = Some(arg),
                    'L' | 'R' | 'D' => forwards.push(format!("{c} {arg}")),
                    'o' => {
                        let (k, v) = split_option(&arg)
                            .ok_or_else(|| err(format!("-o {arg:?}: expected Key=Value")))?;
                        options.insert(k.to_ascii_lowercase(), v);
                    }
                    'J' => jump = Some(arg),
                    'E' => notes.push(format!("-E {arg}: the agent logs through its own log (journald under systemd)")),
                    'F' => notes.push(format!("-F {arg}: ssh_config files are not read; only this command line was imported")),
                    'b' | 'B' => notes.push(format!("-{c} {arg}: the source address is not configurable; dropped")),
                    'c' | 'm' | 'Q' | 'O' | 'S' | 'W' | 'w' | 'e' | 'I' | 'P' => {
                        notes.push(format!("-{c} {arg}: not supported by tunnelfleet; dropped"))
                    }
                    _ => notes.push(format!("-{c} {arg}: dropped")),
                }
                break;
            }
            match c {
                'N' | 'f' | 'T' | 'n' | 'q' | 'x' | 'a' => {} // the agent never runs commands or forwards X/agents
                'v' => notes.push("-v: verbosity is the agent's RUST_LOG".into()),
                'C' => notes.push("-C: compression is negotiated by the agent's SSH library (zlib when the server offers it)".into()),
                'g' => notes.push("-g: bind addresses are explicit in tunnelfleet; write 0.0.0.0:PORT in a forward to expose it".into()),
                '4' | '6' => notes.push(format!("-{c}: the address family follows the endpoint's address")),
                'A' | 'X' | 'Y' | 'K' | 'k' | 't' | 's' | 'G' | 'V' => {
                    notes.push(format!("-{c}: not supported by tunnelfleet; dropped"))
                }
                _ => notes.push(format!("-{c}: unknown ssh flag; dropped")),
            }
        }
    }
    let dest =
        dest.ok_or_else(|| err("no destination (user@host) on the ssh command line".into()))?;
    if !rest.is_empty() {
        notes.push(format!(
            "remote command {:?} not carried over: tunnelfleet sessions carry forwards only",
            rest.join(" ")
        ));
    }
    let (dest_user, host, dest_port) = parse_destination(&dest).map_err(|e| err(e.to_string()))?;
    // The -o equivalents of the flags, as ssh applies them (the first value wins; flags first).
    let opt = |k: &str| options.get(k).cloned();
    let user = user
        .or(dest_user)
        .or_else(|| opt("user"))
        .ok_or_else(|| err(format!("no user for {host}: write user@{host} or -l USER")))?;
    let port = match (port, dest_port, opt("port")) {
        (Some(p), _, _) | (None, Some(p), _) => p,
        (None, None, Some(p)) => p
            .parse()
            .map_err(|_| err(format!("-o Port={p:?} is not a port")))?,
        _ => 22,
    };
    let host = opt("hostname").unwrap_or(host);
    let name = match name {
        Some(n) => n,
        None => derive_name(&host),
    };
    let mut p = base_profile(&name, defaults);
    p.user = user;
    p.endpoints = vec![endpoint(&host, port)];
    match identity.or_else(|| opt("identityfile")) {
        Some(k) => p.identity_file = Some(PathBuf::from(k)),
        None => notes.push(format!(
            "identity file {} (the command line names none; ssh would try ~/.ssh/id_*)",
            defaults.identity_file.display()
        )),
    }
    p.forwards = forwards;
    // ProxyJump: the flag wins over -o; `none` means direct.
    if let Some(j) = jump.or_else(|| opt("proxyjump"))
        && !j.eq_ignore_ascii_case("none")
    {
        p.jump = j
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(String::from)
            .collect();
        for (i, h) in p.jump.iter().enumerate() {
            tunnelfleet_protocol::jump::JumpHost::parse(h)
                .map_err(|e| err(format!("jump host {}: {e}", i + 1)))?;
        }
        notes.push(format!(
            "jump hosts {}: their host keys are verified too (ssh-keyscan each into the known_hosts file)",
            p.jump.join(", ")
        ));
    }
    for (k, v) in &options {
        let (fwd, kind) = match k.as_str() {
            "localforward" => (true, 'L'),
            "remoteforward" => (true, 'R'),
            "dynamicforward" => (true, 'D'),
            _ => (false, ' '),
        };
        if fwd {
            p.forwards.push(format!("{kind} {}", v.replace(' ', ":")));
        }
    }
    if p.forwards.is_empty() {
        return Err(err("no -L, -R or -D forward on the ssh command line".into()));
    }
    let dur = |k: &str, v: &str| -> Result<Duration, ImportError> {
        v.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| err(format!("-o {k}={v:?}: expected seconds")))
    };
    let mut host_keys_checked = false;
    for (k, v) in &options {
        let lv = v.to_ascii_lowercase();
        match k.as_str() {
            "user" | "port" | "hostname" | "identityfile" | "localforward" | "remoteforward"
            | "dynamicforward" | "proxyjump" => {}
            "serveraliveinterval" => p.keepalive_interval = dur("ServerAliveInterval", v)?,
            "serveralivecountmax" => {
                p.keepalive_count = v
                    .parse()
                    .map_err(|_| err(format!("-o ServerAliveCountMax={v:?}: expected a count")))?
            }
            "connecttimeout" => p.connect_timeout = dur("ConnectTimeout", v)?,
            "stricthostkeychecking" => {
                host_keys_checked = true;
                match lv.as_str() {
                    "no" | "off" => notes.push(format!(
                        "StrictHostKeyChecking={v} not carried over: host keys are always verified, against {} (record the OMA's key first: ssh-keyscan -p {port} {host})",
                        defaults.known_hosts.display()
                    )),
                    "accept-new" => {
                        p.trust_on_first_use = true;
                        notes.push("StrictHostKeyChecking=accept-new: trust_on_first_use = true (the first key seen is recorded, a changed key is refused)".into());
                    }
                    _ => {}
                }
            }
            "userknownhostsfile" => {
                if v == "/dev/null" || v.eq_ignore_ascii_case("none") {
                    notes.push(format!(
                        "UserKnownHostsFile={v} not carried over: keys are checked against {}",
                        defaults.known_hosts.display()
                    ));
                } else {
                    p.known_hosts = Some(PathBuf::from(v));
                }
            }
            "exitonforwardfailure" => notes.push(format!(
                "ExitOnForwardFailure={v}: a forward that cannot bind is reported by port and retried while the others keep running"
            )),
            "tcpkeepalive" => notes.push(format!(
                "TCPKeepAlive={v}: dead sessions are found by SSH keepalive ({} x {})",
                humantime::format_duration(p.keepalive_interval),
                p.keepalive_count
            )),
            "batchmode" => {} // the agent never prompts
            "compression" => notes.push(format!(
                "Compression={v}: negotiated by the agent's SSH library"
            )),
            _ => notes.push(format!("-o {k}={v}: not supported by tunnelfleet; dropped")),
        }
    }
    if !host_keys_checked {
        notes.push(format!(
            "host key verified against {}: record it first (ssh-keyscan -p {port} {host} >> {})",
            p.known_hosts
                .as_ref()
                .unwrap_or(&defaults.known_hosts)
                .display(),
            p.known_hosts
                .as_ref()
                .unwrap_or(&defaults.known_hosts)
                .display()
        ));
    }
    notes.push(
        "no health check in the source: add [profile.health] (e.g. http = \"http://localhost:8082/health\")"
            .into(),
    );
    Ok((p, notes))
}

/// The argument of a flag: the rest of its word, else the next word.
pub(super) fn take_arg(words: &[String], i: &mut usize, rest: &str) -> Option<String> {
    if !rest.is_empty() {
        return Some(rest.to_string());
    }
    let a = words.get(*i)?.clone();
    *i += 1;
    Some(a)
}

/// `Key=Value` or `Key Value`.
pub(super) fn split_option(s: &str) -> Option<(String, String)> {
    let s = s.trim();
    let (k, v) = s
        .split_once('=')
        .or_else(|| s.split_once(char::is_whitespace))?;
    let (k, v) = (k.trim(), v.trim());
    (!k.is_empty() && !v.is_empty()).then(|| (k.to_string(), v.to_string()))
}

/// A destination that is not `[user@]host` or `ssh://[user@]host[:port]`.
#[derive(Debug, thiserror::Error)]
pub(super) enum DestinationError {
    /// The `ssh://` form's host and port.
    #[error("destination {0:?}: {1}")]
    Addr(String, tunnelfleet_protocol::addr::AddrError),
    /// No host at all.
    #[error("destination {0:?} has no host")]
    NoHost(String),
}

/// `[user@]host`, `ssh://[user@]host[:port]`.
pub(super) fn parse_destination(
    d: &str,
) -> Result<(Option<String>, String, Option<u16>), DestinationError> {
    let (uri, rest) = match d.strip_prefix("ssh://") {
        Some(r) => (true, r),
        None => (false, d),
    };
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, rest),
    };
    let (host, port) = if uri {
        match tunnelfleet_protocol::addr::split_host_port(hostport, Some(22)) {
            Ok((h, p)) => (h, Some(p)),
            Err(e) => return Err(DestinationError::Addr(d.into(), e)),
        }
    } else {
        (hostport.to_string(), None)
    };
    if host.is_empty() {
        return Err(DestinationError::NoHost(d.into()));
    }
    Ok((user, host, port))
}
