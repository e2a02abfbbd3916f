//! The sessions an OMA's sshd holds for the fleet's agents, and ending those of revoked agents
//! (`tunnelfleet oma sync`). sshd reads `RevokedKeys` only when a session logs in, so a revoked
//! agent's open sessions (and the reverse ports they hold) stay until something ends them.
//!
//! Which agent a session belongs to is proved by two sources that must agree:
//! - sshd's log: every certificate login reads `Accepted publickey for USER from ADDR port PORT
//!   ssh2: ED25519-CERT SHA256:… ID <key id> (serial N) CA …`, and the key id is the agent id
//!   the fleet's CA wrote into the certificate;
//! - the kernel's TCP table: the connection from `ADDR:PORT` is established and its socket is
//!   held by sshd processes (the session's monitor and its child).
//!
//! A connection is ended only when it is established, held by sshd, and the last login sshd
//! logged from that address and port is a revoked agent's (a later login from the same address
//! and port, after a NAT reused it, is somebody else's). Its sshd processes get SIGTERM (the
//! monitor passes it to its child), then SIGKILL if they are still there after
//! [`TERM_GRACE`].
//!
//! Reading another process's descriptors needs root with `CAP_SYS_PTRACE` (sshd makes itself
//! non-dumpable) and signalling the session's child `CAP_KILL`; the OMA's sync unit keeps those
//! two.

use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// How long a session's processes get to leave after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// The names sshd's session processes run under (`sshd-session`, `sshd-auth` since OpenSSH
/// 9.8).
const SSHD_NAMES: [&str; 3] = ["sshd", "sshd-session", "sshd-auth"];

/// What went wrong finding or ending sessions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sshd's log could not be read.
    #[error("sshd log {source_name}: {why}")]
    Log {
        /// The source (`journal` or the file).
        source_name: String,
        /// Why.
        why: String,
    },
    /// The kernel's process or TCP tables could not be read.
    #[error("/proc: {0}")]
    Proc(String),
}

/// Where sshd's log is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSource {
    /// The systemd journal (`journalctl -t sshd -t sshd-session`), as on a stock Debian.
    Journal,
    /// A file sshd's lines are in (`/var/log/auth.log` with rsyslog, or `sshd -E FILE`).
    File(PathBuf),
}

impl std::str::FromStr for LogSource {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "journal" => LogSource::Journal,
            path => LogSource::File(PathBuf::from(path)),
        })
    }
}

impl std::fmt::Display for LogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogSource::Journal => f.write_str("journal"),
            LogSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One certificate login sshd logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The certificate's key id: the agent id.
    pub agent: String,
    /// The certificate's serial.
    pub serial: u64,
    /// The client's address and port, as sshd saw them.
    pub from: SocketAddr,
}

/// The login in one line of sshd's log, if it is a certificate login.
pub fn parse_login(line: &str) -> Option<Login> {
    let rest = &line[line.find("Accepted publickey for ")?..];
    let (_, rest) = rest.split_once(" from ")?;
    let (addr, rest) = rest.split_once(" port ")?;
    let (port, rest) = rest.split_once(' ')?;
    let ip: IpAddr = addr.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    // "ssh2: ED25519-CERT SHA256:… ID <key id> (serial N) CA …": a plain key has no ID.
    let (kind, rest) = rest.strip_prefix("ssh2: ")?.split_once(' ')?;
    if !kind.ends_with("-CERT") {
        return None;
    }
    let (_, rest) = rest.split_once(" ID ")?;
    let (agent, rest) = rest.split_once(" (serial ")?;
    let (serial, _) = rest.split_once(')')?;
    if agent.is_empty() || agent.contains(char::is_whitespace) {
        return None;
    }
    Some(Login {
        agent: agent.to_string(),
        serial: serial.parse().ok()?,
        from: SocketAddr::new(ip.to_canonical(), port),
    })
}

/// The last certificate login logged from each client address and port.
pub fn last_logins(log: impl BufRead) -> std::io::Result<HashMap<SocketAddr, Login>> {
    let mut logins = HashMap::new();
    let mut log = log;
    let mut line = Vec::new();
    loop {
        line.clear();
        if log.read_until(b'\n', &mut line)? == 0 {
            return Ok(logins);
        }
        if let Some(l) = parse_login(&String::from_utf8_lossy(&line)) {
            logins.insert(l.from, l);
        }
    }
}

/// An established TCP connection held by sshd processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The client's address and port.
    pub from: SocketAddr,
    /// The sshd processes holding its socket.
    pub pids: Vec<i32>,
    /// When the oldest of them started.
    pub started: SystemTime,
}

