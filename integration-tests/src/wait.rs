//! Polling with a deadline instead of sleeping (the rule is `tunnelfleet_ops::wait::wait_until`,
//! which the demo uses too; here a timeout fails the test).

use std::future::Future;

/// Polls `cond` every 50 ms until it is true or `secs` pass; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(secs: u64, what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    match tunnelfleet_ops::wait::wait_until(secs, what, cond).await {
        // Shown with --nocapture: where a slow test spends its time.
        Ok(took) => eprintln!("waited {took:?} for: {what}"),
        Err(_) => panic!("timed out after {secs}s waiting for: {what}"),
    }
}
