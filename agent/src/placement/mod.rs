//! Where a profile's session goes next: the counting rules of failover and failback, free of IO.
//!
//! The profile runner reports what happened (a connect failed, a session ended and why, the
//! preferred endpoint answered a probe or not) and asks where to go; every rule lives here, so
//! each is tested on tokio's paused clock:
//!
//! - **A lost session moves at once.** When the active endpoint stops answering (keepalive
//!   timeout, reset, EOF), the next endpoint is tried immediately instead of spending connect
//!   timeouts on the one just lost. With the defaults (keepalive 5 s × 3) data flows through the
//!   standby about 15 s after a blackhole plus one handshake.
//! - **Connect failures count.** `failover_after` failed connects in a row move to the next
//!   endpoint; a session that lasted [`STABLE_SESSION`] resets the count, so a server that lets
//!   us in and throws us out at once counts against itself. When every endpoint does that, the
//!   moves after the first wait the backoff (it resets only after a stable session): no tight
//!   loop of logins between two servers that each throw us out.
//! - **A bastion is not the OMA.** A jump host's failure (its own connect, handshake, or a
//!   session lost through it) never counts toward `failover_after`: the path is retried with
//!   backoff, the endpoint keeps its place.
//! - **Health**, the decision table of [`health_step`]: when the check crosses its threshold
//!   (`threshold` failures in a row), one fresh session on the same endpoint; if that one's own
//!   check fails too, the other endpoints in order, the first whose new session passes its
//!   check taking over — unless the coordinator's evidence says other agents on this endpoint
//!   pass theirs, more of them than fail there: then the fault is this appliance's, and it
//!   stays (its `tunnel_health` alert says so). Later crossings of the same streak (every `threshold` more failures) skip the
//!   fresh session. A single endpoint gets a fresh session at every crossing. A new session
//!   replaces the old only once its own check passes: open connections carry on meanwhile.
//! - **Failback.** Off the preferred endpoint (the first: for a group, the group's choice), the
//!   runner probes it; once it answered every probe for `failback_after`, the runner moves back,
//!   make-before-break.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tunnelfleet_protocol::ErrorKind;

/// A session that lasted this long counts as a success: the failure count resets. Shorter ones
/// (accepted, then dropped) count as failures of the endpoint, so a server that lets us in and
/// throws us out cannot hold us in a tight reconnect loop.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Whether a coordinator is connected and so decides moves for the profiles it pushed, and the
/// way a profile asks for a heartbeat now (its health went down, it moved) instead of at the
/// next tick, so the coordinator's rules see it at once. The fleet link sets and reads it;
/// local profiles get one that stays false and that nobody reads (they are on their own).
#[derive(Debug, Clone, Default)]
pub struct Coordinated(Arc<CoordinatedInner>);

#[derive(Debug, Default)]
struct CoordinatedInner {
    connected: AtomicBool,
    report: tokio::sync::Notify,
    /// Endpoint -> (other agents passing and failing their checks through it, when the
    /// coordinator said so). Bounded: at most [`MAX_EVIDENCE`] endpoints.
    evidence: std::sync::Mutex<std::collections::HashMap<String, (Evidence, Instant)>>,
}

/// How long the coordinator's word on an endpoint counts (it repeats it with the heartbeats
/// that report failing checks there).
pub const EVIDENCE_FRESH: Duration = Duration::from_secs(30);

/// Endpoints whose evidence an agent keeps (the coordinator only speaks of endpoints it gave).
pub const MAX_EVIDENCE: usize = 256;

impl Coordinated {
    /// Sets it (the link came up, or went away).
    pub fn set(&self, connected: bool) {
        self.0.connected.store(connected, Ordering::Relaxed);
    }

    /// Whether a coordinator is connected now.
    pub fn get(&self) -> bool {
        self.0.connected.load(Ordering::Relaxed)
    }

    /// Asks the link for a heartbeat now (several asks before it sends are one heartbeat).
    pub fn report_now(&self) {
        self.0.report.notify_one();
    }

