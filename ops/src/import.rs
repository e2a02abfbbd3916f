//! `tunnelfleet profiles import`: the formats teams run today, turned into tunnelfleet profiles.
//!
//! Two sources: seed 004's profile file (`NAME|HOST|USER|LOCAL_PORT|REMOTE_HOST|REMOTE_PORT|
//! DESCRIPTION`) and OpenSSH (or autossh) command lines such as seed 000's `ssh -i KEY -p 443
//! -R … -L … -o … user@host`, as found in scripts and unit files. Migration is where silent
//! changes hurt, so everything that is not carried over verbatim comes back as a [`Note`]: an
//! option tunnelfleet replaces (StrictHostKeyChecking=no: host keys are always verified), one
//! it implies (-N, BatchMode), and one it does not support (-J). Pure text in, text out; the
//! CLI writes the TOML and prints the notes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_protocol::addr::valid_name;

/// Which format the input is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Decide from the content: `ssh`/`autossh` command lines, else seed 004's `|` lines.
    Auto,
    /// Seed 004: `NAME|HOST|USER|LOCAL_PORT|REMOTE_HOST|REMOTE_PORT|DESCRIPTION`.
    Pipe,
    /// OpenSSH or autossh command lines (continuations with `\` and `#` comments allowed).
    Ssh,
}

/// What the source does not say and a tunnelfleet profile needs.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Identity file when the source names none (seed 004 never does).
    pub identity_file: PathBuf,
    /// known_hosts file that verifies the OMA's host key.
    pub known_hosts: PathBuf,
    /// Profile name for a single ssh command line (else derived from the host).
    pub name: Option<String>,
}

/// Something the import did not carry over as it was, with where it came from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Note {
    /// Profile it concerns.
    pub profile: String,
    /// 1-based line of the input where that profile starts.
    pub line: usize,
    /// What happened and what to do.
    pub text: String,
}

/// The result of an import.
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    /// The profiles, each valid by the agent's own rules.
    pub profiles: Vec<ProfileSpec>,
    /// What was changed, implied or dropped.
    pub notes: Vec<Note>,
}

/// Input that cannot be imported; nothing is produced.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ImportError {
    /// 1-based line.
    pub line: usize,
    /// Why.
    pub reason: String,
}

impl Imported {
    /// The profiles as an agent-config TOML (`[[profile]]` tables), ready for `profiles apply -f`
    /// or a local agent config.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        #[derive(Serialize)]
        struct File<'a> {
            profile: &'a [ProfileSpec],
        }
        toml::to_string(&File {
            profile: &self.profiles,
        })
    }
}

/// Imports `text`.
pub fn import(text: &str, format: Format, defaults: &Defaults) -> Result<Imported, ImportError> {
    let lines = logical_lines(text);
    let format = match format {
        // Seed 004's file is nothing but `|` lines; anything else is taken for a script or
        // unit file with ssh command lines in it.
        Format::Auto
            if !lines.is_empty() && lines.iter().all(|(_, l)| l.matches('|').count() >= 5) =>
        {
            Format::Pipe
        }
        Format::Auto if lines.iter().any(|(_, l)| ssh_start(&words(l)).is_some()) => Format::Ssh,
        Format::Auto => Format::Pipe,
        f => f,
    };
    let mut out = Imported {
        profiles: Vec::new(),
        notes: Vec::new(),
    };
    for (line, text) in &lines {
        let (profile, notes) = match format {
            Format::Pipe => pipe_line(*line, text, defaults)?,
            _ => {
                let w = words(text);
                let Some(start) = ssh_start(&w) else { continue };
                // --name names the first command line's profile; others are named by host.
                let name = defaults.name.clone().filter(|_| out.profiles.is_empty());
                ssh_line(*line, &w, start, name, defaults)?
            }
        };
        if out.profiles.iter().any(|p| p.name == profile.name) {
            return Err(ImportError {
                line: *line,
                reason: format!("a second profile named {:?}", profile.name),
            });
        }
        if let Err(e) = profile.validate() {
            return Err(ImportError {
                line: *line,
                reason: format!("profile {:?}: {e}", profile.name),
            });
        }
        out.notes.extend(notes.into_iter().map(|text| Note {
            profile: profile.name.clone(),
            line: *line,
            text,
        }));
        out.profiles.push(profile);
    }
    if out.profiles.is_empty() {
        return Err(ImportError {
            line: lines.last().map(|(l, _)| *l).unwrap_or(1),
            reason: match format {
                Format::Pipe => {
                    "no NAME|HOST|USER|LOCAL_PORT|REMOTE_HOST|REMOTE_PORT|DESCRIPTION line".into()
                }
                _ => "no ssh or autossh command line".into(),
            },
        });
    }
    Ok(out)
}

/// Lines with comments removed and `\` continuations joined, each with the line it starts on.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = strip_comment(raw);
        let trimmed = line.trim_end();
        // A continuation: `\` at the end, possibly before a comment (seed 000 writes
        // `-R 9081:localhost:8081 \   # OMA → VMA API`).
        let (body, more) = match trimmed.strip_suffix('\\') {
            Some(b) => (b, true),
            None => (trimmed, false),
        };
        let entry = cur.get_or_insert_with(|| (i + 1, String::new()));
        entry.1.push(' ');
        entry.1.push_str(body);
        if !more {
            let (n, s) = cur.take().unwrap_or_default();
            if !s.trim().is_empty() {
                out.push((n, s.trim().to_string()));
            }
        }
    }
    if let Some((n, s)) = cur
        && !s.trim().is_empty()
    {
        out.push((n, s.trim().to_string()));
    }
    out
}

