//! The life of one profile: its SSH session, reconnects, failover, forwards and health.
//!
//! One task per profile owns the session and decides when to reconnect and where (the rules are
//! [`crate::placement`]'s). Listener, remote-forward and health tasks hang off it and learn about
//! the session through watch channels. Reasons to leave a session (lost, health threshold,
//! command, shutdown) all come to one `select!`, so there is exactly one place that decides what
//! happens next — and logs why.
//!
//! A move to another endpoint while the current session works (failback to the preferred
//! endpoint, or following the group when the coordinator moved it) is make-before-break: the new
//! session must come up, bind every remote forward and pass the health check through itself
//! before it carries anything; until then the old one carries everything, and a refusal leaves
//! the profile where it works with the reason in its status. The old session then stops
//! accepting and carries its open connections to their end (bounded by the drain).

use std::sync::Arc;
use std::time::Duration;

use russh::client::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tunnelfleet_protocol::ErrorKind;

use crate::dial;
use crate::health::{HealthMonitor, HealthTracker, Route, run_check, run_check_via, served_by};
use crate::hostkey::HostTrust;
use crate::local::LocalForward;
use crate::placement::{Coordinated, Ended, HealthStep, Next, Placement, STABLE_SESSION};
use crate::ssh::{
    self, ClientHandler, Live, RemoteEntry, RemoteForwards, SessionParams, SshSession,
};
use crate::status::{ForwardState, HealthStatus, ProfileShared, TunnelState};
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_protocol::forward::ForwardSpec;
use tunnelfleet_protocol::profile::Standby;
use tunnelfleet_runtime::backoff::Backoff;

/// Why the runner left a session.
#[derive(Debug)]
enum SessionEnd {
    Lost(String),
    Restart(String),
    Shutdown,
}

/// How long a replaced profile's old session keeps carrying its open connections (make before
/// break: the new session serves new connections meanwhile). Long, because an NBD transfer
/// through a forward that did not change must not be cut by an unrelated change.
pub const REPLACE_DRAIN: Duration = Duration::from_secs(3600);

/// Handle of a running profile. Dropping it stops the profile (without the graceful drain).
pub struct ProfileHandle {
    cancel: CancellationToken,
    restart: mpsc::Sender<String>,
    retarget: watch::Sender<Vec<String>>,
    task: Option<JoinHandle<()>>,
    /// Fires once the profile stopped accepting (listeners closed, ports free).
    accepting_closed: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Replaces the configured drain when set before cancelling.
    drain_override: Arc<std::sync::Mutex<Option<Duration>>>,
}

/// A signal that something finished (a profile stopped, a replaced profile freed its ports),
/// which any number of tasks can wait for. A profile started after a [`Gate`] binds nothing
/// until the gate opens, so a replacement never races its predecessor for a port.
#[derive(Clone, Debug, Default)]
pub struct Gate(CancellationToken);

impl Gate {
    /// A gate that opens once `done` completes (run in its own task).
    pub fn after(done: impl std::future::Future<Output = ()> + Send + 'static) -> Gate {
        let gate = Gate::default();
        let open = gate.0.clone();
        tokio::spawn(async move {
            done.await;
            open.cancel();
        });
        gate
    }

    /// Waits until the gate is open.
    pub async fn wait(&self) {
        self.0.cancelled().await;
    }
}

impl ProfileHandle {
    /// Stops gracefully: stop accepting, drain (bounded), cancel remote forwards, disconnect.
    pub async fn stop(self) {
        self.begin_stop().await;
    }

