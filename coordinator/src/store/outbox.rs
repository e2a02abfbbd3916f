//! The outbox: every alert state on its way to each hook, written in the same transaction as
//! the alert itself (so none is lost), with an index per hook so one hook's backlog is never
//! read for another; delivered entries leave it, failed ones wait for their next attempt.

use serde::{Deserialize, Serialize};

use super::alerts::{Alert, AlertStatus};
use super::{Store, StoreError, decode, decode_all, json};

/// One alert state on its way to one hook; stays in the outbox until delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Outbox order.
    pub seq: u64,
    /// Hook name.
    pub hook: String,
    /// Same for every attempt of this alert state.
    pub idempotency_key: String,
    /// The alert as it was at this state.
    pub alert: Alert,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before (Unix ms).
    pub next_attempt_unix_ms: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl Store {
    /// Writes an alert state with a delivery to each of `hooks` (none while it is silenced),
    /// in one transaction; durable before return.
    pub(super) async fn write_alert(
        &self,
        alert: &Alert,
        hooks: &[String],
    ) -> Result<(), StoreError> {
        {
            let mut deliveries = Vec::new();
            if !alert.silenced {
                for h in hooks {
                    let seq = self.db.generate_id().await?;
                    deliveries.push((
                        seq,
                        json(&Delivery {
                            seq,
                            hook: h.clone(),
                            idempotency_key: alert.idempotency_key(&self.id),
                            alert: alert.clone(),
                            attempts: 0,
                            next_attempt_unix_ms: 0,
                            last_error: None,
                        }),
                    ));
                }
            }
            let value = json(alert);
            let hooked: Vec<Vec<u8>> = if alert.silenced {
                Vec::new()
            } else {
                hooks
                    .iter()
                    .zip(&deliveries)
                    .map(|(h, (seq, _))| hook_key(h, *seq))
                    .collect()
            };
            let firing = alert.status == AlertStatus::Firing;
            self.db
                .transaction(
                    [
                        &self.alerts,
                        &self.outbox,
                        &self.outbox_by_hook,
                        &self.firing,
                    ],
                    |[alerts, outbox, by_hook, index]| {
                        alerts.insert(alert.id.to_be_bytes(), &value)?;
                        if firing {
                            index.insert(alert.id.to_be_bytes(), [])?;
                        } else {
                            index.remove(alert.id.to_be_bytes())?;
                        }
                        for (seq, d) in &deliveries {
                            outbox.insert(seq.to_be_bytes(), d)?;
                        }
                        for k in &hooked {
                            by_hook.insert(k, [])?;
                        }
                        Ok(())
                    },
                )
                .await?;
            self.durable().await
        }
    }

    /// Every queued delivery, oldest first.
    pub fn deliveries(&self) -> Result<Vec<Delivery>, StoreError> {
        decode_all(&self.outbox, "outbox")
    }

    /// The oldest queued delivery of `hook` (one index lookup and one decode, whatever the
    /// other hooks hold).
    pub fn next_delivery(&self, hook: &str) -> Result<Option<Delivery>, StoreError> {
        let Some(first) = self.outbox_by_hook.scan_prefix(hook_prefix(hook)).next() else {
            return Ok(None);
        };
        let k = first?.0;
        let seq = seq_of_hook_key(&k);
        match self.outbox.get(seq.to_be_bytes())? {
            Some(v) => decode(&v, "outbox", &seq.to_string()).map(Some),
            // An index entry without its delivery (cannot happen: both change together).
            None => {
                self.outbox_by_hook.remove(k)?;
                Ok(None)
            }
        }
    }

    /// Queued deliveries per hook, counted on the index (nothing decoded).
    pub fn backlog(&self, hook: &str) -> usize {
        self.outbox_by_hook.scan_prefix(hook_prefix(hook)).count()
    }

    /// A delivery succeeded: it leaves the outbox (durable before return).
    pub async fn delivered(&self, d: &Delivery) -> Result<(), StoreError> {
        let key = hook_key(&d.hook, d.seq);
        self.db
            .transaction([&self.outbox, &self.outbox_by_hook], |[outbox, by_hook]| {
                outbox.remove(d.seq.to_be_bytes())?;
                by_hook.remove(&key)?;
                Ok(())
            })
            .await?;
        self.durable().await
    }

    /// Builds the per-hook index of an outbox written before it existed (or repairs it).
    pub(super) fn index_outbox(&self) -> Result<(), StoreError> {
        if !self.outbox_by_hook.is_empty() || self.outbox.is_empty() {
            return Ok(());
        }
        for d in self.deliveries()? {
            self.outbox_by_hook
                .insert(hook_key(&d.hook, d.seq), &[][..])?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// A delivery failed: record the attempt and when to try again.
    pub async fn delivery_failed(&self, d: &Delivery) -> Result<(), StoreError> {
        self.outbox.insert(d.seq.to_be_bytes(), json(d))?;
        self.durable().await
    }
}

fn hook_prefix(hook: &str) -> Vec<u8> {
    let mut k = hook.as_bytes().to_vec();
    k.push(0);
    k
}

fn hook_key(hook: &str, seq: u64) -> Vec<u8> {
    let mut k = hook_prefix(hook);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of_hook_key(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() >= 8 {
        b.copy_from_slice(&k[k.len() - 8..]);
    }
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use crate::store::alerts::tests::alert;

    /// A hook's next delivery and its backlog come from the per-hook index: a long backlog of
    /// another hook (a receiver that is down) is never read for it. An outbox written before
    /// the index existed is indexed when the store opens.
    #[tokio::test]
    async fn each_hooks_next_delivery_and_backlog_come_from_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..300 {
            s.fire_alert(alert(&format!("a{i}:22")), &["slow".into()])
                .await
                .unwrap();
        }
        let fast = s
            .fire_alert(alert("b:22"), &["fast".into(), "slow".into()])
            .await
            .unwrap();
        assert_eq!((s.backlog("slow"), s.backlog("fast")), (301, 1));
        let next = s.next_delivery("fast").unwrap().unwrap();
        assert_eq!((next.hook.as_str(), next.alert.id), ("fast", fast.id));
        assert_eq!(
            s.next_delivery("slow").unwrap().unwrap().alert.subject,
            "a0:22"
        );
        s.delivered(&next).await.unwrap();
        assert!(s.next_delivery("fast").unwrap().is_none());
        assert_eq!(s.backlog("fast"), 0);
        assert_eq!(s.deliveries().unwrap().len(), 301);

        // An outbox from before the index: indexed (as `Store::open` does), nothing lost.
        s.outbox_by_hook.clear().unwrap();
        assert_eq!(s.backlog("slow"), 0);
        s.index_outbox().unwrap();
        assert_eq!(s.backlog("slow"), 301);
        assert_eq!(
            s.next_delivery("slow").unwrap().unwrap().alert.subject,
            "a0:22"
        );
    }
}
