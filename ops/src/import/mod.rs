//! `tunnelfleet profiles import`: the formats teams run today, turned into tunnelfleet profiles.
//!
//! Two sources: seed 004's profile file (`NAME|HOST|USER|LOCAL_PORT|REMOTE_HOST|REMOTE_PORT|
//! DESCRIPTION`) and OpenSSH (or autossh) command lines such as seed 000's `ssh -i KEY -p 443
//! -R … -L … -o … user@host`, as found in scripts and unit files. Migration is where silent
//! changes hurt, so everything that is not carried over verbatim comes back as a [`Note`]: an
//! option tunnelfleet replaces (StrictHostKeyChecking=no: host keys are always verified), one
//! it implies (-N, BatchMode), and one it does not support (-J). Pure text in, text out; the
//! CLI writes the TOML and prints the notes.
//!
//! # Layout
//! - this module: the result, the input's logical lines, and what both formats share.
//! - `pipe`: seed 004's `|` lines.
//! - `ssh`: `ssh`/`autossh` command lines.

mod pipe;
mod ssh;

use std::path::PathBuf;

use serde::Serialize;
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_protocol::addr::valid_name;

use pipe::pipe_line;
use ssh::{ssh_line, ssh_start};

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
    /// What could not be imported, and why.
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
pub(super) fn words(line: &str) -> Vec<String> {
    shlex::split(line).unwrap_or_else(|| line.split_whitespace().map(str::to_string).collect())
}

/// A profile with tunnelfleet's defaults for what the source does not set.
pub(super) fn base_profile(name: &str, defaults: &Defaults) -> ProfileSpec {
    let mut p = ProfileSpec::new(name, "", defaults.identity_file.clone());
    p.known_hosts = Some(defaults.known_hosts.clone());
    p
}

/// `host:port`, with IPv6 literals bracketed.
pub(super) fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A profile name from a host: `oma-10-245-246-125`.
pub(super) fn derive_name(host: &str) -> String {
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
    use std::time::Duration;

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
