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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, TlsOptions, Txn, TxnOp,
    WatchOptions,
};

use super::{Abort, Entry, StoreError, TxTree};
use crate::store::EtcdConfig;

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

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
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
    pub(super) async fn open(cfg: &EtcdConfig) -> Result<EtcdDb, StoreError> {
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
    pub(super) fn with_fence(&self, cell: FenceCell) -> EtcdDb {
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

    /// A new lease of `ttl`.
    pub(crate) async fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let secs = ttl.as_secs().max(1) as i64;
        let r = self
            .call("granting a lease", || {
                let mut c = self.inner.client.lease_client();
                async move { c.grant(secs, None).await }
            })
            .await?;
        Ok(r.id())
    }

    /// A keep-alive stream for `lease`.
    pub(crate) async fn keep_alive(
        &self,
        lease: i64,
    ) -> Result<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), StoreError> {
        self.call("keeping a lease alive", || {
            let mut c = self.inner.client.lease_client();
            async move { c.keep_alive(lease).await }
        })
        .await
    }

    /// Gives `lease` up (its keys go at once).
    pub(crate) async fn revoke(&self, lease: i64) -> Result<(), StoreError> {
        self.call("revoking a lease", || {
            let mut c = self.inner.client.lease_client();
            async move { c.revoke(lease).await }
        })
        .await
        .map(|_| ())
    }

    /// Puts `key` (prefix-relative) under `lease`.
    pub(crate) async fn put_leased(
        &self,
        key: &[u8],
        value: Vec<u8>,
        lease: i64,
    ) -> Result<(), StoreError> {
        let full = self.full(key);
        self.call("registering", || {
            let mut kv = self.inner.client.kv_client();
            let (full, value) = (full.clone(), value.clone());
            let opts = etcd_client::PutOptions::new().with_lease(lease);
            async move { kv.put(full, value, Some(opts)).await }
        })
        .await
        .map(|_| ())
    }

    /// Puts `key` (prefix-relative) under `lease` if nobody holds it: Ok(None) when it is
    /// ours now, Ok(Some(holder's value)) when someone else's.
    pub(crate) async fn claim_key(
        &self,
        key: &[u8],
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.full(key);
        let txn = Txn::new()
            .when([Compare::create_revision(full.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                full.clone(),
                value,
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(full, None)]);
        let r = self.txn("claiming the lead", txn).await?;
        if r.succeeded() {
            return Ok(None);
        }
        Ok(holder(&r).map(|(v, _)| v).or(Some(Vec::new())))
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

    pub(super) fn open_tree(&self, name: &'static str) -> EtcdTree {
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

    pub(super) async fn generate_id(&self) -> Result<u64, StoreError> {
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
    pub(super) async fn reserve_ids(&self, next: u64) -> Result<(), StoreError> {
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

    pub(super) fn flushes(&self) -> u64 {
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

    /// Commits every queued plain write (group commit: one caller commits what all queued).
    /// Writes fenced by a claim go in transactions of their own that commit only while the
    /// claim holds; when it is gone they are dropped, never applied.
    pub(super) async fn durable(&self) -> Result<(), StoreError> {
        self.commit_queued().await?;
        // A fenced caller learns here that its writes went nowhere.
        self.claim().map(|_| ())
    }

    async fn commit_queued(&self) -> Result<(), StoreError> {
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

    fn queued_is_empty(&self) -> bool {
        self.inner
            .queued
            .lock()
            .map(|q| q.is_empty())
            .unwrap_or(false)
    }

    pub(super) async fn transaction<const N: usize, T>(
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

impl EtcdTxTree<'_> {
    pub(super) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
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

    pub(super) fn insert(&self, key: &[u8], value: &[u8]) -> Option<Vec<u8>> {
        let old = self.get(key);
        self.tx
            .writes
            .borrow_mut()
            .insert(qualified(self.tree, key), Some(value.to_vec()));
        old
    }

    pub(super) fn remove(&self, key: &[u8]) -> Option<Vec<u8>> {
        let old = self.get(key);
        self.tx
            .writes
            .borrow_mut()
            .insert(qualified(self.tree, key), None);
        old
    }
}

impl EtcdTree {
    pub(super) fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
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

    pub(super) fn insert(&self, key: &[u8], value: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.queue(key, Some(value.to_vec()))
    }

    pub(super) fn remove(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.queue(key, None)
    }

    /// The entries of this tree etcd committed after `revision`, and the revision the mirror
    /// has seen everything up to (queued writes are this coordinator's own: not included).
    pub(super) fn entries_since(&self, revision: i64) -> (Vec<Entry>, i64) {
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
    pub(super) fn entries(&self, prefix: &[u8]) -> Vec<Entry> {
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

/// The value and lease of the key a transaction's `or_else` read, if it exists.
fn holder(r: &etcd_client::TxnResponse) -> Option<(Vec<u8>, i64)> {
    r.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => {
            g.kvs().first().map(|k| (k.value().to_vec(), k.lease()))
        }
        _ => None,
    })
}

/// Loads every key under the prefix at one revision (paged).
async fn load(inner: &Inner) -> Result<(BTreeMap<Vec<u8>, (Vec<u8>, i64)>, i64), StoreError> {
    let err = |e: &dyn std::fmt::Display| StoreError::Etcd {
        endpoints: inner.endpoints.clone(),
        reason: format!("loading the state: {e}"),
    };
    let mut kv = inner.client.kv_client();
    let end = prefix_end(&inner.prefix);
    let mut from = inner.prefix.clone();
    let mut revision = 0;
    let mut out = BTreeMap::new();
    // Keys per page: a page is one gRPC message, which the client takes up to 4 MiB; pages of
    // large values (history revisions of a fleet with many profiles) shrink until they fit.
    let mut page = PAGE;
    loop {
        // A read may be sent again whatever happened to it: a member that refused the
        // connection is skipped a moment later.
        let mut tries = 0;
        let r = loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(page);
            if revision > 0 {
                opts = opts.with_revision(revision);
            }
            match tokio::time::timeout(inner.timeout, kv.get(from.clone(), Some(opts))).await {
                Ok(Ok(r)) => break r,
                Ok(Err(e)) if never_sent(&e) && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) if too_large(&e) && page > 1 => page = smaller_page(page),
                Ok(Err(e)) => return Err(err(&e)),
                Err(_) => return Err(err(&"timed out")),
            }
        };
        if revision == 0 {
            revision = r.header().map_or(0, |h| h.revision());
        }
        for k in r.kvs() {
            if let Some(rel) = k.key().strip_prefix(inner.prefix.as_slice()) {
                out.insert(rel.to_vec(), (k.value().to_vec(), k.mod_revision()));
            }
        }
        match (r.more(), r.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((out, revision)),
        }
    }
}

/// Keeps the mirror current until the database is dropped: one watch from the revision it
/// was loaded at; a broken watch is started again from what the mirror has seen, and a watch
/// etcd compacted past reloads everything.
async fn watch(
    inner: std::sync::Weak<Inner>,
    mut revision: i64,
    mut progress: tokio::sync::mpsc::Receiver<()>,
) {
    loop {
        let Some(db) = inner.upgrade() else { return };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1)
            .with_progress_notify();
        let stream = db
            .client
            .watch_client()
            .watch(db.prefix.clone(), Some(opts))
            .await;
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(endpoints = %db.endpoints, "etcd watch: {e}; retrying");
                drop(db);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        drop(db);
        loop {
            let msg = tokio::select! {
                Some(()) = progress.recv() => {
                    let _ = stream.request_progress().await;
                    continue;
                }
                m = stream.message() => m,
            };
            let Some(db) = inner.upgrade() else { return };
            match msg {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 || resp.canceled() {
                        tracing::warn!(endpoints = %db.endpoints, compacted = resp.compact_revision(), "etcd watch ended ({}); reloading the state", resp.cancel_reason());
                        match load(&db).await {
                            Ok((kv, r)) => {
                                if let Ok(mut m) = db.mirror.write() {
                                    m.kv = kv;
                                }
                                revision = r;
                                db.seen.send_replace(r);
                            }
                            Err(e) => {
                                tracing::warn!("{e}; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                        break;
                    }
                    if let Ok(mut m) = db.mirror.write() {
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let Some(rel) = kv.key().strip_prefix(db.prefix.as_slice()) else {
                                continue;
                            };
                            match ev.event_type() {
                                EventType::Put => {
                                    m.kv.insert(
                                        rel.to_vec(),
                                        (kv.value().to_vec(), kv.mod_revision()),
                                    );
                                }
                                EventType::Delete => {
                                    m.kv.remove(rel);
                                }
                            }
                            revision = revision.max(kv.mod_revision());
                        }
                    }
                    // A progress report (no events, not the creation) says every event up to
                    // its revision was sent; an event response's header may run ahead of
                    // events still to come while the watch catches up.
                    if resp.events().is_empty()
                        && !resp.created()
                        && let Some(h) = resp.header()
                    {
                        revision = revision.max(h.revision());
                    }
                    db.seen.send_replace(revision);
                }
                Ok(None) | Err(_) => {
                    if let Err(e) = msg {
                        tracing::warn!(endpoints = %db.endpoints, "etcd watch: {e}; watching again");
                    }
                    drop(db);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
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
