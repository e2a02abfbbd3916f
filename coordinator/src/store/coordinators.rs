//! The coordinators sharing this store, and the one that leads.
//!
//! On etcd every coordinator registers under a lease of its own (`coordinators/NAME`, gone
//! when it stops renewing), and the leader is whoever holds `lead/leader` under its lease:
//! claimed by a put-if-absent, lost when the lease expires. The leader's writes go through
//! [`Membership::leader_store`], whose every commit compares that key's lease: once the lease
//! is gone at etcd, they fail instead of landing after a new leader started. The leader also
//! steps down on its own when it has not renewed its lease for half its TTL, which is before
//! etcd can let anyone else take it.
//!
//! On sled there is one coordinator, and it leads from the start.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tunnelfleet_runtime::clock::now_unix_ms;

use super::{Store, StoreError, decode_all};

/// What a coordinator says of itself while it is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorRecord {
    /// Its name (unique in the fleet; the host name by default).
    pub name: String,
    /// Where agents dial it.
    pub control: String,
    /// Its admin API.
    pub admin: String,
    /// Its fleet page, when served.
    #[serde(default)]
    pub web: Option<String>,
    /// When it started (Unix ms).
    pub started_unix_ms: u64,
    /// Its version.
    pub version: String,
}

/// Where this coordinator stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// It decides: OMA probes, failover, alerts, deliveries, rollouts.
    Leader {
        /// Since when (Unix ms).
        since_unix_ms: u64,
    },
    /// Another one decides (None: nobody right now, an election is under way).
    Follower {
        /// The leader's name.
        leader: Option<String>,
    },
    /// etcd cannot be reached: it decides nothing until it can.
    Cut {
        /// Since when (Unix ms).
        since_unix_ms: u64,
    },
}

impl Standing {
    /// Whether this coordinator leads.
    pub fn leads(&self) -> bool {
        matches!(self, Standing::Leader { .. })
    }
}

/// This coordinator's membership: its standing, and the store handle its leader work writes
/// through. Dropping it (or the shutdown token) gives the lead up.
pub struct Membership {
    standing: tokio::sync::watch::Receiver<Standing>,
    leader_store: Store,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Membership {
    /// Where it stands now.
    pub fn standing(&self) -> Standing {
        self.standing.borrow().clone()
    }

    /// Told of every change of standing.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Standing> {
        self.standing.clone()
    }

    /// The store for the leader's work: on etcd every write through it commits only while
    /// this coordinator holds the lead (else [`StoreError::NotLeader`]).
    pub fn leader_store(&self) -> Store {
        self.leader_store.clone()
    }

