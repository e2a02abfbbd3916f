//! The key-value engine under the store: named trees of ordered byte keys, transactions over
//! several trees, ids, and durability. Every record family in this room is written against
//! this boundary and nothing else, so the engines behind it are interchangeable.
//!
//! # Layout
//! - [`sled_kv`]: sled, embedded (the default): its trees, its serializable transactions, its
//!   id generator, group commit.

mod sled_kv;

use super::StoreError;

/// A key and its value.
pub(super) type Entry = (Vec<u8>, Vec<u8>);

/// The database: where trees are opened and transactions run.
#[derive(Clone)]
pub(super) enum Db {
    /// Embedded sled.
    Sled(sled_kv::SledDb),
}

/// One tree: ordered keys to values.
#[derive(Clone)]
pub(super) enum Tree {
    /// A sled tree.
    Sled(::sled::Tree),
}

/// One tree inside a transaction.
pub(super) enum TxTree<'a> {
    /// A sled tree in a sled transaction.
    Sled(&'a ::sled::transaction::TransactionalTree),
}

/// Entries of a tree in key order (either end).
pub(super) enum Iter {
    /// Straight from sled.
    Sled(::sled::Iter),
}

/// Why a transaction step stopped: the store's own reason (the transaction's result), or the
/// engine's (a conflict, retried; a storage error).
#[derive(Debug)]
pub(super) enum Abort {
    /// Ends the transaction with this error, nothing written.
    Store(StoreError),
    /// sled's: a conflict (the transaction runs again) or a storage error.
    Sled(::sled::transaction::UnabortableTransactionError),
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        Abort::Store(e)
    }
}

impl From<::sled::transaction::UnabortableTransactionError> for Abort {
    fn from(e: ::sled::transaction::UnabortableTransactionError) -> Self {
        Abort::Sled(e)
    }
}

impl Db {
    /// Opens (or creates) an embedded sled database in `dir`.
    pub(super) fn open_sled(dir: &std::path::Path) -> Result<Db, StoreError> {
        Ok(Db::Sled(sled_kv::SledDb::open(dir)?))
    }

    /// The tree called `name` (created empty if new).
    pub(super) fn open_tree(&self, name: &'static str) -> Result<Tree, StoreError> {
        match self {
            Db::Sled(db) => Ok(Tree::Sled(db.open_tree(name)?)),
        }
    }

    /// A new id, never handed out before by this database (not transactional: an id taken by
    /// a change that then failed is not reused).
    pub(super) async fn generate_id(&self) -> Result<u64, StoreError> {
        match self {
            Db::Sled(db) => db.generate_id(),
        }
    }

    /// Everything written so far made durable now (one-off writes at open).
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        match self {
            Db::Sled(db) => db.flush(),
        }
    }

    /// Returns once everything this caller wrote is durable (group commit: concurrent
    /// callers share one flush).
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        match self {
            Db::Sled(db) => db.durable().await,
        }
    }

    /// Flushes run since the database was opened (`durable` calls share them).
    pub(super) fn flushes(&self) -> u64 {
        match self {
            Db::Sled(db) => db.flushes(),
        }
    }

    /// Runs `f` over `trees` as one serializable transaction: every write it makes happens,
    /// or none does. `f` may run more than once (on a conflict), so it must not have effects
    /// outside the transaction. An [`Abort::Store`] it returns is the transaction's error.
    pub(super) async fn transaction<const N: usize, T>(
        &self,
        trees: [&Tree; N],
        f: impl Fn(&[TxTree<'_>; N]) -> Result<T, Abort>,
    ) -> Result<T, StoreError> {
        match self {
            Db::Sled(db) => {
                let sled_trees = trees.map(|t| match t {
                    Tree::Sled(t) => t,
                });
                db.transaction(sled_trees, f)
            }
        }
    }
}

impl TxTree<'_> {
    /// The value under `key`, as this transaction sees it.
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Abort> {
        match self {
            TxTree::Sled(t) => Ok(sled_kv::bytes(t.get(key.as_ref())?)),
        }
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<Vec<u8>>, Abort> {
        match self {
            TxTree::Sled(t) => Ok(sled_kv::bytes(t.insert(key.as_ref(), value.as_ref())?)),
        }
    }

    /// Removes `key`; returns its value.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Abort> {
        match self {
            TxTree::Sled(t) => Ok(sled_kv::bytes(t.remove(key.as_ref())?)),
        }
    }
}