/// The line up to a `#` that starts a word outside quotes.
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double, mut prev_space) = (false, false, true);
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return &line[..i],
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Shell words; a line that does not split (unbalanced quotes) is taken word by word.
fn words(line: &str) -> Vec<String> {
    shlex::split(line).unwrap_or_else(|| line.split_whitespace().map(str::to_string).collect())
}

/// Index of the `ssh`/`autossh` word (after `sudo -u vma`, `exec`, `ExecStart=` and the like).
fn ssh_start(words: &[String]) -> Option<usize> {
    words.iter().position(|w| {
        let base = w.rsplit(['/', '=']).next().unwrap_or(w);
        base == "ssh" || base == "autossh"
    })
}

/// A profile with tunnelfleet's defaults for what the source does not set.
fn base_profile(name: &str, defaults: &Defaults) -> ProfileSpec {
    let mut p = ProfileSpec::new(name, "", defaults.identity_file.clone());
    p.known_hosts = Some(defaults.known_hosts.clone());
    p
}

/// One seed-004 line.
fn pipe_line(
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

/// `host:port`, with IPv6 literals bracketed.
fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One ssh/autossh command line; `start` is the index of the ssh word.
fn ssh_line(
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
        Some(k) => p.identity_file = PathBuf::from(k),
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
fn take_arg(words: &[String], i: &mut usize, rest: &str) -> Option<String> {
    if !rest.is_empty() {
        return Some(rest.to_string());
    }
    let a = words.get(*i)?.clone();
    *i += 1;
    Some(a)
}

/// `Key=Value` or `Key Value`.
fn split_option(s: &str) -> Option<(String, String)> {
    let s = s.trim();
    let (k, v) = s
        .split_once('=')
        .or_else(|| s.split_once(char::is_whitespace))?;
    let (k, v) = (k.trim(), v.trim());
    (!k.is_empty() && !v.is_empty()).then(|| (k.to_string(), v.to_string()))
}

/// A destination that is not `[user@]host` or `ssh://[user@]host[:port]`.
#[derive(Debug, thiserror::Error)]
enum DestinationError {
    /// The `ssh://` form's host and port.
    #[error("destination {0:?}: {1}")]
    Addr(String, tunnelfleet_protocol::addr::AddrError),
    /// No host at all.
    #[error("destination {0:?} has no host")]
    NoHost(String),
}

/// `[user@]host`, `ssh://[user@]host[:port]`.
fn parse_destination(d: &str) -> Result<(Option<String>, String, Option<u16>), DestinationError> {
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

/// A profile name from a host: `oma-10-245-246-125`.
fn derive_name(host: &str) -> String {
    let s: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = format!("oma-{}", s.trim_matches('-'));
    if valid_name(&name) {
        name
    } else {
        "imported".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            identity_file: "/etc/tunnelfleet/id_ed25519".into(),
            known_hosts: "/etc/tunnelfleet/known_hosts".into(),
            name: None,
        }
    }

    #[test]
    fn comments_and_continuations_make_logical_lines() {
        let l = logical_lines("a \\\n  b \\   # note\n  c\n# whole\n\nd '#x' e # y\n");
        let l: Vec<(usize, Vec<String>)> = l.iter().map(|(n, s)| (*n, words(s))).collect();
        assert_eq!(
            l,
            vec![
                (1, vec!["a".into(), "b".into(), "c".into()]),
                (6, vec!["d".into(), "#x".into(), "e".into()])
            ]
        );
    }

    #[test]
    fn bundled_flags_and_option_spellings() {
        let text = "ssh -fNp2222 -oServerAliveInterval=7 -o 'ServerAliveCountMax 4' -L8082:localhost:8082 -l ops host.example";
        let out = import(text, Format::Auto, &defaults()).unwrap();
        let p = &out.profiles[0];
        assert_eq!(p.endpoints, vec!["host.example:2222"]);
        assert_eq!(p.user, "ops");
        assert_eq!(p.keepalive_interval, Duration::from_secs(7));
        assert_eq!(p.keepalive_count, 4);
        assert_eq!(p.forwards, vec!["L 8082:localhost:8082"]);
        assert_eq!(p.name, "oma-host-example");
    }

    #[test]
    fn errors_name_the_line() {
        let e = import("\n\nssh -L 1:a:2\n", Format::Ssh, &defaults()).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("no destination"), "{e}");
        let e = import("a|h|u|notaport|x|1|d", Format::Pipe, &defaults()).unwrap_err();
        assert!(e.reason.contains("LOCAL_PORT"), "{e}");
        let e = import("ssh -p 70000 u@h -L 1:a:2", Format::Ssh, &defaults()).unwrap_err();
        assert!(e.reason.contains("-p"), "{e}");
        let e = import("# nothing\n", Format::Auto, &defaults()).unwrap_err();
        assert!(e.reason.contains("NAME|HOST"), "{e}");
    }

    #[test]
    fn ssh_uri_destination_and_sudo_prefix() {
        let out = import(
            "sudo -u vma /usr/bin/ssh -R 9081:localhost:8081 ssh://vma@[fd00::1]:443",
            Format::Auto,
            &defaults(),
        )
        .unwrap();
        assert_eq!(out.profiles[0].endpoints, vec!["[fd00::1]:443"]);
        assert_eq!(out.profiles[0].user, "vma");
    }
}
