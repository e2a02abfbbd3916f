//! The command hook: a local program gets the alert JSON on stdin and its state in the
//! environment; exit 0 is delivered.

use std::time::Duration;

use super::error::DeliveryError;
use super::format::webhook_body;
use crate::store::Delivery;

/// Runs `command` (program and arguments) for `d`, killed after `timeout`.
pub async fn run(command: &[String], timeout: Duration, d: &Delivery) -> Result<(), DeliveryError> {
    use tokio::io::AsyncWriteExt;
    let Some((program, args)) = command.split_first() else {
        return Err(DeliveryError::Transport("no command".into()));
    };
    let failed = |reason: String| DeliveryError::Command {
        program: program.clone(),
        reason,
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("TUNNELFLEET_ALERT_STATUS", d.alert.status.as_str())
        .env("TUNNELFLEET_IDEMPOTENCY_KEY", &d.idempotency_key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    let body = webhook_body(d);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| failed(format!("still running after {timeout:?}; killed")))?
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        let err: String = String::from_utf8_lossy(&out.stderr)
            .chars()
            .take(200)
            .collect();
        Err(failed(format!(
            "exited with {}: {}",
            out.status,
            err.trim()
        )))
    }
}