    /// Starts the graceful stop now; the returned future resolves when it is complete (it need
    /// not be polled for the stop to proceed).
    pub fn begin_stop(mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.cancel.cancel();
        let task = self.task.take();
        async move {
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }

    /// Make-before-break replacement: stops accepting now and lets the old session carry its
    /// open connections for up to `drain` in the background, so the replacement can start at
    /// once. The returned future resolves when the ports are free.
    pub fn begin_replace(
        mut self,
        drain: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        *self
            .drain_override
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(drain);
        self.cancel.cancel();
        let closed = self.accepting_closed.take();
        // Detached: the old session ends when its last connection does (or at `drain`).
        drop(self.task.take());
        async move {
            if let Some(rx) = closed {
                let _ = rx.await;
            }
        }
    }

    /// Asks for a fresh session now (also cuts a pending backoff short).
    pub fn restart(&self, cause: &str) {
        let _ = self.restart.try_send(cause.to_string());
    }

    /// The coordinator moved the group: `endpoints` in their new order, the group's choice
    /// first. The profile follows make-before-break, keeping its session, counters and health.
    pub fn retarget(&self, endpoints: Vec<String>) {
        self.retarget.send_replace(endpoints);
    }
}

impl Drop for ProfileHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Fresh shared state for a profile's status.
pub fn new_shared(cfg: &ProfileSpec) -> Arc<ProfileShared> {
    let specs: Vec<String> = cfg
        .forward_specs()
        .map(|v| v.iter().map(|f| f.to_string()).collect())
        .unwrap_or_else(|_| cfg.forwards.clone());
    let health = cfg.health.as_ref().map(|h| HealthStatus {
        target: h.target().map(|t| t.describe()).unwrap_or_default(),
        threshold: h.threshold,
        consecutive_failures: 0,
        healthy: true,
        checks: 0,
        failures: 0,
        last: None,
    });
    let shared = ProfileShared::new(
        &cfg.name,
        &cfg.description,
        cfg.endpoints.clone(),
        &specs,
        health,
    );
    shared.lock().jump = cfg.jump.clone();
    Arc::new(shared)
}

/// Starts a profile once every gate in `after` is open (its predecessors released their
/// ports); the identity must already be loaded (see `Supervisor`). `coordinated` tells whether a
/// coordinator decides moves for it now.
pub fn start(
    cfg: Arc<ProfileSpec>,
    login: ssh::Login,
    shared: Arc<ProfileShared>,
    drain: Duration,
    rekey: (u64, Duration),
    after: Vec<Gate>,
    coordinated: Coordinated,
) -> ProfileHandle {
    let cancel = CancellationToken::new();
    let (restart_tx, restart_rx) = mpsc::channel(4);
    let (retarget_tx, retarget_rx) = watch::channel(cfg.endpoints.clone());
    let trust = HostTrust {
        known_hosts: cfg.known_hosts.clone(),
        pinned: HostTrust::pins(&cfg.host_key_fingerprints),
        trust_on_first_use: cfg.trust_on_first_use,
        fleet_host_ca: login.fleet_host_ca,
    };
    // Servers are asked for host certificates only when some authority could vouch for one.
    let certificates = trust.has_cert_authorities();
    let params = SessionParams {
        profile: cfg.name.clone(),
        user: cfg.user.clone(),
        identity: login.identity,
        trust: Arc::new(trust),
        config: Arc::new(ssh::client_config(
            cfg.keepalive_interval,
            cfg.keepalive_count,
            rekey,
            certificates,
        )),
        remote: Arc::new(RemoteForwards::default()),
        tracker: TaskTracker::new(),
        connect_timeout: cfg.connect_timeout,
        jump: cfg.jump_hosts().unwrap_or_default(),
    };
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let drain_override = Arc::new(std::sync::Mutex::new(None));
    let runner = Runner {
        cfg,
        shared,
        params,
        drain,
        drain_override: drain_override.clone(),
        accepting_closed: Some(closed_tx),
        cancel: cancel.clone(),
        restart: restart_rx,
        retarget: retarget_rx,
        coordinated,
        warm: None,
    };
    let task = tokio::spawn(async move {
        for gate in &after {
            tokio::select! {
                _ = gate.wait() => {}
                // Stopped before it could start: nothing was bound.
                _ = runner.cancel.cancelled() => return,
            }
        }
        runner.run().await
    });
    ProfileHandle {
        cancel,
        restart: restart_tx,
        retarget: retarget_tx,
        task: Some(task),
        accepting_closed: Some(closed_rx),
        drain_override,
    }
}

struct Runner {
    cfg: Arc<ProfileSpec>,
    shared: Arc<ProfileShared>,
    params: SessionParams,
    drain: Duration,
    drain_override: Arc<std::sync::Mutex<Option<Duration>>>,
    accepting_closed: Option<tokio::sync::oneshot::Sender<()>>,
    cancel: CancellationToken,
    restart: mpsc::Receiver<String>,
    retarget: watch::Receiver<Vec<String>>,
    coordinated: Coordinated,
    /// `standby = "warm"`: the session held open to the next endpoint.
    warm: Option<WarmStandby>,
}

/// `standby = "warm"`: a second authenticated session held open (and kept alive by the same
/// keepalive) to the endpoint the profile would go to next, with no forwards bound, so a
/// failover to it is only the forward setup. A task keeps it: redialled with backoff when it
/// dies or the target changes; the runner takes it when it moves there.
struct WarmStandby {
    target: watch::Sender<Option<(String, u16)>>,
    slot: WarmSlot,
}

/// The warm session and the endpoint it is to.
type WarmSlot = Arc<std::sync::Mutex<Option<((String, u16), SshSession)>>>;

impl WarmStandby {
    fn start(params: SessionParams, cancel: CancellationToken, mut backoff: Backoff) -> Self {
        let (target, mut rx) = watch::channel(None::<(String, u16)>);
        let slot: WarmSlot = Arc::default();
        let held = slot.clone();
        tokio::spawn(async move {
            let lock = || held.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let want = rx.borrow_and_update().clone();
                if let Some((host, port)) = want.clone() {
                    let ok = lock()
                        .as_ref()
                        .is_some_and(|(t, s)| Some(t) == want.as_ref() && !s.handle.is_closed());
                    if !ok {
                        // Not the one wanted, or dead: dropped, and the wanted one dialled.
                        *lock() = None;
                        let dialled = tokio::select! {
                            _ = cancel.cancelled() => return,
                            r = dial::connect(&params, &host, port) => r,
                        };
                        match dialled {
                            Ok(session) => {
                                tracing::info!(profile = %params.profile, endpoint = %format!("{host}:{port}"), "warm standby session up");
                                backoff.reset();
                                *lock() = Some(((host, port), session));
                            }
                            Err(e) => {
                                tracing::debug!(profile = %params.profile, "warm standby: {e}");
                                tokio::select! {
                                    _ = cancel.cancelled() => return,
                                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                                    r = rx.changed() => if r.is_err() { return },
                                }
                                continue;
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                    // A dead session is noticed within a second (keepalive declared it dead).
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        WarmStandby { target, slot }
    }

    /// Holds a session to `to` from now on (None: none).
    fn aim(&self, to: Option<(String, u16)>) {
        self.target.send_if_modified(|t| {
            let changed = *t != to;
            *t = to;
            changed
        });
    }

    /// The held session, if it is to `host:port` and alive.
    fn take(&self, host: &str, port: u16) -> Option<SshSession> {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some((t, s)) if t.0 == host && t.1 == port && !s.handle.is_closed() => Some(s),
            other => {
                *slot = other;
                None
            }
        }
    }
}

/// The session that carries the profile's traffic now.
struct Current {
    live: Arc<Live>,
    closed: oneshot::Receiver<String>,
    started: Instant,
    /// Cancels this session's pending remote-forward requests.
    remote_cancel: CancellationToken,
    /// Sessions to the jump hosts it runs through (closed with it).
    _jumps: Vec<Handle<ClientHandler>>,
}

/// A session that passed every check of a move and is ready to carry traffic.
struct Candidate {
    session: SshSession,
    /// `(forward index, bound port)` of its remote forwards, all bound.
    bound: Vec<(usize, u32)>,
}

impl Runner {
    async fn run(mut self) {
        // Safe: the config was validated before a profile can be started.
        let specs = self.cfg.forward_specs().unwrap_or_default();
        let mut endpoints = self.cfg.endpoint_addrs().unwrap_or_default();
        if endpoints.is_empty() {
            return;
        }
        let (session_tx, session_rx) = watch::channel(None::<Arc<Live>>);
        let (up_tx, up_rx) = watch::channel(false);
        let (health_tx, mut health_rx) = mpsc::channel::<u32>(1);
        let listeners = CancellationToken::new();
        let mut side_tasks = Vec::new();

        let mut remote_entries = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let counters = self.shared.counters[index].clone();
            match spec {
                ForwardSpec::Remote {
                    port,
                    host,
                    host_port,
                    ..
                } => {
                    remote_entries.push(RemoteEntry {
                        index,
                        requested_port: *port as u32,
                        bound_port: None,
                        host: host.clone(),
                        port: *host_port,
                        counters,
                    });
                    self.shared.set_forward(
                        index,
                        ForwardState::Waiting,
                        Some("waiting for the session".into()),
                    );
                }
                _ => {
                    let lf = LocalForward {
                        index,
                        spec: spec.clone(),
                        shared: self.shared.clone(),
                        counters,
                        session: session_rx.clone(),
                        wait_for_session: self.cfg.connect_timeout,
                        max_connections: crate::local::MAX_CONNECTIONS,
                        cancel: listeners.clone(),
                        tracker: self.params.tracker.clone(),
                    };
                    side_tasks.push(tokio::spawn(lf.run()));
                }
            }
        }
        self.params.remote.set(remote_entries);

        if let Some(h) = &self.cfg.health
            && let Ok(target) = h.target()
        {
            let timeout = h.timeout;
            let monitor = HealthMonitor {
                interval: h.interval,
                tracker: HealthTracker::new(h.threshold),
                shared: self.shared.clone(),
                session_up: up_rx.clone(),
                check: move || {
                    let target = target.clone();
                    async move { run_check(&target, timeout).await }
                },
                on_down: health_tx,
                cancel: listeners.clone(),
            };
            side_tasks.push(tokio::spawn(monitor.run()));
        }

        if self.cfg.standby == Standby::Warm && endpoints.len() > 1 {
            self.warm = Some(WarmStandby::start(
                self.params.clone(),
                self.cancel.clone(),
                Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max),
            ));
        }
        let mut place = Placement::new(
            endpoints.len(),
            self.cfg.failover_after,
            self.cfg.failback_after,
            !self.params.jump.is_empty(),
        );
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let mut sessions = 0u64;
        let probe_every = self.cfg.keepalive_interval.max(Duration::from_secs(1));
        'outer: loop {
            let (host, port) = endpoints[place.current()].clone();
            let endpoint = format!("{host}:{port}");
            self.set_active(&endpoint);
            self.shared.set_state(
                TunnelState::Connecting,
                &format!("connecting to {endpoint}"),
            );
            let warm = self.warm.as_ref().and_then(|w| w.take(&host, port));
            if warm.is_some() {
                tracing::info!(profile = %self.cfg.name, %endpoint, "taking over the warm standby session");
            }
            let connected = if let Some(session) = warm {
                Ok(session)
            } else {
                tokio::select! {
                    _ = self.cancel.cancelled() => break 'outer,
                    Ok(()) = self.retarget.changed() => {
                        let list = self.retarget.borrow_and_update().clone();
                        // Not on any endpoint yet: go straight to the group's choice.
                        let _ = self.retargeted(&mut endpoints, &mut place, list, None);
                        continue 'outer;
                    }
                    r = tracing::Instrument::instrument(
                        dial::connect(&self.params, &host, port),
                        tracing::info_span!("ssh_connect", profile = %self.cfg.name, %endpoint),
                    ) => r,
                }
            };
            let next = match connected {
                Err(e) => {
                    tracing::warn!(profile = %self.cfg.name, endpoint = %endpoint, failures = place.failures() + 1, "{e}");
                    self.shared.record_error(&endpoint, e.kind(), e.to_string());
                    place.connect_failed(e.kind())
                }
                Ok(session) => {
                    sessions += 1;
                    if sessions > 1 {
                        self.shared.lock().reconnects += 1;
                    }
                    place.connected();
                    let cause =
                        format!("established to {endpoint} (host key {})", session.host_key);
                    let mut cur = self.go_live(session, &specs, None);
                    self.shared.set_state(TunnelState::Up, &cause);
                    let _ = session_tx.send(Some(cur.live.clone()));
                    let _ = up_tx.send(true);
                    self.coordinated.report_now();
                    self.aim_warm(&endpoints, &cur.live.endpoint);
                    // Set when the coordinator moved the group away from where we are and the
                    // move to its choice has not completed yet.
                    let mut follow = false;
                    let mut probe = tokio::time::interval(probe_every);
                    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    probe.reset();
                    let end = 'session: loop {
                        tokio::select! {
                                r = &mut cur.closed => break SessionEnd::Lost(r.unwrap_or_else(|_| "session ended".into())),
                                Some(c) = self.restart.recv() => break SessionEnd::Restart(c),
                                Some(n) = health_rx.recv() => {
                                    // The session works, the service behind it does not: the
                                    // health rule (placement::health_step) picks where a new
                                    // session is tried; one replaces this session only once
                                    // its own check passes, and open connections carry on.
                                    self.coordinated.report_now();
                                    let threshold = self.cfg.health.as_ref().map_or(1, |h| h.threshold);
                                    let detail = self.shared.lock().health.as_ref()
                                        .and_then(|h| h.last.as_ref())
                                        .map(|r| r.detail.clone())
                                        .unwrap_or_default();
                                    let why = tunnelfleet_protocol::FailoverRecord::health_reason(n, &detail);
                                    let mut fresh_refused = false;
                                    let mut refusals = Vec::new();
                                    let taken = loop {
                                        let evidence = self.coordinated.evidence(&cur.live.endpoint, Instant::now());
                                        let step = place.health_step(n, threshold, fresh_refused, evidence);
                                        let targets = match &step {
                                            HealthStep::Fresh => vec![place.current()],
                                            HealthStep::Move(t) => t.clone(),
                                            HealthStep::Stay { others_passing } => {
                                                refusals.push(format!("{others_passing} other agents pass their checks through it: this appliance's fault, not the OMA's"));
                                                break None;
                                            }
                                        };
                                        let mut taken = None;
                                        for target in targets {
                                            let (h, p) = endpoints[target].clone();
                                            // The current session dying meanwhile ends the attempt: that is a loss.
                                            let attempt = tokio::select! {
                                                r = self.try_move(&h, p, &specs, &cur.live) => r,
                                                r = &mut cur.closed => break 'session SessionEnd::Lost(r.unwrap_or_else(|_| "session ended".into())),
                                            };
                                            match attempt {
                                                Ok(candidate) => {
                                                    taken = Some((target, candidate));
                                                    break;
                                                }
                                                Err(refusal) => refusals.push(refusal),
                                            }
                                        }
                                        if taken.is_some() || step != HealthStep::Fresh || endpoints.len() == 1 {
                                            break taken;
                                        }
                                        fresh_refused = true;
                                    };
                                    let on = cur.live.endpoint.clone();
                                    match taken {
                                        Some((target, candidate)) => {
                                            let to = addr(&endpoints[target]);
                                            let from = self.take_over(&mut cur, candidate, &specs, &session_tx, &endpoints);
                                            place.moved(target);
                                            if from == to {
                                                self.shared.lock().reconnects += 1;
                                            } else {
                                                self.shared.record_move(&from, &to, &why, true);
                                            }
                                            self.coordinated.report_now();
                                            tracing::warn!(profile = %self.cfg.name, %from, %to, "new session make-before-break: {why}");
                                            self.shared.lock().last_error = Some(why);
                                        }
                                        None => {
                                            let refusal = refusals.join("; ");
                                            tracing::warn!(profile = %self.cfg.name, %on, "{why}; staying on {on}: {refusal}");
                                            self.shared.lock().last_error =
                                                Some(format!("{why}; staying on {on}: {refusal}"));
                                        }
                                    }
                                }
                                _ = self.cancel.cancelled() => break SessionEnd::Shutdown,
                                Ok(()) = self.retarget.changed() => {
                        let list = self.retarget.borrow_and_update().clone();
                                    let on = cur.live.endpoint.clone();
                                    // Off the group's choice (or on an endpoint no longer listed, a drained one):
                                    // follow it.
                                    follow = !self.retargeted(&mut endpoints, &mut place, list, Some(&on));
                                    self.aim_warm(&endpoints, &on);
                                    if follow {
                                        probe.reset_immediately();
                                    }
                                }
                                _ = probe.tick(), if place.away() || follow => {
                                    let (h, p) = endpoints[0].clone();
                                    let to = format!("{h}:{p}");
                                    let due = follow || {
                                        let reachable = tokio::select! {
                                            r = self.probe(&h, p) => r,
                                            r = &mut cur.closed => break SessionEnd::Lost(r.unwrap_or_else(|_| "session ended".into())),
                                        };
                                        place.probed(reachable, Instant::now())
                                    };
                                    if !due {
                                        continue;
                                    }
                                    let why = if follow {
                                        format!("following the group to {to}")
                                    } else {
                                        format!(
                                            "{to} reachable for {}: back to the preferred endpoint",
                                            humantime::format_duration(self.cfg.failback_after)
                                        )
                                    };
                                    // The current session dying meanwhile ends the attempt: that is a loss.
                                    let attempt = tokio::select! {
                                        r = self.try_move(&h, p, &specs, &cur.live) => r,
                                        r = &mut cur.closed => break SessionEnd::Lost(r.unwrap_or_else(|_| "session ended".into())),
                                    };
                                    match attempt {
                                        Ok(candidate) => {
                                            let from = self.take_over(&mut cur, candidate, &specs, &session_tx, &endpoints);
                                            place.moved(0);
                                            // A move the coordinator ordered is the group's, not
                                            // this agent's own.
                                            self.shared.record_move(&from, &to, &why, !follow);
                                            self.coordinated.report_now();
                                            self.shared.set_state(TunnelState::Up, &why);
                                            tracing::info!(profile = %self.cfg.name, %from, %to, "moved make-before-break: {why}");
                                            follow = false;
                                        }
                                        Err(refusal) => {
                                            place.failback_refused();
                                            let on = cur.live.endpoint.clone();
                                            tracing::warn!(profile = %self.cfg.name, %on, %to, "staying on {on}: {refusal}");
                                            self.shared.lock().last_error =
                                                Some(format!("staying on {on}: {refusal}"));
                                        }
                                    }
                                }
                            }
                    };
                    let lasted = cur.started.elapsed();
                    cur.remote_cancel.cancel();
                    let _ = up_tx.send(false);
                    let _ = session_tx.send(None);
                    let endpoint = cur.live.endpoint.clone();
                    if let SessionEnd::Shutdown = end {
                        self.shared
                            .set_state(TunnelState::Stopping, "stopping: draining connections");
                        listeners.cancel();
                        for t in side_tasks.drain(..) {
                            let _ = t.await;
                        }
                        self.signal_accepting_closed();
                        self.close_gracefully(&cur.live.handle, &specs).await;
                        break 'outer;
                    }
                    self.mark_remote_waiting(&specs);
                    ssh::disconnect(&cur.live.handle, "tunnelfleet: session restart").await;
                    let why = match &end {
                        SessionEnd::Lost(r) => format!("session to {endpoint} lost: {r}"),
                        SessionEnd::Restart(c) => format!("session restarted: {c}"),
                        SessionEnd::Shutdown => String::new(),
                    };
                    tracing::warn!(profile = %self.cfg.name, endpoint = %endpoint, "{why}");
                    if let SessionEnd::Lost(_) = end {
                        // Through jump hosts a lost session may be the path's doing as much as
                        // the endpoint's: not evidence against the endpoint.
                        let kind = if self.params.jump.is_empty() {
                            ErrorKind::SessionLost
                        } else {
                            ErrorKind::Jump
                        };
                        self.shared.record_error(&endpoint, kind, why);
                    } else {
                        self.shared.lock().last_error = Some(why);
                    }
                    if lasted >= STABLE_SESSION {
                        backoff.reset();
                    }
                    let ended = match end {
                        SessionEnd::Lost(_) => Ended::Lost,
                        _ => Ended::Restart,
                    };
                    place.session_ended(ended, lasted)
                }
            };
            self.shared.lock().failures_in_a_row = place.failures();
            let later = match next {
                Next::Move { from, to } | Next::MoveLater { from, to } => {
                    let (from, to) = (addr(&endpoints[from]), addr(&endpoints[to]));
                    let reason = self.shared.lock().last_error.clone().unwrap_or_default();
                    tracing::warn!(profile = %self.cfg.name, %from, %to, "failing over to the next endpoint: {reason}");
                    self.shared.record_move(&from, &to, &reason, true);
                    self.coordinated.report_now();
                    if let Next::Move { .. } = next {
                        backoff.reset();
                        continue;
                    }
                    // Every endpoint lets us in and throws us out: no tight loop of logins.
                    Some(to)
                }
                Next::Now => continue,
                Next::Retry => None,
            };
            let delay = backoff.next_delay();
            let wait = humantime::format_duration(round_ms(delay));
            let failures = place.failures();
            self.shared.set_state(
                TunnelState::Backoff,
                &match later {
                    Some(to) => format!(
                        "moving to {to} in {wait}: sessions keep ending before they are stable"
                    ),
                    None if failures > 1 => {
                        format!("retrying {endpoint} in {wait} ({failures} failures in a row)")
                    }
                    None => format!("retrying {endpoint} in {wait}"),
                },
            );
            tokio::select! {
                _ = self.cancel.cancelled() => break 'outer,
                _ = tokio::time::sleep(delay) => {}
                Some(c) = self.restart.recv() => {
                    tracing::info!(profile = %self.cfg.name, "backoff cut short: {c}");
                }
                Ok(()) = self.retarget.changed() => {
                    let list = self.retarget.borrow_and_update().clone();
                    let _ = self.retargeted(&mut endpoints, &mut place, list, None);
                }
            }
        }
        listeners.cancel();
        for t in side_tasks {
            let _ = t.await;
        }
        self.signal_accepting_closed();
        self.params.tracker.close();
        for i in 0..specs.len() {
            self.shared.set_forward(i, ForwardState::Stopped, None);
        }
        self.shared.set_state(TunnelState::Stopped, "stopped");
    }

    /// The second half of a make-before-break move: `candidate` carries new connections from
    /// now on, the session it replaces is retired (it finishes its own), the warm standby is
    /// re-aimed. Returns the endpoint left.
    fn take_over(
        &self,
        cur: &mut Current,
        candidate: Candidate,
        specs: &[ForwardSpec],
        session_tx: &watch::Sender<Option<Arc<Live>>>,
        endpoints: &[(String, u16)],
    ) -> String {
        let from = cur.live.endpoint.clone();
        let old = std::mem::replace(
            cur,
            self.go_live(candidate.session, specs, Some(&candidate.bound)),
        );
        let _ = session_tx.send(Some(cur.live.clone()));
        self.retire(old, specs);
        self.aim_warm(endpoints, &cur.live.endpoint);
        from
    }

    /// Points the warm standby (if any) at the endpoint after `on` in priority order.
    fn aim_warm(&self, endpoints: &[(String, u16)], on: &str) {
        let Some(w) = &self.warm else { return };
        let at = endpoints.iter().position(|e| addr(e) == on).unwrap_or(0);
        let next = endpoints.get((at + 1) % endpoints.len()).cloned();
        w.aim(next.filter(|n| addr(n) != on));
    }

    fn set_active(&self, endpoint: &str) {
        let mut s = self.shared.lock();
        // Health failures were the previous endpoint's: the health monitor starts a fresh count
        // on this one, and so does what status and heartbeats show.
        if s.active_endpoint != endpoint
            && let Some(h) = s.health.as_mut()
        {
            h.consecutive_failures = 0;
        }
        s.active_endpoint = endpoint.to_string();
    }

    /// Makes `session` the one that carries traffic: its remote forwards are either already
    /// bound (`bound`, after a move) or requested now and held.
    fn go_live(
        &self,
        session: SshSession,
        specs: &[ForwardSpec],
        bound: Option<&[(usize, u32)]>,
    ) -> Current {
        let live = Arc::new(Live {
            handle: session.handle,
            conns: session.conns,
            endpoint: session.endpoint,
            opening: Arc::new(tokio::sync::Semaphore::new(crate::local::MAX_OPENING)),
        });
        let remote_cancel = CancellationToken::new();
        match bound {
            Some(bound) => {
                self.params.remote.clear_bound();
                for &(index, port) in bound {
                    self.params.remote.mark_bound(index, port);
                    let requested =
                        matches!(specs.get(index), Some(ForwardSpec::Remote { port: 0, .. }));
                    let detail = requested.then(|| format!("server assigned port {port}"));
                    self.shared.set_forward(index, ForwardState::Active, detail);
                }
            }
            None => {
                for (index, spec) in specs.iter().enumerate() {
                    if let ForwardSpec::Remote { bind, port, .. } = spec {
                        tokio::spawn(hold_remote_forward(
                            live.clone(),
                            RemoteRequest {
                                index,
                                bind: bind.clone(),
                                port: *port,
                                reclaim: self.cfg.reclaim_remote_ports,
                            },
                            self.shared.clone(),
                            self.params.remote.clone(),
                            remote_cancel.clone(),
                            Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max),
                        ));
                    }
                }
            }
        }
        self.set_active(&live.endpoint);
        Current {
            live,
            closed: session.closed,
            started: Instant::now(),
            remote_cancel,
            _jumps: session.jumps,
        }
    }

