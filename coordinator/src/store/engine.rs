//! The key-value engine under the store: named trees of ordered byte keys, transactions over
//! several trees, ids, and durability. Every record family in this room is written against
//! this boundary and nothing else, so another engine can take sled's place without a change
//! to them.
//!
//! sled is the engine here: its trees, its serializable transactions over several trees, its
//! id generator, and a flush (group commit, see [`Db::durable`]) before anything is
//! acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use super::StoreError;

/// The database: where trees are opened and transactions run.
#[derive(Clone)]
pub(super) struct Db {
    db: sled::Db,
    /// One flush at a time. sled 0.34 runs every `flush_async` on its small IO thread pool,
    /// and the log writes a flush waits for need a thread from that same pool: hundreds of
    /// agents connecting at once (one durable record each) blocked every pool thread in a
    /// flush and the store deadlocked (found by bench-fleet).
    flush_lock: Arc<tokio::sync::Mutex<()>>,
    /// Group commit: tickets taken by writers after their write, and the highest ticket a
    /// finished flush covered. A writer queued behind a flush that started after its write
    /// returns without flushing again, so 10,000 agents acknowledging a push cost a handful of
    /// flushes instead of 10,000 in a row.
    tickets: Arc<GroupCommit>,
}

/// Group-commit counters of [`Db::durable`].
#[derive(Debug, Default)]
struct GroupCommit {
    /// Tickets handed out (one per durable write, after the write).
    taken: AtomicU64,
    /// The highest ticket covered by a finished flush.
    flushed: AtomicU64,
    /// Flushes run.
    flushes: AtomicU64,
}

/// One tree: ordered keys to values.
#[derive(Clone)]
pub(super) struct Tree {
    tree: sled::Tree,
}

/// A key and its value.
pub(super) type Entry = (Vec<u8>, Vec<u8>);

/// Entries of a tree in key order (either end).
pub(super) struct Iter(sled::Iter);

impl Iterator for Iter {
    type Item = Result<Entry, StoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(entry)
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(entry)
    }
}

fn entry(r: sled::Result<(sled::IVec, sled::IVec)>) -> Result<Entry, StoreError> {
    r.map(|(k, v)| (k.to_vec(), v.to_vec()))
        .map_err(StoreError::from)
}

fn bytes(v: Option<sled::IVec>) -> Option<Vec<u8>> {
    v.map(|v| v.to_vec())
}

impl Db {
    /// Opens (or creates) the database in `dir`.
    pub(super) fn open(dir: &std::path::Path) -> Result<Db, StoreError> {
        Ok(Db {
            db: sled::open(dir)?,
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
            tickets: Arc::default(),
        })
    }

    /// The tree called `name` (created empty if new).
    pub(super) fn open_tree(&self, name: &'static str) -> Result<Tree, StoreError> {
        Ok(Tree {
            tree: self.db.open_tree(name)?,
        })
    }

    /// A new id, never handed out before by this database (not transactional: an id taken by
    /// a transaction that then failed is not reused).
    pub(super) fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    /// Everything written so far on disk, now (for one-off writes at open).
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Returns once everything this caller wrote is on disk: by its own flush, or by one that
    /// started after its write (group commit; see `flush_lock` for why one flush at a time).
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        // Taken after this caller's writes: any flush that starts later covers them.
        let ticket = self.tickets.taken.fetch_add(1, SeqCst) + 1;
        let _one = self.flush_lock.lock().await;
        if self.tickets.flushed.load(SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket up to here was taken after its write, so this flush covers them all.
        let covers = self.tickets.taken.load(SeqCst);
        self.db.flush_async().await?;
        self.tickets.flushed.store(covers, SeqCst);
        self.tickets.flushes.fetch_add(1, SeqCst);
        Ok(())
    }

    /// Flushes run since the database was opened (`durable` calls share them).
    pub(super) fn flushes(&self) -> u64 {
        self.tickets.flushes.load(SeqCst)
    }

    /// Runs `f` over `trees` as one serializable transaction: every write it makes happens,
    /// or none does. `f` may run more than once (on a conflict), so it must not have effects
    /// outside the transaction. An [`Abort::Store`] it returns is the transaction's error.
    pub(super) fn transaction<const N: usize, T>(
        &self,
        trees: [&Tree; N],
        f: impl Fn(&[TxTree<'_>; N]) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as C, TransactionError};
        let sled_trees: Vec<&sled::Tree> = trees.iter().map(|t| &t.tree).collect();
        let r = sled_trees.as_slice().transaction(|views| {
            let txs: [TxTree<'_>; N] = std::array::from_fn(|i| TxTree { tree: &views[i] });
            f(&txs).map_err(|a| match a {
                Abort::Store(e) => C::Abort(e),
                Abort::Engine(u) => C::from(u),
            })
        });
        r.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        })
    }
}

/// Why a transaction step stopped: the store's own reason (the transaction's result), or the
/// engine's (a conflict, retried; a storage error).
#[derive(Debug)]
pub(super) enum Abort {
    /// Ends the transaction with this error, nothing written.
    Store(StoreError),
    /// The engine's: a conflict (the transaction runs again) or a storage error.
    Engine(sled::transaction::UnabortableTransactionError),
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        Abort::Store(e)
    }
}

