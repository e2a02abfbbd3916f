//! sled behind the engine boundary: its trees, its serializable transactions over several
//! trees, its id generator, and group commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use super::{Abort, Entry, StoreError, TxTree};

/// What sled said when it failed (IO, corruption): its type stays behind the engine.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DiskError(sled::Error);

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Disk(DiskError(e))
    }
}

/// An open sled database with its group commit.
#[derive(Clone)]
pub(crate) struct SledDb {
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

/// Group-commit counters of [`SledDb::durable`].
#[derive(Debug, Default)]
struct GroupCommit {
    /// Tickets handed out (one per durable write, after the write).
    taken: AtomicU64,
    /// The highest ticket covered by a finished flush.
    flushed: AtomicU64,
    /// Flushes run.
    flushes: AtomicU64,
}

pub(super) fn entry(r: sled::Result<(sled::IVec, sled::IVec)>) -> Result<Entry, StoreError> {
    r.map(|(k, v)| (k.to_vec(), v.to_vec()))
        .map_err(StoreError::from)
}

pub(super) fn bytes(v: Option<sled::IVec>) -> Option<Vec<u8>> {
    v.map(|v| v.to_vec())
}

impl SledDb {
    pub(super) fn open(dir: &std::path::Path) -> Result<SledDb, StoreError> {
        Ok(SledDb {
            db: sled::open(dir)?,
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
            tickets: Arc::default(),
        })
    }

    pub(super) fn open_tree(&self, name: &'static str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    pub(super) fn generate_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    pub(super) fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Returns once everything this caller wrote is on disk: by its own flush, or by one that
    /// started after its write (see `flush_lock` for why one flush at a time).
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

    pub(super) fn flushes(&self) -> u64 {
        self.tickets.flushes.load(SeqCst)
    }

    pub(super) fn transaction<const N: usize, T>(
        &self,
        trees: [&sled::Tree; N],
        f: impl Fn(&[TxTree<'_>; N]) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as C, TransactionError};
        let r = trees.as_slice().transaction(|views| {
            let txs: [TxTree<'_>; N] = std::array::from_fn(|i| TxTree::Sled(&views[i]));
            f(&txs).map_err(|a| match a {
                Abort::Store(e) => C::Abort(e),
                Abort::Sled(u) => C::from(u),
            })
        });
        r.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        })
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
        let db = SledDb::open(dir.path()).unwrap();
        let t = db.open_tree("t").unwrap();
        let (flushes, taken) = (db.flushes(), db.tickets.taken.load(SeqCst));
        // A flush in progress: the lock held.
        let held = db.flush_lock.clone().lock_owned().await;
        let writers: Vec<_> = (0..50u32)
            .map(|i| {
                let (db, t) = (db.clone(), t.clone());
                tokio::spawn(async move {
                    t.insert(i.to_be_bytes(), b"x").map_err(StoreError::from)?;
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
}
