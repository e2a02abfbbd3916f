//! Agents' evidence shared through the store, for the leader: every coordinator writes what
//! it knows of each agent linked to it (connected, online, what counts of its last heartbeat),
//! one record per agent and coordinator, and the leader's rules read the others' records as
//! they read their own links. A record of one coordinator never overwrites another's, so an
//! agent that moved is told apart from one that left.

use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::Heartbeat;

use super::{Store, StoreError, decode, json};

/// What one coordinator knows of one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// The agent.
    pub agent: String,
    /// The coordinator it is (or was) linked to.
    pub coordinator: String,
    /// The agent process's start (from its hello): a new one is a restart.
    pub started_unix_ms: u64,
    /// When this link was made (Unix ms): the latest link of an agent is where it is.
    pub since_unix_ms: u64,
    /// Still connected there.
    pub connected: bool,
    /// Heard from within the offline threshold.
    pub online: bool,
    /// Heartbeats received on the link (a new one is new evidence).
    pub heartbeats: u64,
    /// What counts of its last heartbeat (judged against what was pushed to it).
    pub heartbeat: Option<Heartbeat>,
    /// Its last heartbeat as it sent it (a rollout's judge reads what it says of endpoints it
    /// was not given).
    #[serde(default)]
    pub reported: Option<Heartbeat>,
    /// The fleet version last pushed to it on this link.
    #[serde(default)]
    pub pushed: Option<u64>,
    /// That push was the set from before a rollout in progress.
    #[serde(default)]
    pub pushed_held: bool,
    /// The version whose `Applied` was taken.
    #[serde(default)]
    pub acked: Option<u64>,
    /// `heartbeats` when it was.
    #[serde(default)]
    pub acked_heartbeats: u64,
    /// The profiles pushed to it.
    #[serde(default)]
    pub profiles: Vec<String>,
}

fn key(agent: &str, coordinator: &str) -> Vec<u8> {
    let mut k = agent.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(coordinator.as_bytes());
    k
}

impl Store {
    /// Writes these records (durable before return).
    pub async fn publish_live(&self, records: &[LiveRecord]) -> Result<(), StoreError> {
        for r in records {
            self.live.insert(key(&r.agent, &r.coordinator), json(r))?;
        }
        self.durable().await
    }

    /// The latest evidence of each agent published by other coordinators than `me` (the
    /// latest link of an agent is where it is); none on sled.
    pub fn latest_live(
        &self,
        me: &str,
    ) -> Result<std::collections::BTreeMap<String, LiveRecord>, StoreError> {
        Ok(latest_per_agent(self.live_since(0)?.0, me))
    }

    /// The records changed since `revision` (0: all) and the revision they reach; on sled
    /// (one coordinator) there are none to read.
    pub fn live_since(&self, revision: i64) -> Result<(Vec<LiveRecord>, i64), StoreError> {
        let (entries, reached) = self.live.entries_since(revision);
        let mut out = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            out.push(decode(&v, "live", &String::from_utf8_lossy(&k))?);
        }
        Ok((out, reached))
    }
}

/// Of each agent's records, its latest link, leaving out those of coordinator `me` (whose
/// agents it knows from its own links).
pub fn latest_per_agent(
    records: Vec<LiveRecord>,
    me: &str,
) -> std::collections::BTreeMap<String, LiveRecord> {
    let mut latest: std::collections::BTreeMap<String, LiveRecord> = Default::default();
    for r in records {
        if r.coordinator == me {
            continue;
        }
        match latest.get(&r.agent) {
            Some(l) if l.since_unix_ms > r.since_unix_ms => {}
            _ => {
                latest.insert(r.agent.clone(), r);
            }
        }
    }
    latest
}
