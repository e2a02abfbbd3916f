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
        self.log_event_at(text, now_unix_ms()).await
    }

    async fn log_event_at(&self, text: &str, now: u64) -> Result<(), StoreError> {
        let seq = self.db.generate_id().await?;
        let event = json(&Event {
            seq,
            at_unix_ms: now,
            text: text.to_string(),
        });
        self.events.insert(seq.to_be_bytes(), event)?;
        self.prune_events(now)?;
        self.durable().await
    }

    /// Drops events older than [`EVENT_RETENTION`], oldest first, a bounded number per call
    /// (each new event pays for a few old ones): the log does not grow for ever.
    fn prune_events(&self, now: u64) -> Result<(), StoreError> {
        let cutoff = now.saturating_sub(EVENT_RETENTION.as_millis() as u64);
        for _ in 0..PRUNE_PER_EVENT {
            let Some((k, v)) = self.events.first()? else {
                break;
            };
            let old = serde_json::from_slice::<Event>(&v).map_or(true, |e| e.at_unix_ms < cutoff);
            if !old {
                break;
            }
            self.events.remove(k)?;
        }
        Ok(())
    }
}

/// How long the event log keeps an event.
pub(super) const EVENT_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(90 * 24 * 3600);

/// Old events dropped per new one, at most.
const PRUNE_PER_EVENT: usize = 8;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[tokio::test]
    async fn events_older_than_the_retention_go_as_new_ones_come() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let day = 24 * 3600 * 1000u64;
        let start = 1_000 * day;
        for i in 0..20 {
            s.log_event_at(&format!("old {i}"), start + i)
                .await
                .unwrap();
        }
        // 91 days later: each new event takes up to eight old ones with it.
        let later = start + 91 * day;
        for i in 0..3 {
            s.log_event_at(&format!("new {i}"), later + i)
                .await
                .unwrap();
        }
        let texts: Vec<String> = s.events(100).unwrap().into_iter().map(|e| e.text).collect();
        assert_eq!(texts, ["new 0", "new 1", "new 2"], "{texts:?}");
        // Recent events stay.
        s.log_event_at("newer", later + 10).await.unwrap();
        assert_eq!(s.events(100).unwrap().len(), 4);
    }
}
