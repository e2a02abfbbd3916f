//! Leases, keys put under them, and the leader's claim on [`LEADER_KEY`].

use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::EtcdDb;
use crate::store::StoreError;

impl EtcdDb {
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
}

/// The value and lease of the key a transaction's `or_else` read, if it exists.
pub(super) fn holder(r: &etcd_client::TxnResponse) -> Option<(Vec<u8>, i64)> {
    r.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => {
            g.kvs().first().map(|k| (k.value().to_vec(), k.lease()))
        }
        _ => None,
    })
}