/// The established TCP connections sshd holds, from the kernel's tables.
pub fn sshd_connections() -> Result<Vec<Connection>, Error> {
    let proc_err = |e: procfs::ProcError| Error::Proc(e.to_string());
    let mut by_inode: HashMap<u64, SocketAddr> = HashMap::new();
    for entry in procfs::net::tcp()
        .map_err(proc_err)?
        .into_iter()
        .chain(procfs::net::tcp6().map_err(proc_err)?)
    {
        if entry.state == procfs::net::TcpState::Established && entry.inode != 0 {
            let from = SocketAddr::new(
                entry.remote_address.ip().to_canonical(),
                entry.remote_address.port(),
            );
            by_inode.insert(entry.inode, from);
        }
    }
    let boot = procfs::boot_time_secs().map_err(proc_err)?;
    let ticks = procfs::ticks_per_second().max(1);
    let mut connections: HashMap<SocketAddr, Connection> = HashMap::new();
    for process in procfs::process::all_processes().map_err(proc_err)? {
        // A process that left meanwhile, or one we may not read, is not sshd's session.
        let Ok(process) = process else { continue };
        let Ok(stat) = process.stat() else { continue };
        if !SSHD_NAMES.contains(&stat.comm.as_str()) {
            continue;
        }
        let Ok(fds) = process.fd() else { continue };
        let started = SystemTime::UNIX_EPOCH
            + Duration::from_secs(boot)
            + Duration::from_millis(stat.starttime.saturating_mul(1000) / ticks);
        for fd in fds.flatten() {
            let procfs::process::FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            let Some(&from) = by_inode.get(&inode) else {
                continue;
            };
            let c = connections.entry(from).or_insert(Connection {
                from,
                pids: Vec::new(),
                started,
            });
            if !c.pids.contains(&stat.pid) {
                c.pids.push(stat.pid);
            }
            c.started = c.started.min(started);
        }
    }
    let mut connections: Vec<Connection> = connections.into_values().collect();
    connections.sort_by_key(|c| c.from);
    Ok(connections)
}

/// sshd's certificate logins since `since`, the last per client address and port.
pub fn read_logins(
    source: &LogSource,
    since: SystemTime,
) -> Result<HashMap<SocketAddr, Login>, Error> {
    let err = |why: String| Error::Log {
        source_name: source.to_string(),
        why,
    };
    match source {
        LogSource::File(path) => {
            let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
            last_logins(std::io::BufReader::new(file)).map_err(|e| err(e.to_string()))
        }
        LogSource::Journal => {
            let secs = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                // A second earlier: the login is logged a moment after the process starts.
                .saturating_sub(1);
            let mut child = std::process::Command::new("journalctl")
                .args(["--no-pager", "--quiet", "--output=cat"])
                .args(["--identifier=sshd", "--identifier=sshd-session"])
                .arg(format!("--since=@{secs}"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| err(format!("cannot run journalctl: {e}")))?;
            let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take())
            else {
                return Err(err("journalctl has no output".into()));
            };
            // Its complaints read beside its lines, so that neither pipe can fill and stall it.
            let complaints = std::thread::spawn(move || {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
                text
            });
            let logins = last_logins(std::io::BufReader::new(stdout));
            if logins.is_err() {
                // Nobody reads the rest: it must not wait on a full pipe.
                let _ = child.kill();
            }
            let status = child.wait().map_err(|e| err(format!("journalctl: {e}")))?;
            let complaints = complaints.join().unwrap_or_default();
            if !status.success() && logins.is_ok() {
                return Err(err(format!("journalctl {status}: {}", complaints.trim())));
            }
            logins.map_err(|e| err(e.to_string()))
        }
    }
}

/// A session of a revoked agent that was ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Closed {
    /// The agent.
    pub agent: String,
    /// The serial of the certificate it logged in with.
    pub serial: u64,
    /// The client's address and port.
    pub from: SocketAddr,
    /// sshd's processes of the session.
    pub pids: Vec<i32>,
}

/// The connections to end: those whose last logged login is an agent in `revoked`.
pub fn to_close(
    connections: &[Connection],
    logins: &HashMap<SocketAddr, Login>,
    revoked: &BTreeSet<String>,
) -> Vec<Closed> {
    connections
        .iter()
        .filter_map(|c| {
            let login = logins.get(&c.from)?;
            revoked.contains(&login.agent).then(|| Closed {
                agent: login.agent.clone(),
                serial: login.serial,
                from: c.from,
                pids: c.pids.clone(),
            })
        })
        .collect()
}

/// Ends the sessions sshd holds for agents in `revoked`, read from `source`; returns them.
pub fn close_revoked(source: &LogSource, revoked: &BTreeSet<String>) -> Result<Vec<Closed>, Error> {
    if revoked.is_empty() {
        return Ok(Vec::new());
    }
    let connections = sshd_connections()?;
    let Some(oldest) = connections.iter().map(|c| c.started).min() else {
        return Ok(Vec::new());
    };
    let logins = read_logins(source, oldest)?;
    let closed = to_close(&connections, &logins, revoked);
    let pids: Vec<i32> = closed.iter().flat_map(|c| c.pids.clone()).collect();
    end_processes(&pids);
    Ok(closed)
}

