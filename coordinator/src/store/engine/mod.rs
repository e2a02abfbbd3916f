//! The key-value engine under the store: named trees of ordered byte keys, transactions over
//! several trees, ids, and durability. Every record family in this room is written against
//! this boundary and nothing else, so the engines behind it are interchangeable.
//!
//! # Layout
//! - [`sled_kv`]: sled, embedded (the default): its trees, its serializable transactions, its
//!   id generator, group commit.
//! - `etcd_kv`: etcd, shared by several coordinators: a watched mirror
//!   for reads, optimistic transactions compared by mod revision, queued plain writes
//!   committed together, ids in blocks.

pub(super) mod etcd_kv;
mod sled_kv;

pub use sled_kv::DiskError;

use super::StoreError;

/// A key and its value.
pub(super) type Entry = (Vec<u8>, Vec<u8>);

/// The database: where trees are opened and transactions run.
#[derive(Clone)]
pub(super) enum Db {
    /// Embedded sled.
    Sled(sled_kv::SledDb),
    /// etcd.
    Etcd(etcd_kv::EtcdDb),
}

/// One tree: ordered keys to values.
#[derive(Clone)]
pub(super) enum Tree {
    /// A sled tree.
    Sled(::sled::Tree),
    /// Keys under a tree's name in etcd.
    Etcd(etcd_kv::EtcdTree),
}

/// One tree inside a transaction.
pub(super) enum TxTree<'a> {
    /// A sled tree in a sled transaction.
    Sled(&'a ::sled::transaction::TransactionalTree),
    /// A tree in an etcd transaction.
    Etcd(etcd_kv::EtcdTxTree<'a>),
}

/// Entries of a tree in key order (either end).
pub(super) enum Iter {
    /// Straight from sled.
    Sled(Box<::sled::Iter>),
    /// Entries read at once.
    Entries(std::vec::IntoIter<Entry>),
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

    /// Connects to etcd and loads the state under the configured prefix.
    pub(super) async fn open_etcd(cfg: &super::EtcdConfig) -> Result<Db, StoreError> {
        Ok(Db::Etcd(etcd_kv::EtcdDb::open(cfg).await?))
    }

    /// This database as the leader's handle: on etcd every write it makes commits only while
    /// the claim in `cell` holds; sled has one coordinator, always leading.
    pub(super) fn fenced(&self, cell: etcd_kv::FenceCell) -> Db {
        match self {
            Db::Sled(db) => Db::Sled(db.clone()),
            Db::Etcd(db) => Db::Etcd(db.with_fence(cell)),
        }
    }

    /// The etcd database under this one, if it is etcd.
    pub(super) fn etcd(&self) -> Option<&etcd_kv::EtcdDb> {
        match self {
            Db::Etcd(db) => Some(db),
            Db::Sled(_) => None,
        }
    }

    /// The tree called `name` (created empty if new).
    pub(super) fn open_tree(&self, name: &'static str) -> Result<Tree, StoreError> {
        match self {
            Db::Sled(db) => Ok(Tree::Sled(db.open_tree(name)?)),
            Db::Etcd(db) => Ok(Tree::Etcd(db.open_tree(name))),
        }
    }

    /// A new id, never handed out before by this database (not transactional: an id taken by
    /// a change that then failed is not reused).
    pub(super) async fn generate_id(&self) -> Result<u64, StoreError> {
        match self {
            Db::Sled(db) => db.generate_id(),
            Db::Etcd(db) => db.generate_id().await,
        }
    }

    /// Makes every id handed out from now on at least `next`.
    pub(super) async fn reserve_ids(&self, next: u64) -> Result<(), StoreError> {
        match self {
            // sled's generator is its own: a sled store is only ever a source.
            Db::Sled(_) => {
                let _ = next;
                Ok(())
            }
            Db::Etcd(db) => db.reserve_ids(next).await,
        }
    }

    /// Everything written so far made durable now (one-off writes at open).
    pub(super) fn flush(&self) -> Result<(), StoreError> {
        match self {
            Db::Sled(db) => db.flush(),
            // Queued; the etcd store's open commits them.
            Db::Etcd(_) => Ok(()),
        }
    }

    /// Returns once everything this caller wrote is durable (group commit: concurrent
    /// callers share one flush).
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        match self {
            Db::Sled(db) => db.durable().await,
            Db::Etcd(db) => db.durable().await,
        }
    }

    /// Flushes run since the database was opened (`durable` calls share them).
    pub(super) fn flushes(&self) -> u64 {
        match self {
            Db::Sled(db) => db.flushes(),
            Db::Etcd(db) => db.flushes(),
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
                let mut sled_trees = Vec::with_capacity(N);
                for t in trees {
                    match t {
                        Tree::Sled(t) => sled_trees.push(t),
                        Tree::Etcd(_) => return Err(StoreError::ForeignTree),
                    }
                }
                let sled_trees: [&::sled::Tree; N] =
                    sled_trees.try_into().map_err(|_| StoreError::ForeignTree)?;
                db.transaction(sled_trees, f)
            }
            Db::Etcd(db) => {
                let mut etcd_trees = Vec::with_capacity(N);
                for t in trees {
                    match t {
                        Tree::Etcd(t) => etcd_trees.push(t),
                        Tree::Sled(_) => return Err(StoreError::ForeignTree),
                    }
                }
                let etcd_trees: [&etcd_kv::EtcdTree; N] =
                    etcd_trees.try_into().map_err(|_| StoreError::ForeignTree)?;
                db.transaction(etcd_trees, f).await
            }
        }
    }
}

