//! systemd integration for both daemons: `Type=notify` readiness, a watchdog fed from the
//! async runtime, and STOPPING on shutdown.
//!
//! READY is sent only once everything that can fail at start has succeeded (config, keys,
//! sockets), so `systemctl start` fails when the service cannot run instead of reporting a
//! service that dies a moment later. The watchdog is fed by a task on the same runtime as the
//! tunnels: a wedged runtime stops feeding it and systemd restarts the service. Outside systemd
//! (`NOTIFY_SOCKET` unset) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd the service is up, with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!("systemd notify (READY): {e}");
    }
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Stopping]) {
        tracing::warn!("systemd notify (STOPPING): {e}");
    }
}

/// When the unit has `WatchdogSec=`, feeds the watchdog at half its period until `shutdown`.
pub fn spawn_watchdog(shutdown: CancellationToken) -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()?;
    let every = (period / 2).max(Duration::from_millis(10));
    tracing::info!(?period, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                        tracing::warn!("systemd notify (WATCHDOG): {e}");
                    }
                }
            }
        }
    }))
}
