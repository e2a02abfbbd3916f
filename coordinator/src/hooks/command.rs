//! The command hook: a local program gets the alert JSON on stdin and its state in the
//! environment; exit 0 is delivered.

use std::time::Duration;

use super::error::DeliveryError;
use super::format::webhook_body;
use crate::store::Delivery;

/// What of the program's stderr is kept for the error (the rest is read and dropped).
const STDERR_KEPT: usize = 4096;

/// Runs `command` (program and arguments) for `d`, killed after `timeout` (writing stdin and
/// reading stderr included). Its environment is clean: `PATH` and the alert's variables, nothing
/// of the coordinator's (its credentials, OTLP headers).
pub async fn run(command: &[String], timeout: Duration, d: &Delivery) -> Result<(), DeliveryError> {
    let Some((program, args)) = command.split_first() else {
        return Err(DeliveryError::Transport("no command".into()));
    };
    let failed = |reason: String| DeliveryError::Command {
        program: program.clone(),
        reason,
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("TUNNELFLEET_ALERT_STATUS", d.alert.status.as_str())
        .env("TUNNELFLEET_IDEMPOTENCY_KEY", &d.idempotency_key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    let mut child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
    let body = webhook_body(d);
    let run = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stdin = child.stdin.take();
        let mut stderr = child.stderr.take();
        let write = async {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(&body).await;
            }
            // Closed: the program sees the end of its input.
            drop(stdin);
        };
        let read = async {
            let mut kept = Vec::new();
            if let Some(e) = stderr.as_mut() {
                let mut buf = [0u8; 4096];
                while let Ok(n) = e.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let room = STDERR_KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
            kept
        };
        let ((), err) = tokio::join!(write, read);
        (child.wait().await, err)
    };
    let (status, err) = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| failed(format!("still running after {timeout:?}; killed")))?;
    let status = status.map_err(|e| failed(e.to_string()))?;
    if status.success() {
        Ok(())
    } else {
        let err: String = String::from_utf8_lossy(&err).chars().take(200).collect();
        Err(failed(format!("exited with {status}: {}", err.trim())))
    }
}