impl TxTree<'_> {
    /// The value under `key`, as this transaction sees it.
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Abort> {
        match self {
            TxTree::Sled(t) => Ok(sled_kv::bytes(t.get(key.as_ref())?)),
            TxTree::Etcd(t) => Ok(t.get(key.as_ref())),
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
            TxTree::Etcd(t) => Ok(t.insert(key.as_ref(), value.as_ref())),
        }
    }

    /// Removes `key`; returns its value.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, Abort> {
        match self {
            TxTree::Sled(t) => Ok(sled_kv::bytes(t.remove(key.as_ref())?)),
            TxTree::Etcd(t) => Ok(t.remove(key.as_ref())),
        }
    }
}

impl Tree {
    /// The value under `key`.
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(sled_kv::bytes(t.get(key)?)),
            Tree::Etcd(t) => Ok(t.get(key.as_ref())),
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
            Tree::Etcd(t) => t.insert(key.as_ref(), value.as_ref()),
        }
    }

    /// Removes `key`; returns its value.
    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(sled_kv::bytes(t.remove(key)?)),
            Tree::Etcd(t) => t.remove(key.as_ref()),
        }
    }

    /// Every entry in key order.
    pub(super) fn iter(&self) -> Iter {
        match self {
            Tree::Sled(t) => Iter::Sled(Box::new(t.iter())),
            Tree::Etcd(t) => Iter::Entries(t.entries(b"").into_iter()),
        }
    }

    /// Every key in order.
    pub(super) fn keys(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.iter().map(|r| r.map(|(k, _)| k)).collect()
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub(super) fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        match self {
            Tree::Sled(t) => Iter::Sled(Box::new(t.scan_prefix(prefix))),
            Tree::Etcd(t) => Iter::Entries(t.entries(prefix.as_ref()).into_iter()),
        }
    }

    /// The entries written since `revision` (etcd's revisions; 0: all) and the revision the
    /// answer reaches. On sled, where one coordinator writes everything, there is nothing to
    /// learn from: no entries.
    pub(super) fn entries_since(&self, revision: i64) -> (Vec<Entry>, i64) {
        match self {
            Tree::Sled(_) => {
                let _ = revision;
                (Vec::new(), 0)
            }
            Tree::Etcd(t) => t.entries_since(revision),
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
            Tree::Etcd(_) => match self.first()? {
                Some((k, v)) => {
                    self.remove(&k)?;
                    Ok(Some((k, v)))
                }
                None => Ok(None),
            },
        }
    }

    /// How many entries (counts them).
    pub(super) fn len(&self) -> usize {
        match self {
            Tree::Sled(t) => t.len(),
            Tree::Etcd(t) => t.entries(b"").len(),
        }
    }

    /// Whether it has no entry.
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Tree::Sled(t) => t.is_empty(),
            Tree::Etcd(t) => t.entries(b"").is_empty(),
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
            Iter::Entries(i) => i.next().map(Ok),
        }
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Sled(i) => i.next_back().map(sled_kv::entry),
            Iter::Entries(i) => i.next_back().map(Ok),
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
