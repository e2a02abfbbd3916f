//! Polling with a deadline instead of sleeping (the rule is `tunnelfleet_standins::wait::wait_until`,
//! which the demo uses too; here a timeout fails the test).

use std::future::Future;

/// Polls `cond` every 50 ms until it is true or `secs` pass; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    match tunnelfleet_standins::wait::wait_until(secs, what, cond).await {
        // Shown with --nocapture: where a slow test spends its time.
        Ok(took) => eprintln!("waited {took:?} for: {what}"),
        Err(_) => panic!("timed out after {secs}s waiting for: {what}"),
    }
}

/// Blocking polls of `attempt` every 20 ms until it gives a value or `secs` pass (for tests
/// without a runtime: a file lock let go a moment after its handle's drop); panics with `what`
/// on timeout.
pub fn retry_until<T>(secs: u64, what: &str, mut attempt: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = attempt() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {secs}s waiting for: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
