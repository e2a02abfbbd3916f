//! Polling with a deadline instead of sleeping.

use std::future::Future;
use std::time::Duration;

/// Polls `cond` every 50 ms until it is true or `secs` pass; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(secs);
    loop {
        if cond().await {
            // Shown with --nocapture: where a slow test spends its time.
            eprintln!("waited {:?} for: {what}", start.elapsed());
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
