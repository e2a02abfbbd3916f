//! The event log: what changed in the fleet and why, oldest first.
use serde::{Deserialize, Serialize};
use tunnelfleet_runtime::clock::now_unix_ms;

use super::{Store, StoreError, decode, json, u64_of};

/// One event-log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number.
    pub seq: u64,
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// What happened.
    pub text: String,
}

impl Store {
    /// The last `n` events, oldest first.
    pub fn events(&self, n: usize) -> Result<Vec<Event>, StoreError> {
        let mut v: Vec<Event> = self
            .events
            .iter()
            .rev()
            .take(n)
            .map(|r| {
                let (k, v) = r?;
                decode(&v, "events", &u64_of(&k).to_string())
            })
            .collect::<Result<_, _>>()?;
        v.reverse();
        Ok(v)
    }

    /// Appends an event to the log (durable before return).
    pub async fn log_event(&self, text: &str) -> Result<(), StoreError> {
        let seq = self.db.generate_id()?;
        let event = json(&Event {
            seq,
            at_unix_ms: now_unix_ms(),
            text: text.to_string(),
        });
        self.events.insert(seq.to_be_bytes(), event)?;
        self.durable().await
    }
}
