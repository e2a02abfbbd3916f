//! `standby = "warm"`: the session held open to the endpoint a profile would go to next.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::dial;
use crate::ssh::{SessionParams, SshSession};
use tunnelfleet_runtime::backoff::Backoff;

/// `standby = "warm"`: a second authenticated session held open (and kept alive by the same
/// keepalive) to the endpoint the profile would go to next, with no forwards bound, so a
/// failover to it is only the forward setup. A task keeps it: redialled with backoff when it
/// dies or the target changes; the runner takes it when it moves there.
pub(super) struct WarmStandby {
    target: watch::Sender<Option<(String, u16)>>,
    slot: WarmSlot,
}

/// The warm session and the endpoint it is to.
type WarmSlot = Arc<std::sync::Mutex<Option<((String, u16), SshSession)>>>;

impl WarmStandby {
    pub(super) fn start(
        params: SessionParams,
        cancel: CancellationToken,
        mut backoff: Backoff,
    ) -> Self {
        let (target, mut rx) = watch::channel(None::<(String, u16)>);
        let slot: WarmSlot = Arc::default();
        let held = slot.clone();
        tokio::spawn(async move {
            let lock = || held.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let want = rx.borrow_and_update().clone();
                if let Some((host, port)) = want.clone() {
                    let ok = lock()
                        .as_ref()
                        .is_some_and(|(t, s)| Some(t) == want.as_ref() && !s.handle.is_closed());
                    if !ok {
                        // Not the one wanted, or dead: dropped, and the wanted one dialled.
                        *lock() = None;
                        let dialled = tokio::select! {
                            _ = cancel.cancelled() => return,
                            r = dial::connect(&params, &host, port) => r,
                        };
                        match dialled {
                            Ok(session) => {
                                tracing::info!(profile = %params.profile, endpoint = %format!("{host}:{port}"), "warm standby session up");
                                backoff.reset();
                                *lock() = Some(((host, port), session));
                            }
                            Err(e) => {
                                tracing::debug!(profile = %params.profile, "warm standby: {e}");
                                tokio::select! {
                                    _ = cancel.cancelled() => return,
                                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                                    r = rx.changed() => if r.is_err() { return },
                                }
                                continue;
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                    // A dead session is noticed within a second (keepalive declared it dead).
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        WarmStandby { target, slot }
    }

    /// Holds a session to `to` from now on (None: none).
    pub(super) fn aim(&self, to: Option<(String, u16)>) {
        self.target.send_if_modified(|t| {
            let changed = *t != to;
            *t = to;
            changed
        });
    }

    /// The held session, if it is to `host:port` and alive.
    pub(super) fn take(&self, host: &str, port: u16) -> Option<SshSession> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some((t, s)) if t.0 == host && t.1 == port && !s.handle.is_closed() => {
                // Nothing is wanted until the runner aims again: the task would otherwise dial
                // the endpoint just taken (a second login there) before it is told the next.
                self.target.send_replace(None);
                Some(s)
            }
            other => {
                *slot = other;
                None
            }
        }
    }
}