    /// A session left behind by a move: the server stops accepting on its remote forwards, its
    /// open connections get the drain to finish, then it is closed.
    fn retire(&self, old: Current, specs: &[ForwardSpec]) {
        old.remote_cancel.cancel();
        let remotes: Vec<(String, u32)> = specs
            .iter()
            .filter_map(|s| match s {
                ForwardSpec::Remote { bind, port, .. } => Some((bind.clone(), u32::from(*port))),
                _ => None,
            })
            .collect();
        let drain = self.drain;
        let profile = self.cfg.name.clone();
        self.params.tracker.spawn(async move {
            for (bind, port) in remotes {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    old.live.handle.cancel_tcpip_forward(bind, port),
                )
                .await;
            }
            old.live.conns.close();
            if !old.live.conns.is_empty() {
                tracing::info!(profile = %profile, endpoint = %old.live.endpoint, open = old.live.conns.len(), "the previous session carries its open connections to their end");
            }
            let _ = tokio::time::timeout(drain, old.live.conns.wait()).await;
            ssh::disconnect(&old.live.handle, "tunnelfleet: moved to another endpoint").await;
            drop(old);
        });
    }

    /// Everything a move needs, on a new session to `host:port`, before it carries anything:
    /// the session itself, every remote forward bound, and the health check passing through it.
    /// An `R` port the target refuses while `old` holds the same port (two OMAs on one host,
    /// as in the demo) is released on `old` and asked for again; if the target still refuses,
    /// `old` gets it back. The refusal says what failed; nothing is left half-moved.
    async fn try_move(
        &self,
        host: &str,
        port: u16,
        specs: &[ForwardSpec],
        old: &Live,
    ) -> Result<Candidate, String> {
        let to = format!("{host}:{port}");
        let session = match self.warm.as_ref().and_then(|w| w.take(host, port)) {
            Some(s) => s,
            None => tokio::select! {
                r = dial::connect(&self.params, host, port) => r.map_err(|e| e.to_string())?,
                _ = self.cancel.cancelled() => return Err("stopping".into()),
            },
        };
        let reclaim = self.cfg.reclaim_remote_ports;
        let mut bound = Vec::new();
        // Remote ports `old` released for the candidate: given back if the move fails.
        let mut released: Vec<(String, u16)> = Vec::new();
        let mut refusal = None;
        for (index, spec) in specs.iter().enumerate() {
            let ForwardSpec::Remote { bind, port, .. } = spec else {
                continue;
            };
            let first = bind_remote(&session.handle, bind, *port, false).await;
            let result = match first {
                Ok(p) => Ok(p),
                Err(_) if *port != 0 => {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        old.handle
                            .cancel_tcpip_forward(bind.clone(), u32::from(*port)),
                    )
                    .await;
                    released.push((bind.clone(), *port));
                    bind_remote(&session.handle, bind, *port, reclaim).await
                }
                Err(why) => Err(why),
            };
            match result {
                Ok(p) => bound.push((index, p)),
                Err(why) => {
                    refusal = Some(format!("{spec} on {to}: {why}"));
                    break;
                }
            }
        }
        if refusal.is_none()
            && let Some(h) = &self.cfg.health
            && let Ok(target) = h.target()
            && let Some((dest, dest_port)) = served_by(&target, specs)
        {
            let route = Route::Through {
                handle: &session.handle,
                host: dest,
                port: dest_port,
            };
            let r = run_check_via(&target, h.timeout, route).await;
            if !r.ok {
                refusal = Some(format!(
                    "health check {} through the new session to {to} failed: {}",
                    target.describe(),
                    r.detail
                ));
            }
        }
        if let Some(why) = refusal {
            ssh::disconnect(&session.handle, "tunnelfleet: move not completed").await;
            for (bind, port) in released {
                if let Err(e) = bind_remote(&old.handle, &bind, port, false).await {
                    tracing::warn!(profile = %self.cfg.name, port, "could not take the remote port back on {}: {e}", old.endpoint);
                }
            }
            return Err(why);
        }
        Ok(Candidate { session, bound })
    }

    /// Whether the preferred endpoint answers: its SSH identification line (directly), or a
    /// whole session (through jump hosts, where only that reaches it).
    async fn probe(&self, host: &str, port: u16) -> bool {
        let limit = self.cfg.connect_timeout.min(Duration::from_secs(5));
        if self.params.jump.is_empty() {
            let banner = async {
                let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
                let line = tunnelfleet_runtime::banner::read_banner(&mut s)
                    .await
                    .ok()?;
                line.starts_with("SSH-").then_some(())
            };
            return matches!(tokio::time::timeout(limit, banner).await, Ok(Some(())));
        }
        match dial::connect(&self.params, host, port).await {
            Ok(s) => {
                ssh::disconnect(&s.handle, "tunnelfleet: probe").await;
                true
            }
            Err(_) => false,
        }
    }

    /// The coordinator sent a new endpoint list (the group moved): `on` is the endpoint the
    /// session is on, if one is up. True when that is the new list's first (nothing to do).
    fn retargeted(
        &mut self,
        endpoints: &mut Vec<(String, u16)>,
        place: &mut Placement,
        list: Vec<String>,
        on: Option<&str>,
    ) -> bool {
        let spec = ProfileSpec {
            endpoints: list.clone(),
            ..(*self.cfg).clone()
        };
        let parsed = match spec.endpoint_addrs() {
            Ok(p) if !p.is_empty() => p,
            _ => {
                tracing::warn!(profile = %self.cfg.name, endpoints = ?list, "ignoring an endpoint list that does not parse");
                return true;
            }
        };
        let position = on.and_then(|on| parsed.iter().position(|e| addr(e) == on));
        *endpoints = parsed;
        place.retargeted(endpoints.len(), position);
        self.shared.lock().endpoints = list;
        tracing::info!(profile = %self.cfg.name, preferred = %addr(&endpoints[0]), "endpoints changed by the coordinator");
        position == Some(0)
    }

    fn signal_accepting_closed(&mut self) {
        if let Some(tx) = self.accepting_closed.take() {
            let _ = tx.send(());
        }
    }

    fn mark_remote_waiting(&self, specs: &[ForwardSpec]) {
        self.params.remote.clear_bound();
        for (i, s) in specs.iter().enumerate() {
            if matches!(s, ForwardSpec::Remote { .. }) {
                self.shared.set_forward(
                    i,
                    ForwardState::Waiting,
                    Some("waiting for the session".into()),
                );
            }
        }
    }

    /// Stop accepting (listeners already cancelled), cancel remote forwards so the server stops
    /// accepting for us, give open connections `drain` to finish, then disconnect.
    async fn close_gracefully(&self, handle: &Handle<ClientHandler>, specs: &[ForwardSpec]) {
        for s in specs {
            if let ForwardSpec::Remote { bind, port, .. } = s {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    handle.cancel_tcpip_forward(bind.clone(), *port as u32),
                )
                .await;
            }
        }
        self.params.tracker.close();
        let open = self.params.tracker.len();
        let drain = self
            .drain_override
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(self.drain);
        if open > 0 {
            tracing::info!(profile = %self.cfg.name, open, ?drain, "draining open connections");
            if tokio::time::timeout(drain, self.params.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(profile = %self.cfg.name, open = self.params.tracker.len(), "drain timeout: closing remaining connections");
            }
        }
        ssh::disconnect(handle, "tunnelfleet: shutting down").await;
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// `host:port` of an endpoint.
fn addr((host, port): &(String, u16)) -> String {
    format!("{host}:{port}")
}

