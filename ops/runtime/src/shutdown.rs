//! Asking the agent to stop: SIGTERM or SIGINT become one cancellation token.
//!
//! Everything long-lived takes a `CancellationToken`; the binary cancels it on a signal and the
//! library's `run` then stops in order (control socket, profiles with their drain). Tests cancel
//! the same token instead of sending signals.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{which} received: shutting down");
        t.cancel();
    });
    Ok(token)
}
