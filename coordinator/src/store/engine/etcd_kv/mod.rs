//! etcd behind the engine boundary, for several coordinators sharing one fleet state.
//!
//! - **Reads** come from a mirror of every key under the store's prefix in memory, loaded at
//!   open and kept current by one watch from the revision it was loaded at (a full reload when
//!   etcd compacted past it). A fleet's state is small; reads stay synchronous and cheap.
//! - **Transactions** are optimistic: the closure runs against the mirror, every key it reads
//!   is compared by its mod revision (0: absent) in one etcd transaction that also carries the
//!   writes. A conflict (someone wrote a read key since) waits for the mirror to see that
//!   write and runs the closure again. A committed transaction returns once the mirror has
//!   seen its revision, so the caller reads what it wrote.
//! - **Plain writes** (outside a transaction) are visible here at once and committed by the
//!   next [`EtcdDb::durable`], many writers' in one etcd transaction (group commit). A write
//!   etcd refused (no quorum) stays queued, is reported to its caller as not durable, and goes
//!   with the next commit that succeeds; at most [`MAX_QUEUED`] wait.
//! - **Ids** come in blocks of [`ID_BLOCK`] taken from one counter key by compare-and-swap,
//!   so two coordinators never hand out the same id.
//!
//! Here: the client, its requests and the mirror's types; `mirror` loads and watches it;
//! `commit` has transactions and the group commit of queued writes; `lease` the leases,
//! leased keys and the leader's claim; `ids` the id blocks.

mod commit;
mod ids;
mod lease;
mod mirror;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, TlsOptions, Txn};

use super::StoreError;
use crate::store::EtcdConfig;
use mirror::{load, watch};

/// Most operations one etcd transaction carries (etcd's `--max-txn-ops` default is 128).
pub(crate) const MAX_TXN_OPS: usize = 128;

/// Bytes one group commit sends at most (etcd's request limit is 1.5 MiB by default).
const MAX_TXN_BYTES: usize = 1 << 20;

/// Plain writes queued while etcd does not commit them, at most; more are refused.
pub(crate) const MAX_QUEUED: usize = 65_536;

/// Ids taken from the shared counter at a time.
pub(crate) const ID_BLOCK: u64 = 1024;

/// Times a transaction runs again on conflicts before it gives up.
const MAX_ATTEMPTS: usize = 64;

/// What a commit without an answer means.
const NO_ANSWER: &str = "no answer in time (no quorum?): the outcome is unknown until etcd answers";

/// Keys loaded per range request.
const PAGE: i64 = 1000;

/// The key of the shared id counter (not in any tree: tree keys are `name/…`).
const IDS_KEY: &[u8] = b"_ids";

/// The key the leader holds with its lease (see `store::coordinators`).
pub(crate) const LEADER_KEY: &[u8] = b"lead/leader";

/// The leader's hold on [`LEADER_KEY`]: the lease it was put with. A write fenced by it
/// commits only while etcd still has the key under that lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    /// The lease id.
    pub(crate) lease: i64,
}

/// Where a fenced handle reads the claim it writes under (None: not leading now).
pub(crate) type FenceCell = Arc<std::sync::RwLock<Option<Claim>>>;

/// An open etcd store: the client, the mirror and its watch, queued writes; and, for the
/// leader's handle, the fence every write of it carries.
#[derive(Clone)]
pub(crate) struct EtcdDb {
    inner: Arc<Inner>,
    fence: Option<FenceCell>,
}

/// A queued plain write: the value (None: removed) and the lease that fences it.
type Queued = (Option<Vec<u8>>, Option<i64>);

struct Inner {
    client: Client,
    /// Every key of ours starts with this.
    prefix: Vec<u8>,
    /// For errors: the endpoints as configured.
    endpoints: String,
    /// Deadline of one etcd request.
    timeout: Duration,
    mirror: std::sync::RwLock<Mirror>,
    /// The revision the mirror has seen everything up to.
    seen: tokio::sync::watch::Sender<i64>,
    /// Plain writes not yet committed: tree-qualified key -> value and fence.
    queued: std::sync::Mutex<BTreeMap<Vec<u8>, Queued>>,
    /// The last lease a fenced commit found gone (0: none): the leader lost its claim.
    lost: std::sync::atomic::AtomicI64,
    /// One group commit at a time.
    commit_lock: tokio::sync::Mutex<()>,
    /// The id block: next, end (exclusive).
    ids: tokio::sync::Mutex<(u64, u64)>,
    /// Asks the watch for a progress report (after a conflict).
    progress: tokio::sync::mpsc::Sender<()>,
    flushes: AtomicU64,
    /// Requests sent, failed, and the time they took (µs), for `/metrics`.
    requests: AtomicU64,
    errors: AtomicU64,
    micros: AtomicU64,
    watch_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut t) = self.watch_task.lock()
            && let Some(t) = t.take()
        {
            t.abort();
        }
    }
}

