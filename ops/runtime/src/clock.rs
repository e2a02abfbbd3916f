//! Wall-clock time as the records and reports carry it: milliseconds since the Unix epoch.
//! Timing decisions use `tokio::time::Instant` (monotonic, pausable in tests), never this.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch; 0 for a clock set before 1970.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