/// One remote forward to request.
struct RemoteRequest {
    index: usize,
    bind: String,
    port: u16,
    reclaim: bool,
}

/// How long one remote-forward request may take before it counts as refused.
const REMOTE_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What to tell an operator when the server refuses an `R` port.
fn held_port(bind: &str, port: u16) -> String {
    format!(
        "the server refused to listen on {bind}:{port} (port {port} in use on the server, most likely by this account's stale session from before a reconnect: install ops/deploy/oma/ on the OMA so sshd drops dead sessions within 15 s, or set reclaim_remote_ports = true)"
    )
}

/// One request for a remote forward on `handle`; with `reclaim`, a refusal ends this account's
/// stale session holding the port and asks again. The port the server bound, or why not.
async fn bind_remote(
    handle: &Handle<ClientHandler>,
    bind: &str,
    port: u16,
    reclaim: bool,
) -> Result<u32, String> {
    let request = || async {
        match tokio::time::timeout(
            REMOTE_REQUEST_TIMEOUT,
            handle.tcpip_forward(bind.to_string(), u32::from(port)),
        )
        .await
        {
            Ok(Ok(assigned)) => Ok(if port == 0 { assigned } else { u32::from(port) }),
            Ok(Err(russh::Error::RequestDenied)) => Err(None),
            Ok(Err(e)) => Err(Some(format!("remote forward request failed: {e}"))),
            Err(_) => Err(Some(format!(
                "no answer to the remote forward request within {REMOTE_REQUEST_TIMEOUT:?}"
            ))),
        }
    };
    match request().await {
        Ok(p) => return Ok(p),
        Err(Some(why)) => return Err(why),
        Err(None) if !reclaim => return Err(held_port(bind, port)),
        Err(None) => {}
    }
    let pids = crate::reclaim::reclaim(handle, port)
        .await
        .map_err(|e| format!("{}; {e}", held_port(bind, port)))?;
    tracing::warn!(
        port,
        ?pids,
        "reclaim_remote_ports: ended this account's stale session holding the port"
    );
    // sshd closes the listener as the process exits: a few quick tries.
    for _ in 0..10 {
        match request().await {
            Ok(p) => return Ok(p),
            Err(Some(why)) => return Err(why),
            Err(None) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Err(format!(
        "{}; ended stale session(s) {pids:?}, yet the port is still held",
        held_port(bind, port)
    ))
}

/// Requests one remote forward, retrying while the server refuses.
///
/// The classic autossh failure: after a reconnect the server still holds the port for the old,
/// half-dead session and answers "remote port forwarding failed". `ssh -o
/// ExitOnForwardFailure=yes` then exits and the loop spins; without it ssh runs on without the
/// forward. Here the request is retried with backoff until the old session is reaped (the OMA
/// drop-in makes sshd do that within 15 s) or, with `reclaim_remote_ports`, this account's
/// stale session is ended through the new one.
async fn hold_remote_forward(
    live: Arc<Live>,
    req: RemoteRequest,
    shared: Arc<ProfileShared>,
    remote: Arc<RemoteForwards>,
    cancel: CancellationToken,
    mut backoff: Backoff,
) {
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = bind_remote(&live.handle, &req.bind, req.port, req.reclaim) => r,
        };
        match result {
            Ok(bound) => {
                remote.mark_bound(req.index, bound);
                let detail = (req.port == 0).then(|| format!("server assigned port {bound}"));
                shared.set_forward(req.index, ForwardState::Active, detail);
                return;
            }
            Err(why) => {
                let delay = backoff.next_delay();
                shared.set_forward(
                    req.index,
                    ForwardState::Retrying,
                    Some(format!("{why}; retrying")),
                );
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
