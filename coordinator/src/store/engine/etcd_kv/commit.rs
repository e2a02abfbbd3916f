//! Transactions (optimistic, compared by mod revision) and the group commit of queued plain
//! writes; the trees' reads and writes through the mirror and the queue.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{
    Claim, EtcdDb, EtcdTree, EtcdTx, EtcdTxTree, LEADER_KEY, MAX_ATTEMPTS, MAX_QUEUED,
    MAX_TXN_BYTES, MAX_TXN_OPS, Queued, lease::holder, prefix_end, qualified,
};
use crate::store::StoreError;
use crate::store::engine::{Abort, Entry, TxTree};

impl EtcdDb {
    /// Commits every queued plain write (group commit: one caller commits what all queued).
    /// Writes fenced by a claim go in transactions of their own that commit only while the
    /// claim holds; when it is gone they are dropped, never applied.
    pub(in crate::store::engine) async fn durable(&self) -> Result<(), StoreError> {
        self.commit_queued().await?;
        // A fenced caller learns here that its writes went nowhere.
        self.claim().map(|_| ())
    }

    pub(super) async fn commit_queued(&self) -> Result<(), StoreError> {
        let _one = self.inner.commit_lock.lock().await;
        let batch: Vec<(Vec<u8>, Queued)> = self
            .queued()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        let mut fences: Vec<Option<i64>> = batch.iter().map(|(_, (_, f))| *f).collect();
        fences.sort_unstable();
        fences.dedup();
        let mut last = 0;
        let mut dropped = Vec::new();
        for fence in fences {
            let group: Vec<&(Vec<u8>, Queued)> =
                batch.iter().filter(|(_, (_, f))| *f == fence).collect();
            let mut start = 0;
            while start < group.len() {
                let mut ops = Vec::new();
                let mut bytes = 0;
                let mut end = start;
                while end < group.len() && ops.len() < MAX_TXN_OPS {
                    let (k, (v, _)) = group[end];
                    let size = k.len() + v.as_ref().map_or(0, Vec::len);
                    if !ops.is_empty() && bytes + size > MAX_TXN_BYTES {
                        break;
                    }
                    bytes += size;
                    ops.push(match v {
                        Some(v) => TxnOp::put(self.full(k), v.clone(), None),
                        None => TxnOp::delete(self.full(k), None),
                    });
                    end += 1;
                }
                let mut txn = Txn::new();
                if let Some(lease) = fence {
                    txn = txn.when([self.fence_compare(Claim { lease })]);
                }
                let r = self.txn("committing", txn.and_then(ops)).await?;
                last = r.header().map_or(last, |h| h.revision());
                if !r.succeeded() {
                    // The claim is gone: these were the leader's, and it is not any more.
                    if let Some(lease) = fence {
                        self.inner.lost.store(lease, SeqCst);
                    }
                    dropped.extend(group[start..].iter().map(|(k, _)| k.clone()));
                    break;
                }
                start = end;
            }
        }
        self.seen(last).await?;
        let mut q = self.queued();
        for (k, v) in &batch {
            if q.get(k) == Some(v) {
                q.remove(k);
            }
        }
        drop(q);
        self.inner.flushes.fetch_add(1, SeqCst);
        if !dropped.is_empty() {
            tracing::warn!(
                writes = dropped.len(),
                "the leader's claim in etcd is gone: its queued writes were dropped"
            );
        }
        Ok(())
    }

    pub(super) fn queued_is_empty(&self) -> bool {
        self.inner
            .queued
            .lock()
            .map(|q| q.is_empty())
            .unwrap_or(false)
    }