/// Tree-qualified key (`tree/key`, prefix stripped) -> value and mod revision.
#[derive(Default)]
struct Mirror {
    kv: BTreeMap<Vec<u8>, (Vec<u8>, i64)>,
}

/// One tree: its name with the separator.
#[derive(Clone)]
pub(crate) struct EtcdTree {
    db: EtcdDb,
    /// `name/`.
    tree: Vec<u8>,
}

/// The keys a transaction read (with the mod revision it saw) and what it wrote.
pub(crate) struct EtcdTx<'a> {
    mirror: &'a Mirror,
    queued: &'a BTreeMap<Vec<u8>, Queued>,
    reads: std::cell::RefCell<BTreeMap<Vec<u8>, i64>>,
    writes: std::cell::RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// It read a key with a queued plain write: commit those first and run again.
    saw_queued: std::cell::Cell<bool>,
}

/// One tree inside an etcd transaction.
pub(crate) struct EtcdTxTree<'a> {
    tx: &'a EtcdTx<'a>,
    tree: &'a [u8],
}

fn qualified(tree: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(tree.len() + key.len());
    k.extend_from_slice(tree);
    k.extend_from_slice(key);
    k
}

/// Whether a request failed before it was sent: the connection to the member it was routed
/// to could not be made. Only such a request may be sent again.
fn never_sent(e: &etcd_client::Error) -> bool {
    match e {
        // gRPC's UNAVAILABLE (14) raised by the transport while connecting.
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == 14 && s.message().contains("connect error")
        }
        _ => false,
    }
}

/// A response bigger than the client takes in one message (gRPC's OUT_OF_RANGE, 11, from the
/// decoder).
fn too_large(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == 11 && s.message().contains("message length too large")
        }
        _ => false,
    }
}

/// The next page size after one that was too large: a quarter, at least one key.
fn smaller_page(page: i64) -> i64 {
    (page / 4).max(1)
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the key space.
    vec![0]
}