    /// Resolves when a heartbeat was asked for.
    pub async fn report_asked(&self) {
        self.0.report.notified().await;
    }

    /// The coordinator says `passing` other agents pass their checks through `endpoint` and
    /// `failing` fail there.
    pub fn evidence_heard(&self, endpoint: &str, passing: u32, failing: u32, now: Instant) {
        let mut map = self.0.evidence.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_EVIDENCE && !map.contains_key(endpoint) {
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < EVIDENCE_FRESH);
            if map.len() >= MAX_EVIDENCE {
                return;
            }
        }
        map.insert(
            endpoint.to_string(),
            (Evidence::Others { passing, failing }, now),
        );
    }

    /// What the coordinator last said of `endpoint`, while connected and fresh.
    pub fn evidence(&self, endpoint: &str, now: Instant) -> Evidence {
        if !self.get() {
            return Evidence::Unknown;
        }
        let map = self.0.evidence.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(endpoint) {
            Some((e, at)) if now.saturating_duration_since(*at) < EVIDENCE_FRESH => *e,
            _ => Evidence::Unknown,
        }
    }
}

/// Why a session that was up ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The session died (keepalive timeout, reset, EOF, server disconnect).
    Lost,
    /// An operator (or the coordinator) asked for a fresh session.
    Restart,
}

/// What the runner does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The same endpoint again, after the backoff.
    Retry,
    /// The same endpoint again, now.
    Now,
    /// Endpoint `to` (an index), now.
    Move {
        /// Where it was.
        from: usize,
        /// Where it goes.
        to: usize,
    },
    /// Endpoint `to`, after the backoff: sessions keep ending before they are stable, on
    /// more than one endpoint.
    MoveLater {
        /// Where it was.
        from: usize,
        /// Where it goes.
        to: usize,
    },
}

/// The placement state of one profile.
#[derive(Debug, Clone)]
pub struct Placement {
    endpoints: usize,
    current: usize,
    failures: u32,
    failover_after: u32,
    failback_after: Duration,
    through_jumps: bool,
    /// Sessions lost before they were stable, in a row, on any endpoint.
    short_losses: u32,
    /// Since when the preferred endpoint has answered every probe.
    reachable_since: Option<Instant>,
}

impl Placement {
    /// A profile with `endpoints` endpoints (at least one), on the first.
    pub fn new(
        endpoints: usize,
        failover_after: u32,
        failback_after: Duration,
        through_jumps: bool,
    ) -> Self {
        Placement {
            endpoints: endpoints.max(1),
            current: 0,
            failures: 0,
            failover_after: failover_after.max(1),
            failback_after,
            through_jumps,
            short_losses: 0,
            reachable_since: None,
        }
    }

    /// The endpoint (index) to be on.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Failures of the current endpoint in a row (failed connects, sessions shorter than
    /// [`STABLE_SESSION`]).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A connect to the current endpoint failed with `kind`.
    pub fn connect_failed(&mut self, kind: ErrorKind) -> Next {
        if kind == ErrorKind::Jump {
            // The path failed, not the endpoint: keep its place and its count.
            return Next::Retry;
        }
        self.count_failure()
    }

    /// A session to the current endpoint came up.
    pub fn connected(&mut self) {
        if self.current == 0 {
            self.reachable_since = None;
        }
    }

    /// The session to the current endpoint ended after `lasted`; `coordinated` when a
    /// coordinator is connected to decide moves for the group.
    pub fn session_ended(&mut self, ended: Ended, lasted: Duration) -> Next {
        let stable = lasted >= STABLE_SESSION;
        if stable {
            self.failures = 0;
            self.short_losses = 0;
        }
        match ended {
            Ended::Restart => {
                self.failures = 0;
                Next::Now
            }
            // Through jump hosts a lost session may be the path's doing as much as the
            // endpoint's: not evidence against it.
            Ended::Lost if self.through_jumps => Next::Retry,
            Ended::Lost => {
                if !stable {
                    self.short_losses = self.short_losses.saturating_add(1);
                }
                if self.endpoints == 1 {
                    self.failures = self.failures.saturating_add(1);
                    return Next::Retry;
                }
                match self.move_next() {
                    // The first loss moves at once (a blackholed OMA); a second short one in a
                    // row means the next endpoint threw us out too.
                    Next::Move { from, to } if self.short_losses >= 2 => {
                        Next::MoveLater { from, to }
                    }
                    next => next,
                }
            }
        }
    }

