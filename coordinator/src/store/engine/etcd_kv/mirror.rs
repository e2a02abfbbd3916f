//! The mirror: every key under the prefix, loaded in pages at open and kept current by one
//! watch from the revision it was loaded at.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};

use super::{Inner, PAGE, never_sent, prefix_end, smaller_page, too_large};
use crate::store::StoreError;

/// Loads every key under the prefix at one revision (paged).
pub(super) async fn load(
    inner: &Inner,
) -> Result<(BTreeMap<Vec<u8>, (Vec<u8>, i64)>, i64), StoreError> {
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
pub(super) async fn watch(
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
