//! Faults as processes see them: signals to a process, its group, its descendants.

use std::process::{Command, Stdio};

/// Sends a signal with kill(1) (no unsafe code in the workspace).
pub fn signal(pid: u32, sig: i32) {
    signal_target(&pid.to_string(), sig)
}

/// Sends `sig` to every process of the process group `pgid`.
pub fn signal_group(pgid: u32, sig: i32) {
    signal_target(&format!("-{pgid}"), sig)
}

pub(crate) fn signal_target(target: &str, sig: i32) {
    let name = match sig {
        libc::SIGKILL => "KILL",
        libc::SIGSTOP => "STOP",
        libc::SIGCONT => "CONT",
        libc::SIGTERM => "TERM",
        _ => "INT",
    };
    let _ = Command::new("kill")
        .args([format!("-{name}"), "--".into(), target.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// All descendants of `pid`, from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            break;
        };
        for e in entries.flatten() {
            let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // Field 4 (after the ")" closing the command name) is the parent pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if ppid == Some(p) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}
