//! The connected agents and their outgoing queues, and what the others read of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tunnelfleet_protocol::Heartbeat;

use super::{AgentLink, FrameQueue};

/// A connected agent's queue and connection.
pub(super) struct Live {
    pub(super) tx: FrameQueue,
    pub(super) conn: quinn::Connection,
}

/// One agent: what we know, and its outbox while connected.
pub(super) type Slot = (AgentLink, Option<Live>);

/// Connected agents and their outgoing queues. A `std` mutex: held only to copy or replace an
/// entry, never across an await.
#[derive(Default)]
pub struct Links {
    pub(super) inner: Mutex<HashMap<String, Slot>>,
}

impl Links {
    /// A snapshot of one agent.
    pub fn get(&self, id: &str) -> Option<AgentLink> {
        self.lock().get(id).map(|(l, _)| l.clone())
    }

    /// Ids of connected agents.
    pub fn connected(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .values()
            .filter(|(l, _)| l.connected)
            .map(|(l, _)| l.agent_id.clone())
            .collect();
        v.sort();
        v
    }

    /// Time since each connected agent was last heard from.
    pub fn heartbeat_ages(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|(l, _)| l.connected)
            .map(|(l, _)| {
                (
                    l.agent_id.clone(),
                    now.saturating_duration_since(l.last_heard),
                )
            })
            .collect()
    }

    /// Every agent known on this coordinator (connected or not), as evidence for the leader:
    /// the link's state and what counts of its last heartbeat.
    pub fn evidence(&self) -> Vec<AgentLink> {
        self.lock().values().map(|(l, _)| l.clone()).collect()
    }

    /// What counts of the last heartbeat of every connected agent ([`judged`]).
    pub fn heartbeats(&self) -> Vec<Arc<Heartbeat>> {
        self.lock()
            .values()
            .filter(|(l, _)| l.connected)
            .filter_map(|(l, _)| l.judged.clone())
            .collect()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
