//! The leader's work: while this coordinator leads (on sled: always), the watcher (OMA
//! probes, failover and failback, alerts), the alert outbox and the rollout driver run and
//! write through the leader's store (fenced by its lease on etcd). When it stops leading they
//! stop; when it leads again they start again from what the store holds, as after a restart.
//! While it follows, the fleet's agent events are dropped here: the leader decides, from the
//! evidence every coordinator publishes ([`publish_evidence`]).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, FleetEvent};
use crate::metrics::Metrics;
use crate::monitor::AlertRules;
use crate::rollout::Rollouts;
use crate::store::{Standing, Store};
use crate::watch::WatchHandle;

/// What the leader runs, and with what.
pub struct LeaderWork {
    /// The registry of this coordinator's agents.
    pub fleet: Arc<Fleet>,
    /// The leader's store (fenced on etcd).
    pub store: Store,
    /// The fleet's agent events.
    pub fleet_events: mpsc::UnboundedReceiver<FleetEvent>,
    /// Alert rules.
    pub rules: AlertRules,
    /// Counters.
    pub metrics: Option<Arc<Metrics>>,
    /// Where the admin API reaches the watcher.
    pub handle: WatchHandle,
    /// The rollout driver.
    pub rollouts: Rollouts,
}

/// Runs the leader's work whenever `standing` says this coordinator leads, until `shutdown`.
pub async fn run(
    work: LeaderWork,
    mut standing: tokio::sync::watch::Receiver<Standing>,
    shutdown: CancellationToken,
) {
    let LeaderWork {
        fleet,
        store,
        mut fleet_events,
        rules,
        metrics,
        handle,
        rollouts,
    } = work;
    // Whether the standing can still change (on sled it never does).
    let mut changes = true;
    loop {
        while !standing.borrow().leads() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = standing.changed(), if changes => changes = r.is_ok(),
                ev = fleet_events.recv() => if ev.is_none() { return },
            }
            if !changes && !standing.borrow().leads() {
                // Following for good: only the shutdown is left to wait for.
                shutdown.cancelled().await;
                return;
            }
        }
        let term = shutdown.child_token();
        let watcher = crate::watch::start(
            &handle,
            fleet.clone(),
            store.clone(),
            fleet_events,
            rules.clone(),
            metrics.clone(),
            term.clone(),
        );
        let driver = tokio::spawn(rollouts.clone().run(term.clone()));
        loop {
            tokio::select! {
                _ = term.cancelled() => break,
                r = standing.changed(), if changes => {
                    changes = r.is_ok();
                    if !standing.borrow().leads() {
                        tracing::warn!("no longer leading: OMA decisions, alerts, deliveries and rollouts stop here");
                        break;
                    }
                }
            }
        }
        term.cancel();
        let _ = driver.await;
        fleet_events = match watcher.await {
            Ok(events) => events,
            Err(e) => {
                tracing::error!("the watcher ended abnormally: {e}");
                return;
            }
        };
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Pushes to this coordinator's agents whatever another coordinator changed (etcd): the
/// fleet version moved without a local write. It looks each time the store has seen a change
/// (at most every `every`); pushes are per agent against what it was given, so a version this
/// coordinator pushed itself costs nothing.
pub async fn follow_versions(
    fleet: Arc<Fleet>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let Some(mut changes) = fleet.store.changes() else {
        return;
    };
    let mut seen = fleet.store.fleet_version().unwrap_or(0);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        let Ok(now) = fleet.store.fleet_version() else {
            continue;
        };
        if now != seen {
            match fleet.push_changed() {
                Ok(pushed) if !pushed.is_empty() => {
                    tracing::info!(
                        version = now,
                        agents = pushed.len(),
                        "pushed a version another coordinator made"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::error!("pushing version {now}: {e}"),
            }
            seen = now;
        }
        // Many changes in a burst (a thousand agents' evidence) cost one look per `every`.
        tokio::time::sleep(every).await;
    }
}

/// Publishes what this coordinator knows of each agent linked to it (on a shared store), for
/// the leader's rules: every `every`, the agents whose link or heartbeats changed.
pub async fn publish_evidence(
    fleet: Arc<Fleet>,
    me: String,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    use std::collections::HashMap;
    // What a record says, less the heartbeat count: a heartbeat that says what the last one
    // did is no news (its arrival is, once, after an acknowledgement: a rollout's judge waits
    // for a heartbeat after it).
    type Mark = (u64, bool, bool, Option<u64>, Option<u64>, bool, u64);
    let mut published: HashMap<String, Mark> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut records = Vec::new();
        for l in fleet.links.evidence() {
            let says = {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                for h in [&l.judged, &l.last_heartbeat].into_iter().flatten() {
                    serde_json::to_vec(&h.profiles)
                        .unwrap_or_default()
                        .hash(&mut hasher);
                }
                hasher.finish()
            };
            let mark = (
                l.since_unix_ms,
                l.connected,
                l.online,
                l.pushed,
                l.acked,
                l.heartbeats > l.acked_heartbeats,
                says,
            );
            if published.get(&l.agent_id) == Some(&mark) {
                continue;
            }
            published.insert(l.agent_id.clone(), mark);
            records.push(crate::store::LiveRecord {
                agent: l.agent_id.clone(),
                coordinator: me.clone(),
                started_unix_ms: l.started_unix_ms,
                since_unix_ms: l.since_unix_ms,
                connected: l.connected,
                online: l.online,
                heartbeats: l.heartbeats,
                heartbeat: l.judged.as_deref().cloned(),
                reported: l.last_heartbeat.as_deref().cloned(),
                pushed: l.pushed,
                pushed_held: l.pushed_held,
                acked: l.acked,
                acked_heartbeats: l.acked_heartbeats,
                profiles: l.given.keys().cloned().collect(),
            });
        }
        if records.is_empty() {
            continue;
        }
        if let Err(e) = fleet.store.publish_live(&records).await {
            tracing::warn!("publishing agents' evidence: {e}; retrying");
            for r in &records {
                published.remove(&r.agent);
            }
        }
    }
}
