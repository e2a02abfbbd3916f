//! The outbox worker: one task per hook drains that hook's durable entries in order, retries
//! with capped exponential backoff, and counts what happened for `tunnelfleet alerts hooks`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tunnelfleet_runtime::backoff::Backoff;
use tunnelfleet_runtime::clock::now_unix_ms;

use super::hook::Hook;
use crate::store::Store;

/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What `tunnelfleet alerts hooks` shows per hook.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HookStats {
    /// The hook's name.
    pub name: String,
    /// Its kind (`webhook`, `slack`, …).
    pub kind: String,
    /// Deliveries accepted since the coordinator started.
    pub delivered: u64,
    /// Failed attempts since the coordinator started.
    pub failed_attempts: u64,
    /// Entries waiting in the outbox.
    pub pending: usize,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the last delivery was accepted (Unix ms).
    pub last_delivered_unix_ms: Option<u64>,
}

/// The outbox worker: one task per hook.
pub struct Outbox {
    store: Store,
    hooks: Vec<Hook>,
    wake: Notify,
    stats: Mutex<BTreeMap<String, HookStats>>,
}

impl Outbox {
    /// A worker over `store` for `hooks`.
    pub fn new(store: Store, hooks: Vec<Hook>) -> Arc<Outbox> {
        let stats = hooks
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    HookStats {
                        name: h.name.clone(),
                        kind: format!("{:?}", h.kind).to_lowercase(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        Arc::new(Outbox {
            store,
            hooks,
            wake: Notify::new(),
            stats: Mutex::new(stats),
        })
    }

    /// Names of the configured hooks (every alert state goes to each).
    pub fn names(&self) -> Vec<String> {
        self.hooks.iter().map(|h| h.name.clone()).collect()
    }

    /// New entries were written: look now.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Per-hook counters with the outbox's current backlog.
    pub fn stats(&self) -> Vec<HookStats> {
        let mut v: Vec<HookStats> = self.lock().values().cloned().collect();
        for s in &mut v {
            s.pending = self.store.backlog(&s.name);
        }
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, HookStats>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers until `shutdown`; entries of hooks no longer configured are dropped with a
    /// warning (nobody could ever take them).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let known: Vec<String> = self.names();
        if let Ok(all) = self.store.deliveries() {
            for d in all.iter().filter(|d| !known.contains(&d.hook)) {
                tracing::warn!(hook = %d.hook, key = %d.idempotency_key, "hook no longer configured; dropping its queued delivery");
                let _ = self.store.delivered(d).await;
            }
        }
        let mut tasks = Vec::new();
        for hook in self.hooks.clone() {
            let me = self.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(
                async move { me.run_hook(hook, shutdown).await },
            ));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn run_hook(&self, hook: Hook, shutdown: CancellationToken) {
        // At start, try the backlog at once: the receiver may have been fixed while the
        // coordinator was down.
        let mut fresh = true;
        loop {
            // Register for a wake-up before looking, so an entry written meanwhile is seen.
            let woken = self.wake.notified();
            let head = match self.store.next_delivery(&hook.name) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(hook = %hook.name, "reading the outbox: {e}");
                    None
                }
            };
            let wait = match &head {
                None => Duration::from_secs(5),
                Some(_) if fresh => Duration::ZERO,
                Some(d) => {
                    Duration::from_millis(d.next_attempt_unix_ms.saturating_sub(now_unix_ms()))
                }
            };
            if head.is_none() || !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = woken => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let Some(mut d) = head else { continue };
            fresh = false;
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = hook.deliver(&d) => r,
            };
            match result {
                Ok(()) => {
                    if let Err(e) = self.store.delivered(&d).await {
                        tracing::error!(hook = %hook.name, "outbox: {e}");
                    }
                    tracing::info!(hook = %hook.name, alert = d.alert.id, key = %d.idempotency_key, attempts = d.attempts + 1, "alert delivered");
                    let mut s = self.lock();
                    if let Some(s) = s.get_mut(&hook.name) {
                        s.delivered += 1;
                        s.last_delivered_unix_ms = Some(now_unix_ms());
                    }
                }
                Err(e) => {
                    d.attempts += 1;
                    let delay = backoff(d.attempts);
                    d.next_attempt_unix_ms = now_unix_ms() + delay.as_millis() as u64;
                    tracing::warn!(hook = %hook.name, alert = d.alert.id, attempts = d.attempts, retry_in = ?delay, "alert delivery failed: {e}");
                    let e = e.to_string();
                    d.last_error = Some(e.clone());
                    if let Err(e) = self.store.delivery_failed(&d).await {
                        tracing::error!(hook = %hook.name, "outbox: {e}");
                    }
                    let mut s = self.lock();
                    if let Some(s) = s.get_mut(&hook.name) {
                        s.failed_attempts += 1;
                        s.last_error = Some(e);
                    }
                }
            }
        }
    }
}

/// The wait before a delivery's next attempt after `attempts` failed ones: the fleet's one
/// [`Backoff`] (full jitter between 1 s and 1 s, 2 s, 4 s … capped at [`MAX_BACKOFF`]), so a
/// recovering receiver is not hit by every queued entry in the same instant.
fn backoff(attempts: u32) -> Duration {
    Backoff::new(Duration::from_secs(1), MAX_BACKOFF)
        .after(attempts.saturating_sub(1))
        .next_delay()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        let mut longest = Duration::ZERO;
        for _ in 0..200 {
            let d = backoff(3);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(4),
                "{d:?}"
            );
            longest = longest.max(d);
        }
        // Full jitter reaches toward the ceiling, not only the floor.
        assert!(longest > Duration::from_secs(2), "{longest:?}");
        assert!(backoff(40) <= MAX_BACKOFF);
    }
}
