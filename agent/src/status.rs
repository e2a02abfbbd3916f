//! What the agent knows about its tunnels, as data: the live state shared between a profile's
//! tasks, and the serializable snapshot the control socket returns.
//!
//! The live state sits behind a `std::sync::Mutex` because it is only ever held for a field
//! update or a snapshot, never across an `.await`; the byte counters are atomics so the data
//! path never takes the lock.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::{ErrorCount, ErrorKind, FailoverRecord};
use tunnelfleet_runtime::clock::now_unix_ms;

use crate::relay::ForwardCounters;

// The session and forward states are the protocol's: what `tunnels status` shows is what the
// heartbeat carries.
pub use tunnelfleet_protocol::{ForwardState, TunnelState};

/// One health check's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthResult {
    /// When it finished (Unix ms).
    pub at_unix_ms: u64,
    /// Whether it passed.
    pub ok: bool,
    /// How long it took, in milliseconds.
    pub latency_ms: f64,
    /// `HTTP 200`, `connected`, or the failure reason.
    pub detail: String,
}

/// Health of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// What is checked.
    pub target: String,
    /// Failures in a row that mark the profile down.
    pub threshold: u32,
    /// Failures in a row so far (reset by any pass).
    pub consecutive_failures: u32,
    /// False from the threshold until the next pass.
    pub healthy: bool,
    /// Checks run since the profile started.
    pub checks: u64,
    /// Checks failed since the profile started.
    pub failures: u64,
    /// The last result.
    pub last: Option<HealthResult>,
}

/// One forward in a status snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardStatus {
    /// The forward as written (`L 127.0.0.1:8082:localhost:8082`).
    pub spec: String,
    /// Its state.
    pub state: ForwardState,
    /// Why it is retrying, or what the server assigned.
    pub detail: Option<String>,
    /// Bytes from the local side into the tunnel.
    pub bytes_out: u64,
    /// Bytes from the tunnel to the local side.
    pub bytes_in: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections since start.
    pub connections_total: u64,
    /// Connections waiting for the server to open their channel.
    #[serde(default)]
    pub connections_opening: u64,
}

/// One profile in a status snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileStatus {
    /// Profile name.
    pub name: String,
    /// Free text from the config.
    pub description: String,
    /// Session state.
    pub state: TunnelState,
    /// Configured endpoints, priority order.
    pub endpoints: Vec<String>,
    /// The endpoint in use (or being tried).
    pub active_endpoint: String,
    /// When the current session came up (Unix ms).
    pub up_since_unix_ms: Option<u64>,
    /// Sessions re-established after the first.
    pub reconnects: u64,
    /// Moves to another endpoint.
    pub failovers: u64,
    /// The last failure, for `status`.
    pub last_error: Option<String>,
    /// Failures of the active endpoint in a row: failed connects and sessions that ended before
    /// they were stable (30 s); `failover_after` of them move to the next endpoint.
    #[serde(default)]
    pub failures_in_a_row: u32,
    /// Health, when a check is configured.
    pub health: Option<HealthStatus>,
    /// Forwards in config order.
    pub forwards: Vec<ForwardStatus>,
    /// Session failures per endpoint and kind since start.
    #[serde(default)]
    pub errors: Vec<ErrorCount>,
    /// The latest endpoint changes this profile made on its own, oldest first.
    #[serde(default)]
    pub failover_log: Vec<FailoverRecord>,
    /// Jump hosts the session goes through, first to last (empty: direct).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump: Vec<String>,
}

/// How many failovers a profile remembers for status and heartbeats.
pub const FAILOVER_LOG: usize = 8;

/// What `tunnels status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Agent version.
    pub version: String,
    /// Agent process id.
    pub pid: u32,
    /// When the agent started (Unix ms).
    pub started_unix_ms: u64,
    /// Every configured profile, running or not.
    pub profiles: Vec<ProfileStatus>,
}

/// Live state of one profile, shared by its tasks and read by the control socket.
#[derive(Debug)]
pub struct ProfileShared {
    status: Mutex<ProfileStatus>,
    /// Counters per forward, config order.
    pub counters: Vec<Arc<ForwardCounters>>,
}

