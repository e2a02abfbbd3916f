//! Polling with a deadline, never a sleep that hopes. The demo and the tests use it.

/// A condition that did not become true in time.
#[derive(Debug, thiserror::Error)]
#[error("not reached within {secs}s: {what}")]
pub struct WaitTimeout {
    /// What was waited for.
    pub what: String,
    /// For how long.
    pub secs: u64,
}

/// Polls `cond` every 50 ms until it is true or `secs` pass (polling with a deadline, never a
/// sleep that hopes); returns how long it took.
pub async fn wait_until<F, Fut>(
    secs: u64,
    what: &str,
    mut cond: F,
) -> Result<std::time::Duration, WaitTimeout>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + std::time::Duration::from_secs(secs);
    loop {
        if cond().await {
            return Ok(start.elapsed());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(WaitTimeout {
                what: what.to_string(),
                secs,
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