    /// Waits until the membership task ended (after shutdown: the lead given up).
    pub async fn stopped(mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Store {
    /// Joins the coordinators sharing this store as `me`, campaigning for the lead with a
    /// lease of `ttl`, until `shutdown` (then the lease is revoked: the lead goes at once).
    pub async fn join(
        &self,
        me: CoordinatorRecord,
        ttl: Duration,
        shutdown: CancellationToken,
    ) -> Result<Membership, StoreError> {
        if let Some(etcd) = self.db.etcd() {
            let cell: super::engine::etcd_kv::FenceCell = Default::default();
            let leader_store = Store::trees(self.db.fenced(cell.clone()), self.id.clone())?;
            let (tx, rx) = tokio::sync::watch::channel(Standing::Follower { leader: None });
            let campaign = Campaign {
                store: self.clone(),
                db: etcd.clone(),
                me,
                ttl,
                cell,
                tx,
            };
            let task = tokio::spawn(campaign.run(shutdown));
            return Ok(Membership {
                standing: rx,
                leader_store,
                task: Some(task),
            });
        }
        let _ = (ttl, shutdown);
        // One coordinator on sled: this run's record replaces any an earlier run left (under
        // another name, say).
        for k in self.coordinators.keys()? {
            self.coordinators.remove(k)?;
        }
        self.coordinators
            .insert(me.name.as_bytes(), super::json(&me))?;
        self.durable().await?;
        let (_tx, rx) = tokio::sync::watch::channel(Standing::Leader {
            since_unix_ms: now_unix_ms(),
        });
        Ok(Membership {
            standing: rx,
            leader_store: self.clone(),
            task: None,
        })
    }

    /// The coordinators up now, by name.
    pub fn coordinators(&self) -> Result<Vec<CoordinatorRecord>, StoreError> {
        decode_all(&self.coordinators, "coordinators")
    }

    /// The leading coordinator's name, as this coordinator last saw it (on sled: the one).
    pub fn leader(&self) -> Result<Option<String>, StoreError> {
        if self.db.etcd().is_some() {
            return Ok(self
                .lead
                .get(b"leader")?
                .map(|v| String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(self.coordinators()?.into_iter().next().map(|c| c.name))
    }
}

/// The campaign of one coordinator on etcd.
struct Campaign {
    store: Store,
    db: super::engine::etcd_kv::EtcdDb,
    me: CoordinatorRecord,
    ttl: Duration,
    cell: super::engine::etcd_kv::FenceCell,
    tx: tokio::sync::watch::Sender<Standing>,
}

impl Campaign {
    fn set(&self, s: Standing) {
        self.tx.send_if_modified(|now| {
            // A follower that stays a follower of the same leader is no news.
            if *now == s {
                return false;
            }
            *now = s;
            true
        });
    }

    fn hold(&self, claim: Option<super::engine::etcd_kv::Claim>) {
        *self
            .cell
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = claim;
    }

    fn cut(&self) {
        self.hold(None);
        if !matches!(*self.tx.borrow(), Standing::Cut { .. }) {
            self.set(Standing::Cut {
                since_unix_ms: now_unix_ms(),
            });
        }
    }

    async fn run(self, shutdown: CancellationToken) {
        use super::engine::etcd_kv::Claim;
        let tick = self.ttl / 6;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            // One lease per round: registered under it, leading under it.
            let lease = match self.db.grant(self.ttl).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("{e}; this coordinator decides nothing until etcd answers");
                    self.cut();
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(tick) => continue,
                    }
                }
            };
            let key = format!("coordinators/{}", self.me.name);
            let registered = self
                .db
                .put_leased(key.as_bytes(), super::json(&self.me), lease)
                .await;
            let alive = match registered {
                Ok(()) => self.db.keep_alive(lease).await,
                Err(e) => Err(e),
            };
            let (mut keeper, mut stream) = match alive {
                Ok(k) => k,
                Err(e) => {
                    tracing::warn!("{e}; retrying");
                    self.cut();
                    let _ = self.db.revoke(lease).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(tick) => continue,
                    }
                }
            };
            // The send time of the last renewal etcd confirmed: etcd's TTL runs from a moment
            // after it, so stepping down TTL/2 after it is before anyone else can lead.
            let mut renewed = tokio::time::Instant::now();
            let mut leading = false;
            loop {
                if !leading {
                    match self.try_lead(lease).await {
                        Ok(true) => {
                            leading = true;
                            self.hold(Some(Claim { lease }));
                            tracing::info!(coordinator = %self.me.name, "this coordinator leads the fleet");
                            self.set(Standing::Leader {
                                since_unix_ms: now_unix_ms(),
                            });
                        }
                        Ok(false) => {}
                        Err(e) => tracing::debug!("campaign: {e}"),
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.hold(None);
                        // Revoked: the registration and the lead go now, not at the TTL.
                        let _ = self.db.revoke(lease).await;
                        return;
                    }
                    _ = tokio::time::sleep(tick) => {}
                }
                let sent = tokio::time::Instant::now();
                let renewal = async {
                    keeper.keep_alive().await.ok()?;
                    stream.message().await.ok().flatten()
                };
                match tokio::time::timeout(tick * 2, renewal).await {
                    Ok(Some(r)) if r.ttl() > 0 => renewed = sent,
                    Ok(Some(_)) => {
                        tracing::warn!(coordinator = %self.me.name, "this coordinator's lease expired");
                        break;
                    }
                    _ => {}
                }
                let lost = self.db.lost_lease() == lease
                    || (leading
                        && self
                            .store
                            .lead
                            .get(b"leader")
                            .ok()
                            .flatten()
                            .is_some_and(|v| v != self.me.name.as_bytes()));
                let late = sent.duration_since(renewed) >= self.ttl / 2;
                if leading && (late || lost) {
                    leading = false;
                    self.hold(None);
                    tracing::warn!(coordinator = %self.me.name, late, "this coordinator stops leading: its lease could not be renewed in time");
                    self.cut();
                }
                if late && sent.duration_since(renewed) >= self.ttl {
                    // The lease is surely gone at etcd: a new one.
                    break;
                }
                if lost {
                    break;
                }
            }
            self.hold(None);
            let _ = self.db.revoke(lease).await;
        }
    }

    /// Claims the lead if nobody holds it; otherwise follows whoever does.
    async fn try_lead(&self, lease: i64) -> Result<bool, StoreError> {
        use super::engine::etcd_kv::LEADER_KEY;
        // The mirror says who holds it: no request while someone does.
        if let Some(holder) = self.store.lead.get(b"leader")? {
            self.set(Standing::Follower {
                leader: Some(String::from_utf8_lossy(&holder).into_owned()),
            });
            return Ok(false);
        }
        match self
            .db
            .claim_key(LEADER_KEY, self.me.name.as_bytes().to_vec(), lease)
            .await?
        {
            None => Ok(true),
            Some(holder) => {
                self.set(Standing::Follower {
                    leader: Some(String::from_utf8_lossy(&holder).into_owned()),
                });
                Ok(false)
            }
        }
    }
}