impl ProfileShared {
    /// Fresh state for a profile whose forwards are `specs`.
    pub fn new(
        name: &str,
        description: &str,
        endpoints: Vec<String>,
        specs: &[String],
        health: Option<HealthStatus>,
    ) -> Self {
        let forwards = specs
            .iter()
            .map(|s| ForwardStatus {
                spec: s.clone(),
                state: ForwardState::Stopped,
                detail: None,
                bytes_out: 0,
                bytes_in: 0,
                connections_open: 0,
                connections_total: 0,
                connections_opening: 0,
            })
            .collect();
        ProfileShared {
            status: Mutex::new(ProfileStatus {
                name: name.to_string(),
                description: description.to_string(),
                state: TunnelState::Stopped,
                active_endpoint: endpoints.first().cloned().unwrap_or_default(),
                endpoints,
                up_since_unix_ms: None,
                reconnects: 0,
                failovers: 0,
                last_error: None,
                failures_in_a_row: 0,
                health,
                forwards,
                errors: Vec::new(),
                failover_log: Vec::new(),
                jump: Vec::new(),
            }),
            counters: specs
                .iter()
                .map(|_| Arc::new(ForwardCounters::default()))
                .collect(),
        }
    }

    /// Locks the status. A poisoned lock only means a panic elsewhere mid-update of plain data;
    /// the data is still the best we have, so keep serving it.
    pub fn lock(&self) -> MutexGuard<'_, ProfileStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy with the live byte counters filled in.
    pub fn snapshot(&self) -> ProfileStatus {
        let mut s = self.lock().clone();
        for (f, c) in s.forwards.iter_mut().zip(&self.counters) {
            f.bytes_out = c.bytes_out.load(Ordering::Relaxed);
            f.bytes_in = c.bytes_in.load(Ordering::Relaxed);
            f.connections_open = c.open.load(Ordering::Relaxed);
            f.connections_total = c.total.load(Ordering::Relaxed);
            f.connections_opening = c.opening.load(Ordering::Relaxed);
        }
        s
    }

    /// Sets the session state; logs the change once, with its cause.
    pub fn set_state(&self, state: TunnelState, cause: &str) {
        let mut s = self.lock();
        if s.state != state {
            tracing::info!(profile = %s.name, from = ?s.state, to = ?state, endpoint = %s.active_endpoint, "session {}", cause);
            s.state = state;
            if state == TunnelState::Up {
                s.up_since_unix_ms = Some(now_unix_ms());
            } else if s.up_since_unix_ms.is_some() {
                s.up_since_unix_ms = None;
            }
        }
    }

    /// Counts a session failure against `endpoint` and makes it the last error.
    pub fn record_error(&self, endpoint: &str, kind: ErrorKind, detail: String) {
        let mut s = self.lock();
        let now = now_unix_ms();
        match s
            .errors
            .iter_mut()
            .find(|e| e.endpoint == endpoint && e.kind == kind)
        {
            Some(e) => {
                e.count += 1;
                e.last_detail = detail.clone();
                e.last_unix_ms = now;
            }
            None => s.errors.push(ErrorCount {
                endpoint: endpoint.to_string(),
                kind,
                count: 1,
                last_detail: detail.clone(),
                last_unix_ms: now,
            }),
        }
        // Endpoints come and go with the group: the oldest counter makes room, so every
        // heartbeat stays within the protocol's bound.
        if s.errors.len() > tunnelfleet_protocol::limits::MAX_ERROR_COUNTS
            && let Some(oldest) = (0..s.errors.len()).min_by_key(|&i| s.errors[i].last_unix_ms)
        {
            s.errors.remove(oldest);
        }
        s.last_error = Some(detail);
    }

    /// Records a move to another endpoint; `own` when this agent made it on its own (a move
    /// the coordinator ordered for the group is counted, but not logged as the agent's).
    pub fn record_move(&self, from: &str, to: &str, reason: &str, own: bool) {
        let mut s = self.lock();
        s.failovers += 1;
        s.active_endpoint = to.to_string();
        if !own {
            return;
        }
        if s.failover_log.len() == FAILOVER_LOG {
            s.failover_log.remove(0);
        }
        s.failover_log.push(FailoverRecord {
            at_unix_ms: now_unix_ms(),
            from: from.to_string(),
            to: to.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Sets one forward's state; logs the change once, with its detail.
    pub fn set_forward(&self, index: usize, state: ForwardState, detail: Option<String>) {
        let mut s = self.lock();
        let name = s.name.clone();
        let Some(f) = s.forwards.get_mut(index) else {
            return;
        };
        if f.state != state || f.detail != detail {
            match (&state, &detail) {
                (ForwardState::Retrying, Some(d)) => {
                    tracing::warn!(profile = %name, forward = %f.spec, "forward failed: {d}")
                }
                _ => {
                    tracing::info!(profile = %name, forward = %f.spec, from = ?f.state, to = ?state, detail = detail.as_deref().unwrap_or(""), "forward state changed")
                }
            }
            f.state = state;
            f.detail = detail;
        }
    }
}