impl Tree {
    /// The value under `key`.
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(sled_kv::bytes(t.get(key)?)),
        }
    }

    /// Sets `key` to `value` (on its own, outside any transaction; durable with the next
    /// [`Db::durable`]); returns the old value.
    pub(super) fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(sled_kv::bytes(t.insert(key.as_ref(), value.as_ref())?)),
        }
    }

    /// Removes `key`; returns its value.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(sled_kv::bytes(t.remove(key)?)),
        }
    }

    /// Every entry in key order.
    pub(super) fn iter(&self) -> Iter {
        match self {
            Tree::Sled(t) => Iter::Sled(t.iter()),
        }
    }

    /// Every key in order.
    pub(super) fn keys(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.iter().map(|r| r.map(|(k, _)| k)).collect()
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub(super) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        match self {
            Tree::Sled(t) => Iter::Sled(t.scan_prefix(prefix)),
        }
    }

    /// The entry with the smallest key.
    pub(super) fn first(&self) -> Result<Option<Entry>, StoreError> {
        self.iter().next().transpose()
    }

    /// Removes and returns the entry with the smallest key.
    pub(super) fn pop_min(&self) -> Result<Option<Entry>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.pop_min()?.map(|(k, v)| (k.to_vec(), v.to_vec()))),
        }
    }

    /// How many entries (counts them).
    pub(super) fn len(&self) -> usize {
        match self {
            Tree::Sled(t) => t.len(),
        }
    }

    /// Whether it has no entry.
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Tree::Sled(t) => t.is_empty(),
        }
    }

    /// Removes every entry.
    #[cfg(test)]
    pub(super) fn clear(&self) -> Result<(), StoreError> {
        for k in self.keys()? {
            self.remove(k)?;
        }
        Ok(())
    }
}

impl Iterator for Iter {
    type Item = Result<Entry, StoreError>;
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Sled(i) => i.next().map(sled_kv::entry),
        }
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Sled(i) => i.next_back().map(sled_kv::entry),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    /// A transaction over two trees writes both or neither; the store's abort is its result.
    pub(super) async fn a_transaction_writes_every_tree_or_none(db: Db) {
        let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
        db.transaction([&a, &b], |[a, b]| {
            a.insert(b"k", b"1")?;
            b.insert(b"k", b"2")?;
            Ok(())
        })
        .await
        .unwrap();
        let r = db
            .transaction([&a, &b], |[a, b]| {
                a.insert(b"k", b"changed")?;
                if b.get(b"k")?.is_some() {
                    return Err(StoreError::NoProfile("k".into()).into());
                }
                Ok(())
            })
            .await;
        assert!(matches!(r, Err(StoreError::NoProfile(_))), "{r:?}");
        assert_eq!(a.get(b"k").unwrap().unwrap(), b"1");
        assert_eq!(b.get(b"k").unwrap().unwrap(), b"2");
        // A transaction sees its own writes.
        let seen = db
            .transaction([&a], |[a]| {
                a.insert(b"j", b"3")?;
                a.get(b"j")
            })
            .await
            .unwrap();
        assert_eq!(seen.unwrap(), b"3");
        let back: Vec<_> = a.iter().rev().map(|r| r.unwrap().0).collect();
        assert_eq!(back, vec![b"k".to_vec(), b"j".to_vec()]);
        assert_eq!(a.first().unwrap().unwrap().0, b"j");
    }

    /// Plain writes are seen at once and kept in key order; prefixes and pops work on them.
    pub(super) async fn plain_writes_in_key_order(db: Db) {
        let t = db.open_tree("t").unwrap();
        for k in [3u64, 1, 2] {
            t.insert(k.to_be_bytes(), k.to_string()).unwrap();
        }
        t.insert(b"p-1", b"x").unwrap();
        t.insert(b"p-2", b"y").unwrap();
        db.durable().await.unwrap();
        assert_eq!(t.len(), 5);
        let keys: Vec<_> = t.scan_prefix(b"p-").map(|r| r.unwrap().1).collect();
        assert_eq!(keys, vec![b"x".to_vec(), b"y".to_vec()]);
        assert_eq!(t.pop_min().unwrap().unwrap().1, b"1");
        assert_eq!(t.remove(3u64.to_be_bytes()).unwrap().unwrap(), b"3");
        assert_eq!(t.len(), 3);
        assert!(!t.is_empty());
        let a = db.generate_id().await.unwrap();
        let b = db.generate_id().await.unwrap();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn sled_transactions() {
        let dir = tempfile::tempdir().unwrap();
        a_transaction_writes_every_tree_or_none(Db::open_sled(dir.path()).unwrap()).await;
    }

    #[tokio::test]
    async fn sled_plain_writes() {
        let dir = tempfile::tempdir().unwrap();
        plain_writes_in_key_order(Db::open_sled(dir.path()).unwrap()).await;
    }
}