impl From<sled::transaction::UnabortableTransactionError> for Abort {
    fn from(e: sled::transaction::UnabortableTransactionError) -> Self {
        Abort::Engine(e)
    }
}

/// One tree inside a transaction.
pub(super) struct TxTree<'a> {
    tree: &'a sled::transaction::TransactionalTree,
}

impl TxTree<'_> {
    /// The value under `key`, as this transaction sees it.
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Abort> {
        Ok(bytes(self.tree.get(key.as_ref())?))
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<Vec<u8>>, Abort> {
        Ok(bytes(self.tree.insert(key.as_ref(), value.as_ref())?))
    }

    /// Removes `key`; returns its value.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Abort> {
        Ok(bytes(self.tree.remove(key.as_ref())?))
    }
}

impl Tree {
    /// The value under `key`.
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(bytes(self.tree.get(key)?))
    }

    /// Sets `key` to `value` (on its own, outside any transaction); returns the old value.
    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(bytes(self.tree.insert(key.as_ref(), value.as_ref())?))
    }

    /// Removes `key`; returns its value.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(bytes(self.tree.remove(key)?))
    }

    /// Every entry in key order.
    pub(super) fn iter(&self) -> Iter {
        Iter(self.tree.iter())
    }

    /// Every key in order.
    pub(super) fn keys(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.iter().map(|r| r.map(|(k, _)| k)).collect()
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub(super) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        Iter(self.tree.scan_prefix(prefix))
    }

    /// The entry with the smallest key.
    pub(super) fn first(&self) -> Result<Option<Entry>, StoreError> {
        Ok(self.tree.first()?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    /// Removes and returns the entry with the smallest key.
    pub(super) fn pop_min(&self) -> Result<Option<Entry>, StoreError> {
        Ok(self.tree.pop_min()?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    /// How many entries (counts them).
    pub(super) fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether it has no entry.
    pub(super) fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Removes every entry.
    #[cfg(test)]
    pub(super) fn clear(&self) -> Result<(), StoreError> {
        Ok(self.tree.clear()?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    /// Fifty writers queued behind a flush in progress are all covered by the next single
    /// flush, and each still returns only after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_queued_behind_a_flush_share_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let t = db.open_tree("t").unwrap();
        let (flushes, taken) = (db.flushes(), db.tickets.taken.load(SeqCst));
        // A flush in progress: the lock held.
        let held = db.flush_lock.clone().lock_owned().await;
        let writers: Vec<_> = (0..50u32)
            .map(|i| {
                let (db, t) = (db.clone(), t.clone());
                tokio::spawn(async move {
                    t.insert(i.to_be_bytes(), b"x")?;
                    db.durable().await
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while db.tickets.taken.load(SeqCst) < taken + 50 {
            assert!(tokio::time::Instant::now() < deadline, "writers stuck");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "none returned unflushed"
        );
        drop(held);
        for w in writers {
            w.await.unwrap().unwrap();
        }
        assert_eq!(db.flushes() - flushes, 1);
        assert_eq!(db.tickets.flushed.load(SeqCst), taken + 50);
        assert_eq!(t.len(), 50);
        // A write after that flush is not covered by it: it flushes again.
        t.insert(b"late", b"x").unwrap();
        db.durable().await.unwrap();
        assert_eq!(db.flushes() - flushes, 2);
    }

    /// A transaction over two trees writes both or neither; the store's abort is its result.
    #[test]
    fn a_transaction_writes_every_tree_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
        db.transaction([&a, &b], |[a, b]| {
            a.insert(b"k", b"1")?;
            b.insert(b"k", b"2")?;
            Ok(())
        })
        .unwrap();
        let r = db.transaction([&a, &b], |[a, b]| {
            a.insert(b"k", b"changed")?;
            if b.get(b"k")?.is_some() {
                return Err(StoreError::NoProfile("k".into()).into());
            }
            Ok(())
        });
        assert!(matches!(r, Err(StoreError::NoProfile(_))), "{r:?}");
        assert_eq!(a.get(b"k").unwrap().unwrap(), b"1");
        assert_eq!(b.get(b"k").unwrap().unwrap(), b"2");
        let back: Vec<_> = a.iter().rev().map(|r| r.unwrap().0).collect();
        assert_eq!(back, vec![b"k".to_vec()]);
    }
}