/// SIGTERM to each of `pids`, then SIGKILL to those still there after [`TERM_GRACE`].
fn end_processes(pids: &[i32]) {
    use rustix::process::{Pid, Signal, kill_process};
    let pids: Vec<Pid> = pids.iter().filter_map(|&p| Pid::from_raw(p)).collect();
    for &pid in &pids {
        // Gone already is as good as ended.
        let _ = kill_process(pid, Signal::TERM);
    }
    let deadline = std::time::Instant::now() + TERM_GRACE;
    let alive =
        |pid: &Pid| std::path::Path::new(&format!("/proc/{}", pid.as_raw_nonzero())).exists();
    while pids.iter().any(alive) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids.iter().filter(|p| alive(p)) {
        let _ = kill_process(*pid, Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    const CERT_LOGIN: &str = "Accepted publickey for tunnel from 198.18.0.7 port 40022 ssh2: \
        ED25519-CERT SHA256:n0CbcXq1 ID vma-233 (serial 17) CA ED25519 SHA256:caFingerprint";

    #[test]
    fn a_certificate_login_names_the_agent_serial_and_address() {
        for prefix in ["", "Dec  7 11:02:03 oma1 sshd[4242]: "] {
            let l = parse_login(&format!("{prefix}{CERT_LOGIN}")).unwrap();
            assert_eq!(l.agent, "vma-233");
            assert_eq!(l.serial, 17);
            assert_eq!(l.from, "198.18.0.7:40022".parse().unwrap());
        }
        let v6 = CERT_LOGIN.replace("198.18.0.7", "::ffff:198.18.0.7");
        assert_eq!(
            parse_login(&v6).unwrap().from,
            "198.18.0.7:40022".parse().unwrap()
        );
    }

    #[test]
    fn other_lines_are_no_certificate_login() {
        for line in [
            "Accepted publickey for tunnel from 198.18.0.7 port 40022 ssh2: ED25519 SHA256:abc",
            "Failed publickey for tunnel from 198.18.0.7 port 40022 ssh2: ED25519-CERT SHA256:x ID vma-1 (serial 1) CA",
            "Accepted publickey for tunnel from nowhere port 1 ssh2: ED25519-CERT SHA256:x ID vma-1 (serial 1) CA",
            "Accepted publickey for tunnel from 198.18.0.7 port 40022 ssh2: ED25519-CERT SHA256:x ID  (serial 1) CA",
            "Connection closed by 198.18.0.7 port 40022",
        ] {
            assert_eq!(parse_login(line), None, "{line}");
        }
    }

    #[test]
    fn the_last_login_from_an_address_counts() {
        let log = format!(
            "{CERT_LOGIN}\n{}\nnoise\n",
            CERT_LOGIN.replace("vma-233 (serial 17)", "vma-9 (serial 30)")
        );
        let logins = last_logins(log.as_bytes()).unwrap();
        assert_eq!(logins.len(), 1);
        assert_eq!(logins.values().next().unwrap().agent, "vma-9");
    }

    #[test]
    fn only_connections_of_revoked_agents_are_closed() {
        let from = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let connection = |addr: &str, pid: i32| Connection {
            from: from(addr),
            pids: vec![pid, pid + 1],
            started: SystemTime::UNIX_EPOCH,
        };
        let log = format!(
            "{CERT_LOGIN}\n{}\n{}\n",
            CERT_LOGIN
                .replace("40022", "40023")
                .replace("vma-233", "vma-1"),
            // Logged, but its connection is gone: nothing to end.
            CERT_LOGIN.replace("40022", "40024")
        );
        let logins = last_logins(log.as_bytes()).unwrap();
        let connections = [
            connection("198.18.0.7:40022", 100),
            connection("198.18.0.7:40023", 200),
            // Held by sshd but never logged in (still authenticating): left alone.
            connection("198.18.0.7:40025", 300),
        ];
        let revoked: BTreeSet<String> = ["vma-233".to_string()].into();
        let closed = to_close(&connections, &logins, &revoked);
        assert_eq!(
            closed,
            vec![Closed {
                agent: "vma-233".into(),
                serial: 17,
                from: from("198.18.0.7:40022"),
                pids: vec![100, 101],
            }]
        );
        assert!(to_close(&connections, &logins, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_log_source_is_the_journal_or_a_file() {
        assert_eq!("journal".parse::<LogSource>().unwrap(), LogSource::Journal);
        assert_eq!(
            "/var/log/auth.log".parse::<LogSource>().unwrap(),
            LogSource::File("/var/log/auth.log".into())
        );
    }
}
