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
//! - **Health.** A profile with no coordinator to decide for it moves at once when its health
//!   check crosses its threshold; a coordinated one gets a fresh session on the same endpoint
//!   and leaves the move to the coordinator, which sees every agent on that endpoint (and still
//!   moves on its own after `failover_after` refused ones, should the coordinator not act).
//!   Either way the new session replaces the old only once its own check passes.
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
}

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

    /// The health check crossed its threshold on the current endpoint while the session
    /// works: the endpoint to try a new session on (make-before-break: the current one carries
    /// traffic until the new one passes its own check). Without a coordinator, the next
    /// endpoint at once; with one (which sees every agent there and moves the group), a fresh
    /// session on the same endpoint, and the next only after `failover_after` of these.
    pub fn health_down(&self, coordinated: bool) -> usize {
        let next = (self.current + 1) % self.endpoints;
        if self.endpoints > 1 && (!coordinated || self.failures + 1 >= self.failover_after) {
            return next;
        }
        self.current
    }

    /// A health-driven new session was refused (its own check failed too): one more failure of
    /// the current endpoint.
    pub fn health_refused(&mut self) {
        self.failures = self.failures.saturating_add(1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Placement {
        Placement::new(2, 3, Duration::from_secs(30), false)
    }

    #[test]
    fn a_lost_session_moves_to_the_next_endpoint_at_once() {
        let mut p = two();
        let next = p.session_ended(Ended::Lost, Duration::from_secs(600));
        assert_eq!(next, Next::Move { from: 0, to: 1 });
        assert_eq!(p.current(), 1);
        // And from the standby to the next one (round robin).
        let next = p.session_ended(Ended::Lost, Duration::from_secs(1));
        assert_eq!(next, Next::Move { from: 1, to: 0 });
    }

    #[test]
    fn a_single_endpoint_is_retried_and_a_short_session_counts_as_a_failure() {
        let mut p = Placement::new(1, 3, Duration::from_secs(30), false);
        assert_eq!(
            p.session_ended(Ended::Lost, Duration::from_secs(1)),
            Next::Retry
        );
        assert_eq!(p.failures(), 1);
        assert_eq!(
            p.session_ended(Ended::Lost, Duration::from_secs(2)),
            Next::Retry
        );
        assert_eq!(p.failures(), 2);
        // A stable session wipes the slate, then the loss itself counts once.
        p.session_ended(Ended::Lost, STABLE_SESSION);
        assert_eq!(p.failures(), 1);
    }

    #[test]
    fn endpoints_that_all_throw_us_out_are_tried_after_the_backoff() {
        let mut p = two();
        let short = Duration::from_secs(2);
        // The first short session moves at once; the next (on the standby) waits.
        assert_eq!(
            p.session_ended(Ended::Lost, short),
            Next::Move { from: 0, to: 1 }
        );
        assert_eq!(
            p.session_ended(Ended::Lost, short),
            Next::MoveLater { from: 1, to: 0 }
        );
        assert_eq!(
            p.session_ended(Ended::Lost, short),
            Next::MoveLater { from: 0, to: 1 }
        );
        // A stable session ends the streak: its loss moves at once again.
        assert_eq!(
            p.session_ended(Ended::Lost, STABLE_SESSION),
            Next::Move { from: 1, to: 0 }
        );
        // A long session's loss followed by a short one: still one short loss, at once.
        assert_eq!(
            p.session_ended(Ended::Lost, short),
            Next::Move { from: 0, to: 1 }
        );
    }

    #[test]
    fn connect_failures_move_after_failover_after_in_a_row() {
        let mut p = two();
        assert_eq!(p.connect_failed(ErrorKind::Timeout), Next::Retry);
        assert_eq!(p.connect_failed(ErrorKind::Connect), Next::Retry);
        assert_eq!(
            p.connect_failed(ErrorKind::Timeout),
            Next::Move { from: 0, to: 1 }
        );
        assert_eq!(p.failures(), 0);
    }

    #[test]
    fn a_bastion_failure_never_counts_against_the_endpoint() {
        let mut p = Placement::new(2, 3, Duration::from_secs(30), true);
        for _ in 0..50 {
            assert_eq!(p.connect_failed(ErrorKind::Jump), Next::Retry);
            assert_eq!(
                p.session_ended(Ended::Lost, Duration::from_secs(1)),
                Next::Retry
            );
        }
        assert_eq!((p.current(), p.failures()), (0, 0));
        // The endpoint's own refusal behind the bastion still counts.
        p.connect_failed(ErrorKind::Connect);
        p.connect_failed(ErrorKind::Auth);
        assert_eq!(
            p.connect_failed(ErrorKind::Connect),
            Next::Move { from: 0, to: 1 }
        );
    }

    #[test]
    fn health_moves_a_standalone_profile_at_once_and_a_coordinated_one_only_as_a_last_resort() {
        let p = two();
        assert_eq!(p.health_down(false), 1);
        let mut c = two();
        // A fresh session on the same endpoint, refused because its check fails too...
        assert_eq!(c.health_down(true), 0);
        c.health_refused();
        assert_eq!(c.health_down(true), 0);
        c.health_refused();
        // ...and the third time the next endpoint, should the coordinator not have moved it.
        assert_eq!(c.health_down(true), 1);
        // One endpoint: always a fresh session there.
        let mut one = Placement::new(1, 3, Duration::from_secs(30), false);
        for _ in 0..5 {
            assert_eq!(one.health_down(false), 0);
            one.health_refused();
        }
    }

    #[test]
    fn an_operator_restart_is_not_a_failure() {
        let mut p = two();
        p.connect_failed(ErrorKind::Timeout);
        p.connect_failed(ErrorKind::Timeout);
        assert_eq!(
            p.session_ended(Ended::Restart, Duration::from_secs(1)),
            Next::Now
        );
        assert_eq!((p.current(), p.failures()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn failback_needs_the_preferred_endpoint_reachable_for_the_whole_stable_period() {
        let mut p = two();
        p.session_ended(Ended::Lost, Duration::from_secs(100));
        assert!(p.away());
        let probe = Duration::from_secs(5);
        // Reachable at 0, 5, 10, 15, 20, 25 s: not yet.
        for _ in 0..6 {
            assert!(!p.probed(true, Instant::now()));
            tokio::time::advance(probe).await;
        }
        // One miss restarts the period.
        assert!(!p.probed(false, Instant::now()));
        tokio::time::advance(probe).await;
        for _ in 0..6 {
            assert!(!p.probed(true, Instant::now()));
            tokio::time::advance(probe).await;
        }
        // Thirty seconds of answers in a row.
        assert!(p.probed(true, Instant::now()));
        // A refused move back starts the period again.
        p.failback_refused();
        assert!(!p.probed(true, Instant::now()));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(p.probed(true, Instant::now()));
        p.moved(0);
        assert!(!p.away());
        // On the preferred endpoint nothing is probed.
        assert!(!p.probed(true, Instant::now()));
    }

    #[test]
    fn a_retarget_keeps_the_session_where_it_is_listed() {
        let mut p = two();
        p.connect_failed(ErrorKind::Timeout);
        // The coordinator put our endpoint second: we are away now, with our count.
        p.retargeted(2, Some(1));
        assert!(p.away());
        assert_eq!(p.failures(), 1);
        // Our endpoint left the list: start on the first, afresh.
        p.retargeted(3, None);
        assert_eq!((p.current(), p.failures()), (0, 0));
    }
}
