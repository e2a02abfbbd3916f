//! Ids in blocks of [`ID_BLOCK`] from one shared counter, taken by compare-and-swap.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{EtcdDb, ID_BLOCK, IDS_KEY, MAX_ATTEMPTS};
use crate::store::StoreError;

impl EtcdDb {
    pub(in crate::store::engine) async fn generate_id(&self) -> Result<u64, StoreError> {
        let mut ids = self.inner.ids.lock().await;
        if ids.0 < ids.1 {
            ids.0 += 1;
            return Ok(ids.0 - 1);
        }
        let key = self.full(IDS_KEY);
        for _ in 0..MAX_ATTEMPTS {
            let got = self.get("taking ids", &key, None).await?;
            let (start, rev) = match got.kvs().first() {
                Some(k) => (
                    k.value().try_into().map(u64::from_be_bytes).unwrap_or(0),
                    k.mod_revision(),
                ),
                None => (0, 0),
            };
            let end = start.saturating_add(ID_BLOCK);
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.clone(), end.to_be_bytes().to_vec(), None)]);
            let r = self.txn("taking ids", txn).await?;
            if r.succeeded() {
                *ids = (start + 1, end);
                return Ok(start);
            }
        }
        Err(self.error("taking ids", "the counter kept changing"))
    }

    /// Makes every id handed out from now on at least `next` (a state moved in from another
    /// store keeps its ids, and new ones never repeat them).
    pub(in crate::store::engine) async fn reserve_ids(&self, next: u64) -> Result<(), StoreError> {
        let key = self.full(IDS_KEY);
        for _ in 0..MAX_ATTEMPTS {
            let got = self.get("reserving ids", &key, None).await?;
            let (now, rev) = match got.kvs().first() {
                Some(k) => (
                    k.value().try_into().map(u64::from_be_bytes).unwrap_or(0),
                    k.mod_revision(),
                ),
                None => (0, 0),
            };
            if now >= next {
                return Ok(());
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
                .and_then([TxnOp::put(key.clone(), next.to_be_bytes().to_vec(), None)]);
            if self.txn("reserving ids", txn).await?.succeeded() {
                *self.inner.ids.lock().await = (0, 0);
                return Ok(());
            }
        }
        Err(self.error("reserving ids", "the counter kept changing"))
    }
}