    /// The health check crossed its threshold on the current endpoint while the session works,
    /// `failed` checks in a row against a `threshold`; `fresh_refused` once this crossing's
    /// fresh session on the same endpoint failed its own check. What to try: see
    /// [`health_step`].
    pub fn health_step(
        &self,
        failed: u32,
        threshold: u32,
        fresh_refused: bool,
        evidence: Evidence,
    ) -> HealthStep {
        health_step(
            self.endpoints,
            self.current,
            failed,
            threshold,
            fresh_refused,
            evidence,
        )
    }

    /// Whether the profile is off its preferred endpoint (and so probes it for failback).
    pub fn away(&self) -> bool {
        self.current != 0
    }

    /// One probe of the preferred endpoint at `now`. True when it has answered for the whole
    /// `failback_after`: time to try to move back.
    pub fn probed(&mut self, reachable: bool, now: Instant) -> bool {
        if !self.away() || !reachable {
            self.reachable_since = None;
            return false;
        }
        let since = *self.reachable_since.get_or_insert(now);
        now.duration_since(since) >= self.failback_after
    }

    /// A move back to the preferred endpoint was tried and refused (a forward that would not
    /// bind, a failing health check): the stable period starts again.
    pub fn failback_refused(&mut self) {
        self.reachable_since = None;
    }

    /// The session is now on endpoint `to` (a make-before-break move, or a connect after
    /// [`Next::Move`]).
    pub fn moved(&mut self, to: usize) {
        self.current = to.min(self.endpoints - 1);
        self.failures = 0;
        self.reachable_since = None;
    }

    /// The endpoint list changed (the coordinator moved the group): `len` endpoints now, the
    /// current one at `current` in the new list (None: no longer listed).
    pub fn retargeted(&mut self, len: usize, current: Option<usize>) {
        self.endpoints = len.max(1);
        match current {
            Some(i) => self.current = i.min(self.endpoints - 1),
            None => {
                self.current = 0;
                self.failures = 0;
            }
        }
        self.reachable_since = None;
    }

    fn count_failure(&mut self) -> Next {
        self.failures = self.failures.saturating_add(1);
        if self.failures >= self.failover_after && self.endpoints > 1 {
            return self.move_next();
        }
        Next::Retry
    }

    fn move_next(&mut self) -> Next {
        let from = self.current;
        let to = (from + 1) % self.endpoints;
        self.moved(to);
        Next::Move { from, to }
    }
}

/// What the coordinator says about the endpoint a profile's health check fails through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evidence {
    /// Nothing: no coordinator, or no word from it lately (the link is down).
    Unknown,
    /// Of the other agents on the endpoint, how many pass their checks through it and how many
    /// fail there.
    Others {
        /// Passing.
        passing: u32,
        /// Failing.
        failing: u32,
    },
}

impl Evidence {
    /// Other agents pass through the endpoint, and more of them than fail there: the fault is
    /// this appliance's. (One agent — a stolen one claiming to pass — can so hold only an
    /// appliance that fails there alone, never the fleet.)
    pub fn others_pass(self) -> Option<u32> {
        match self {
            Evidence::Others { passing, failing } if passing > failing => Some(passing),
            _ => None,
        }
    }
}