impl EtcdDb {
    /// Connects, loads every key under the prefix and starts the watch.
    pub(in crate::store::engine) async fn open(cfg: &EtcdConfig) -> Result<EtcdDb, StoreError> {
        let endpoints = cfg.endpoints.join(",");
        let err = |what: &str, e: &dyn std::fmt::Display| StoreError::Etcd {
            endpoints: endpoints.clone(),
            reason: format!("{what}: {e}"),
        };
        let mut opts = ConnectOptions::new()
            .with_timeout(cfg.timeout)
            .with_connect_timeout(cfg.timeout)
            .with_keep_alive(Duration::from_secs(2), cfg.timeout)
            .with_require_leader(true);
        if let Some(ca) = &cfg.ca {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| err(&format!("{}", p.display()), &e))
            };
            let mut tls =
                TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
                tunnelfleet_runtime::secret::check_permissions(key)
                    .map_err(|e| err(&format!("{}", key.display()), &e))?;
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        if let Some(user) = &cfg.user {
            let file = cfg
                .password_file
                .as_deref()
                .ok_or_else(|| StoreError::Etcd {
                    endpoints: endpoints.clone(),
                    reason: "etcd.user needs etcd.password_file".into(),
                })?;
            tunnelfleet_runtime::secret::check_permissions(file)
                .map_err(|e| err(&format!("{}", file.display()), &e))?;
            let password = std::fs::read_to_string(file)
                .map_err(|e| err(&format!("{}", file.display()), &e))?;
            opts = opts.with_user(user.clone(), password.trim().to_string());
        }
        let client = tokio::time::timeout(cfg.timeout, Client::connect(&cfg.endpoints, Some(opts)))
            .await
            .map_err(|_| err("connecting", &format!("no answer within {:?}", cfg.timeout)))?
            .map_err(|e| err("connecting", &e))?;
        let (progress, progress_rx) = tokio::sync::mpsc::channel(8);
        let db = EtcdDb {
            inner: Arc::new(Inner {
                client,
                prefix: cfg.prefix.as_bytes().to_vec(),
                endpoints,
                timeout: cfg.timeout,
                mirror: std::sync::RwLock::new(Mirror::default()),
                seen: tokio::sync::watch::Sender::new(0),
                queued: std::sync::Mutex::new(BTreeMap::new()),
                lost: std::sync::atomic::AtomicI64::new(0),
                commit_lock: tokio::sync::Mutex::new(()),
                ids: tokio::sync::Mutex::new((0, 0)),
                progress,
                flushes: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                micros: AtomicU64::new(0),
                watch_task: std::sync::Mutex::new(None),
            }),
            fence: None,
        };
        let revision = db.reload().await?;
        let weak = Arc::downgrade(&db.inner);
        let task = tokio::spawn(watch(weak, revision, progress_rx));
        if let Ok(mut t) = db.inner.watch_task.lock() {
            *t = Some(task);
        }
        Ok(db)
    }

    /// This database as the leader's handle: every write it makes commits only while the
    /// claim in `cell` holds.
    pub(in crate::store::engine) fn with_fence(&self, cell: FenceCell) -> EtcdDb {
        EtcdDb {
            inner: self.inner.clone(),
            fence: Some(cell),
        }
    }

    /// The claim this handle writes under now: Ok(None) unfenced, an error when fenced and
    /// not leading (or the claim was found gone).
    fn claim(&self) -> Result<Option<Claim>, StoreError> {
        let Some(cell) = &self.fence else {
            return Ok(None);
        };
        let claim = *cell
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match claim {
            Some(c) if c.lease != self.inner.lost.load(SeqCst) => Ok(Some(c)),
            _ => Err(StoreError::NotLeader),
        }
    }

    /// The lease a fenced commit last found gone (0: none).
    pub(crate) fn lost_lease(&self) -> i64 {
        self.inner.lost.load(SeqCst)
    }

    fn fence_compare(&self, c: Claim) -> Compare {
        Compare::lease(self.full(LEADER_KEY), CompareOp::Equal, c.lease)
    }

    /// An etcd request with this store's deadline; the error names what was being done. A
    /// request that never left (the member it was routed to refused the connection: a member
    /// down, which the client's balancing has not noticed yet) is sent again, so losing one
    /// member of three stops nothing; one that may have arrived is never sent twice.
    async fn call<T, F>(&self, what: &str, mut f: impl FnMut() -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = tokio::time::Instant::now();
        let deadline = start + self.inner.timeout;
        let mut pause = Duration::from_millis(10);
        let count = |failed: bool| {
            self.inner.requests.fetch_add(1, SeqCst);
            if failed {
                self.inner.errors.fetch_add(1, SeqCst);
            }
            self.inner
                .micros
                .fetch_add(start.elapsed().as_micros() as u64, SeqCst);
        };
        loop {
            let r = tokio::time::timeout_at(deadline, f()).await;
            count(!matches!(r, Ok(Ok(_))));
            match r {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if never_sent(&e) && tokio::time::Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Ok(Err(e)) => return Err(self.error(what, e)),
                Err(_) => return Err(self.error(what, NO_ANSWER)),
            }
        }
    }

    /// A transaction, through [`EtcdDb::call`].
    async fn txn(&self, what: &str, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.call(what, || {
            let (mut kv, txn) = (self.inner.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// A read of one key, through [`EtcdDb::call`].
    async fn get(
        &self,
        what: &str,
        key: &[u8],
        opts: Option<GetOptions>,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        self.call(what, || {
            let (mut kv, key, opts) = (self.inner.client.kv_client(), key.to_vec(), opts.clone());
            async move { kv.get(key, opts).await }
        })
        .await
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            endpoints: self.inner.endpoints.clone(),
            reason: format!("{what}: {e}"),
        }
    }

    /// Loads every key under the prefix at one revision into a new mirror; returns the
    /// revision.
    async fn reload(&self) -> Result<i64, StoreError> {
        let (kv, revision) = load(&self.inner).await?;
        if let Ok(mut m) = self.inner.mirror.write() {
            m.kv = kv;
        }
        self.inner.seen.send_replace(revision);
        Ok(revision)
    }

    pub(in crate::store::engine) fn open_tree(&self, name: &'static str) -> EtcdTree {
        let mut tree = name.as_bytes().to_vec();
        tree.push(b'/');
        EtcdTree {
            db: self.clone(),
            tree,
        }
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        qualified(&self.inner.prefix, key)
    }

    /// Waits until the mirror has seen `revision`.
    async fn seen(&self, revision: i64) -> Result<(), StoreError> {
        let mut rx = self.inner.seen.subscribe();
        match tokio::time::timeout(self.inner.timeout * 2, rx.wait_for(|r| *r >= revision)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.error(
                "watch",
                format!(
                    "revision {revision} not seen within {:?}",
                    self.inner.timeout * 2
                ),
            )),
        }
    }

    pub(in crate::store::engine) fn flushes(&self) -> u64 {
        self.inner.flushes.load(SeqCst)
    }

    /// Told each time the mirror has seen more of etcd (the revision it reached).
    pub(crate) fn revisions(&self) -> tokio::sync::watch::Receiver<i64> {
        self.inner.seen.subscribe()
    }

    /// Requests sent, failed, and their total time in seconds.
    pub(crate) fn stats(&self) -> (u64, u64, f64) {
        (
            self.inner.requests.load(SeqCst),
            self.inner.errors.load(SeqCst),
            self.inner.micros.load(SeqCst) as f64 / 1e6,
        )
    }

    fn mirror(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        // A poisoned lock only means a reader panicked; the map is whole.
        self.inner
            .mirror
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn queued(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Queued>> {
        self.inner
            .queued
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"tf/"), b"tf0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