    pub(in crate::store::engine) async fn transaction<const N: usize, T>(
        &self,
        trees: [&EtcdTree; N],
        f: impl Fn(&[TxTree<'_>; N]) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let claim = self.claim()?;
            if !self.queued_is_empty() {
                self.commit_queued().await?;
            }
            let (result, reads, writes, saw_queued) = {
                let (Ok(mirror), Ok(queued)) = (self.inner.mirror.read(), self.inner.queued.lock())
                else {
                    return Err(self.error("mirror", "poisoned"));
                };
                let tx = EtcdTx {
                    mirror: &mirror,
                    queued: &queued,
                    reads: Default::default(),
                    writes: Default::default(),
                    saw_queued: Default::default(),
                };
                let views: [TxTree<'_>; N] = std::array::from_fn(|i| {
                    TxTree::Etcd(EtcdTxTree {
                        tx: &tx,
                        tree: &trees[i].tree,
                    })
                });
                let result = f(&views);
                (
                    result,
                    tx.reads.into_inner(),
                    tx.writes.into_inner(),
                    tx.saw_queued.get(),
                )
            };
            if saw_queued {
                self.commit_queued().await?;
                continue;
            }
            if let Err(Abort::Sled(e)) = &result {
                return Err(self.error("transaction", format!("{e:?}")));
            }
            // A refusal, or a result without writes, was decided on what the mirror showed:
            // it stands only if etcd still holds those reads (another coordinator's write may
            // not have reached the mirror yet).
            let writes = match &result {
                Ok(_) => writes,
                Err(_) => BTreeMap::new(),
            };
            if writes.len() > MAX_TXN_OPS {
                return Err(self.error(
                    "transaction",
                    format!(
                        "{} writes in one change, more than {MAX_TXN_OPS}: raise etcd's --max-txn-ops and this build's limit",
                        writes.len()
                    ),
                ));
            }
            let mut compares: Vec<Compare> = reads
                .iter()
                .map(|(k, rev)| Compare::mod_revision(self.full(k), CompareOp::Equal, *rev))
                .collect();
            if let Some(c) = claim {
                compares.push(self.fence_compare(c));
            }
            let ops: Vec<TxnOp> = writes
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => TxnOp::put(self.full(k), v.clone(), None),
                    None => TxnOp::delete(self.full(k), None),
                })
                .collect();
            let txn = Txn::new()
                .when(compares)
                .and_then(ops)
                .or_else([TxnOp::get(self.full(LEADER_KEY), None)]);
            let r = self.txn("committing", txn).await?;
            let revision = r.header().map_or(0, |h| h.revision());
            if r.succeeded() {
                if !writes.is_empty() {
                    self.seen(revision).await?;
                }
                return match result {
                    Ok(r) => Ok(r),
                    Err(Abort::Store(e)) => Err(e),
                    Err(Abort::Sled(e)) => Err(self.error("transaction", format!("{e:?}"))),
                };
            }
            if let Some(c) = claim
                && holder(&r).is_none_or(|(_, lease)| lease != c.lease)
            {
                self.inner.lost.store(c.lease, SeqCst);
                return Err(StoreError::NotLeader);
            }
            // Someone wrote a key we read: see their write, then run again.
            let _ = self.inner.progress.try_send(());
            self.seen(revision).await?;
        }
        Err(self.error("transaction", "conflicted too often"))
    }
}

impl EtcdTxTree<'_> {
    pub(in crate::store::engine) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let k = qualified(self.tree, key);
        if let Some(v) = self.tx.writes.borrow().get(&k) {
            return v.clone();
        }
        if self.tx.queued.contains_key(&k) {
            self.tx.saw_queued.set(true);
        }
        let found = self.tx.mirror.kv.get(&k);
        self.tx
            .reads
            .borrow_mut()
            .entry(k)
            .or_insert(found.map_or(0, |(_, rev)| *rev));
        found.map(|(v, _)| v.clone())
    }

    pub(in crate::store::engine) fn insert(&self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        let old = self.get(key);
        self.tx
            .writes
            .borrow_mut()
            .insert(qualified(self.tree, key), Some(value.to_vec()));
        old
    }

    pub(in crate::store::engine) fn remove(&self, key: &[u8]) -> Option<Vec<u8>> {
        let old = self.get(key);
        self.tx
            .writes
            .borrow_mut()
            .insert(qualified(self.tree, key), None);
        old
    }
}

impl EtcdTree {
    pub(in crate::store::engine) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let k = qualified(&self.tree, key);
        if let Some((v, _)) = self.db.queued().get(&k) {
            return v.clone();
        }
        self.db.mirror().kv.get(&k).map(|(v, _)| v.clone())
    }

    fn queue(&self, key: &[u8], value: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, StoreError> {
        let fence = self.db.claim()?.map(|c| c.lease);
        let old = self.get(key);
        let mut q = self.db.queued();
        if q.len() >= MAX_QUEUED {
            return Err(self.db.error(
                "queueing a write",
                format!("{MAX_QUEUED} writes are waiting for etcd to commit them"),
            ));
        }
        q.insert(qualified(&self.tree, key), (value, fence));
        Ok(old)
    }

    pub(in crate::store::engine) fn insert(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.queue(key, Some(value.to_vec()))
    }

    pub(in crate::store::engine) fn remove(
        &self,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.queue(key, None)
    }

    /// The entries of this tree etcd committed after `revision`, and the revision the mirror
    /// has seen everything up to (queued writes are this coordinator's own: not included).
    pub(in crate::store::engine) fn entries_since(&self, revision: i64) -> (Vec<Entry>, i64) {
        let reached = *self.db.inner.seen.borrow();
        let to = prefix_end(&self.tree);
        let out = self
            .db
            .mirror()
            .kv
            .range(self.tree.clone()..to)
            .filter(|(_, (_, rev))| *rev > revision)
            .map(|(k, (v, _))| (k[self.tree.len()..].to_vec(), v.clone()))
            .collect();
        (out, reached)
    }

    /// The entries whose key starts with `prefix` (tree-relative), queued writes included, in
    /// key order.
    pub(in crate::store::engine) fn entries(&self, prefix: &[u8]) -> Vec<Entry> {
        let from = qualified(&self.tree, prefix);
        let to = prefix_end(&from);
        let mut out: BTreeMap<Vec<u8>, Vec<u8>> = self
            .db
            .mirror()
            .kv
            .range(from.clone()..to.clone())
            .map(|(k, (v, _))| (k[self.tree.len()..].to_vec(), v.clone()))
            .collect();
        for (k, (v, _)) in self.db.queued().range(from..to) {
            let k = k[self.tree.len()..].to_vec();
            match v {
                Some(v) => out.insert(k, v.clone()),
                None => out.remove(&k),
            };
        }
        out.into_iter().collect()
    }
}