/// What a profile does about a health check that crossed its threshold ([`health_step`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthStep {
    /// A fresh session on the same endpoint: a broken session, not the service, may be at fault.
    Fresh,
    /// New sessions to these endpoints (indexes), in order; the first that binds every forward
    /// and passes its own check takes over.
    Move(Vec<usize>),
    /// Stay where it is: most other agents on this endpoint pass their checks through it, so
    /// the fault is this appliance's (alerted as its `tunnel_health`), and moving it would split
    /// the fleet.
    Stay {
        /// How many other agents pass.
        others_passing: u32,
    },
}

/// The health rule's decision table. On `endpoints` endpoints (the profile's list, preferred
/// first), on index `current`, after `failed` checks in a row against `threshold`:
///
/// | endpoints | crossing of the streak | fresh session | coordinator's evidence | step |
/// |---|---|---|---|---|
/// | 1 | any | — | any | [`HealthStep::Fresh`] |
/// | ≥ 2 | first (`failed` < 2 × `threshold`) | not tried yet | any | [`HealthStep::Fresh`] |
/// | ≥ 2 | first | refused | others pass, more than fail | [`HealthStep::Stay`] |
/// | ≥ 2 | first | refused | unknown / none pass / as many fail | [`HealthStep::Move`] to the others |
/// | ≥ 2 | later | (tried at the first) | others pass, more than fail | [`HealthStep::Stay`] |
/// | ≥ 2 | later | (tried at the first) | unknown / none pass / as many fail | [`HealthStep::Move`] to the others |
///
/// The others are tried from the one after `current` round to the one before it (priority
/// order from the preferred one); the preferred endpoint is left to failback's stable period
/// only through [`Placement::probed`], never skipped here.
pub fn health_step(
    endpoints: usize,
    current: usize,
    failed: u32,
    threshold: u32,
    fresh_refused: bool,
    evidence: Evidence,
) -> HealthStep {
    if endpoints <= 1 {
        return HealthStep::Fresh;
    }
    let first_crossing = failed < threshold.max(1).saturating_mul(2);
    if first_crossing && !fresh_refused {
        return HealthStep::Fresh;
    }
    if let Some(n) = evidence.others_pass() {
        return HealthStep::Stay { others_passing: n };
    }
    HealthStep::Move((1..endpoints).map(|i| (current + i) % endpoints).collect())
}

/// What a profile does when things fail, in its own settings (the defaults where it has none):
/// what `tunnelfleet-agent --check` prints, so an operator reads the rules that will run.
pub fn describe(p: &tunnelfleet_protocol::ProfileSpec) -> String {
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let mut out = format!("profile {}:\n", p.name);
    let place = match &p.group {
        Some(g) => format!("OMA group {g} (the coordinator's endpoints, its active one first)"),
        None => p.endpoints.join(", "),
    };
    out.push_str(&format!("  endpoints: {place}\n"));
    out.push_str(&format!(
        "  a silent endpoint: dropped after {} (keepalive {} x {}); the next endpoint at once\n",
        d(p.keepalive_interval.saturating_mul(p.keepalive_count)),
        d(p.keepalive_interval),
        p.keepalive_count,
    ));
    out.push_str(&format!(
        "  connect failures: {} in a row (each within {}) move to the next endpoint; retries back off {} to {}\n",
        p.failover_after,
        d(p.connect_timeout),
        d(p.reconnect_min),
        d(p.reconnect_max),
    ));
    match p.health.as_ref().map(|h| (h, h.target())) {
        Some((h, Ok(t))) => out.push_str(&format!(
            "  health: {} every {} (timeout {}); {} failures in a row (about {}): one fresh session on the same endpoint, then the next endpoint whose own check passes, unless most other agents on it pass theirs (then it stays, alerted)\n",
            t.describe(),
            d(h.interval),
            d(h.timeout),
            h.threshold,
            d(h.interval.saturating_mul(h.threshold)),
        )),
        _ => out.push_str("  health: no check (a tunnel counts as healthy while its session is up)\n"),
    }
    out.push_str(&format!(
        "  failback: to the preferred endpoint once it has answered for {}, make-before-break (its check must pass)\n",
        d(p.failback_after)
    ));
    out
}

#[cfg(test)]
mod tests;
