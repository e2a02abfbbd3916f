//! `reclaim_remote_ports`: ending this account's own stale session that still holds an `R` port.
//!
//! After a blackhole, the OMA's sshd keeps the session it lost (its defaults send no
//! ClientAlive probes), and with it the port of the reverse forward: the new session's request
//! is refused until someone kills that process by hand. When a profile opts in, the agent runs
//! one small POSIX shell script over its new session: it finds the sshd processes listening on
//! the port (`ss -ltnp`), keeps only those of the same account (`[ -O /proc/PID ]`) whose
//! command is sshd's and which are not the session running the script (its `$PPID`), and sends
//! them SIGTERM. It never touches another account's processes (the kernel would refuse anyway)
//! and reports plainly when the account cannot run commands. The agent only asks when it holds
//! no other session to that endpoint, so the listener found is one whose client is gone.

use std::time::Duration;

use russh::ChannelMsg;
use russh::client::Handle;

use crate::ssh::ClientHandler;

/// How long the script may take (it reads /proc and runs `ss` once).
pub const RECLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a port could not be reclaimed.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    /// The server would not run the script (a restricted account: `restrict`, `command=`,
    /// ForceCommand, no shell).
    #[error(
        "reclaim_remote_ports: the server would not run a command for this account ({0}); end the stale session on the OMA by hand, or install ops/deploy/oma/ so sshd drops it within 15 s"
    )]
    CannotRun(String),
    /// The script ran and found nothing of ours to end.
    #[error("reclaim_remote_ports: {0}")]
    NothingOurs(String),
    /// It did not finish in time.
    #[error("reclaim_remote_ports: the server did not answer within {RECLAIM_TIMEOUT:?}")]
    Timeout,
}

/// The script, for `port`. Its last line is the verdict: `killed: PIDS`, `none: why`, or
/// `error: why`.
pub fn script(port: u16) -> String {
    format!(
        r#"port={port}; me=$PPID
command -v ss >/dev/null 2>&1 || {{ echo "error: ss (iproute2) is not installed on the server"; exit 3; }}
pids=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u)
killed=""; other=""
for pid in $pids; do
  [ "$pid" = "$me" ] && continue
  if [ ! -O "/proc/$pid" ]; then other="$other $pid"; continue; fi
  case "$(cat "/proc/$pid/comm" 2>/dev/null)" in sshd*) ;; *) other="$other $pid"; continue;; esac
  kill -TERM "$pid" 2>/dev/null && killed="$killed $pid"
done
if [ -n "$killed" ]; then echo "killed:$killed"; exit 0; fi
if [ -n "$other" ]; then echo "none: port $port is held by processes that are not this account's sshd sessions (pids$other)"; exit 4; fi
echo "none: no session of this account listens on port $port"; exit 4
"#
    )
}

/// Runs the script over `handle`; the pids it ended.
pub async fn reclaim(handle: &Handle<ClientHandler>, port: u16) -> Result<Vec<u32>, ReclaimError> {
    tokio::time::timeout(RECLAIM_TIMEOUT, run(handle, port))
        .await
        .unwrap_or(Err(ReclaimError::Timeout))
}

async fn run(handle: &Handle<ClientHandler>, port: u16) -> Result<Vec<u32>, ReclaimError> {
    let cannot = |e: russh::Error| ReclaimError::CannotRun(e.to_string());
    let mut channel = handle.channel_open_session().await.map_err(cannot)?;
    channel.exec(true, script(port)).await.map_err(cannot)?;
    let mut out = Vec::new();
    let mut refused = false;
    let mut status = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } if out.len() < 64 * 1024 => out.extend_from_slice(&data),
            ChannelMsg::Failure => refused = true,
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let text = String::from_utf8_lossy(&out);
    verdict(&text, status, refused)
}

/// What the script's output says.
pub fn verdict(out: &str, status: Option<u32>, refused: bool) -> Result<Vec<u32>, ReclaimError> {
    if refused {
        return Err(ReclaimError::CannotRun("exec request refused".into()));
    }
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if let Some(pids) = last.strip_prefix("killed:") {
        return Ok(pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect());
    }
    if let Some(why) = last.strip_prefix("none: ") {
        return Err(ReclaimError::NothingOurs(why.to_string()));
    }
    if let Some(why) = last.strip_prefix("error: ") {
        return Err(ReclaimError::CannotRun(why.to_string()));
    }
    let said: String = last.chars().take(200).collect();
    Err(ReclaimError::CannotRun(match status {
        Some(code) => format!("exit status {code}: {said:?}"),
        None => format!("no exit status: {said:?}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(
            verdict("killed: 12 34\n", Some(0), false).unwrap(),
            vec![12, 34]
        );
        assert!(matches!(
            verdict("none: no session of this account listens on port 9081\n", Some(4), false),
            Err(ReclaimError::NothingOurs(w)) if w.contains("9081")
        ));
        assert!(matches!(
            verdict("error: ss (iproute2) is not installed on the server\n", Some(3), false),
            Err(ReclaimError::CannotRun(w)) if w.contains("ss")
        ));
        // A restricted account (ForceCommand, `command=`) prints something else or nothing.
        assert!(matches!(
            verdict("This account is restricted\n", Some(1), false),
            Err(ReclaimError::CannotRun(w)) if w.contains("exit status 1")
        ));
        assert!(matches!(
            verdict("", None, true),
            Err(ReclaimError::CannotRun(_))
        ));
    }

    #[test]
    fn the_script_is_posix_sh() {
        // `sh -n` parses without running: a typo would fail here, not on an OMA.
        let out = std::process::Command::new("sh")
            .args(["-n", "-c", &script(9081)])
            .output()
            .expect("sh");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
