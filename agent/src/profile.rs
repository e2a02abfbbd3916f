//! The life of one profile: its SSH session, reconnects, failover, forwards and health.
//!
//! One task per profile owns the session and decides when to reconnect and where. Listener,
//! remote-forward and health tasks hang off it and learn about the session through watch
//! channels. Reasons to leave a session (lost, health threshold, command, shutdown) all come to
//! one `select!`, so there is exactly one place that decides what happens next — and logs why.

use std::sync::Arc;
use std::time::Duration;

use russh::client::Handle;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tunnelfleet_protocol::ErrorKind;

use crate::backoff::Backoff;
use crate::dial;
use crate::health::{HealthMonitor, HealthTracker, run_check};
use crate::hostkey::HostTrust;
use crate::local::LocalForward;
use crate::ssh::{self, ClientHandler, RemoteEntry, RemoteForwards, SessionParams};
use crate::status::{ForwardState, HealthStatus, ProfileShared, TunnelState};
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_protocol::forward::ForwardSpec;

/// A session that lasted this long counts as a success: backoff and failover counts reset.
/// Shorter ones (accepted, then dropped) count as failures of the endpoint, so a server that
/// lets us in and throws us out cannot hold us in a tight reconnect loop.
pub const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Why the runner left a session.
#[derive(Debug)]
enum SessionEnd {
    Lost(String),
    Restart(String),
    Health(u32),
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
/// ports); the identity must already be loaded (see `Supervisor`).
pub fn start(
    cfg: Arc<ProfileSpec>,
    key: Arc<russh::keys::PrivateKey>,
    shared: Arc<ProfileShared>,
    drain: Duration,
    after: Vec<Gate>,
) -> ProfileHandle {
    let cancel = CancellationToken::new();
    let (restart_tx, restart_rx) = mpsc::channel(4);
    let trust = HostTrust {
        known_hosts: cfg.known_hosts.clone(),
        pinned: cfg.host_key_fingerprints.clone(),
        trust_on_first_use: cfg.trust_on_first_use,
    };
    let params = SessionParams {
        profile: cfg.name.clone(),
        user: cfg.user.clone(),
        key,
        trust: Arc::new(trust),
        config: Arc::new(ssh::client_config(
            cfg.keepalive_interval,
            cfg.keepalive_count,
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
}

impl Runner {
    async fn run(mut self) {
        // Safe: the config was validated before a profile can be started.
        let specs = self.cfg.forward_specs().unwrap_or_default();
        let endpoints = self.cfg.endpoint_addrs().unwrap_or_default();
        if endpoints.is_empty() {
            return;
        }
        let (session_tx, session_rx) = watch::channel(None::<Arc<Handle<ClientHandler>>>);
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

        let mut idx = 0usize;
        let mut failures = 0u32;
        let mut backoff = Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max);
        let mut sessions = 0u64;
        'outer: loop {
            let (host, port) = &endpoints[idx];
            let endpoint = format!("{host}:{port}");
            {
                let mut s = self.shared.lock();
                // Health failures were the previous endpoint's: the health monitor starts a
                // fresh count on this one, and so does what status and heartbeats show.
                if s.active_endpoint != endpoint
                    && let Some(h) = s.health.as_mut()
                {
                    h.consecutive_failures = 0;
                }
                s.active_endpoint = endpoint.clone();
            }
            self.shared.set_state(
                TunnelState::Connecting,
                &format!("connecting to {endpoint}"),
            );
            let connected = tokio::select! {
                _ = self.cancel.cancelled() => break 'outer,
                r = tracing::Instrument::instrument(
                    dial::connect(&self.params, host, *port),
                    tracing::info_span!("ssh_connect", profile = %self.cfg.name, %endpoint),
                ) => r,
            };
            let mut immediate = false;
            match connected {
                Err(e) => {
                    failures += 1;
                    tracing::warn!(profile = %self.cfg.name, endpoint = %endpoint, attempt = failures, "{e}");
                    self.shared.record_error(&endpoint, e.kind(), e.to_string());
                }
                Ok(session) => {
                    sessions += 1;
                    if sessions > 1 {
                        self.shared.lock().reconnects += 1;
                    }
                    let started = Instant::now();
                    let handle = Arc::new(session.handle);
                    let cause =
                        format!("established to {endpoint} (host key {})", session.host_key);
                    self.shared.set_state(TunnelState::Up, &cause);
                    let _ = session_tx.send(Some(handle.clone()));
                    let _ = up_tx.send(true);
                    let remote_cancel = CancellationToken::new();
                    for (index, spec) in specs.iter().enumerate() {
                        if let ForwardSpec::Remote { bind, port, .. } = spec {
                            tokio::spawn(hold_remote_forward(
                                handle.clone(),
                                index,
                                bind.clone(),
                                *port,
                                self.shared.clone(),
                                self.params.remote.clone(),
                                remote_cancel.clone(),
                                Backoff::new(self.cfg.reconnect_min, self.cfg.reconnect_max),
                            ));
                        }
                    }
                    let mut closed = session.closed;
                    let end = tokio::select! {
                        r = &mut closed => SessionEnd::Lost(r.unwrap_or_else(|_| "session ended".into())),
                        Some(c) = self.restart.recv() => SessionEnd::Restart(c),
                        Some(n) = health_rx.recv() => SessionEnd::Health(n),
                        _ = self.cancel.cancelled() => SessionEnd::Shutdown,
                    };
                    remote_cancel.cancel();
                    let _ = up_tx.send(false);
                    let _ = session_tx.send(None);
                    if let SessionEnd::Shutdown = end {
                        self.shared
                            .set_state(TunnelState::Stopping, "stopping: draining connections");
                        listeners.cancel();
                        for t in side_tasks.drain(..) {
                            let _ = t.await;
                        }
                        self.signal_accepting_closed();
                        self.close_gracefully(&handle, &specs).await;
                        break 'outer;
                    }
                    self.mark_remote_waiting(&specs);
                    ssh::disconnect(&handle, "tunnelfleet: session restart").await;
                    let why = match &end {
                        SessionEnd::Lost(r) => format!("session to {endpoint} lost: {r}"),
                        SessionEnd::Restart(c) => format!("session restarted: {c}"),
                        SessionEnd::Health(n) => {
                            format!("session restarted: health check failed {n} times in a row")
                        }
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
                    if started.elapsed() >= STABLE_SESSION {
                        failures = 0;
                        backoff.reset();
                    }
                    match end {
                        SessionEnd::Restart(_) => {
                            // Asked for by an operator: go again now, and not as a failure.
                            failures = 0;
                            immediate = true;
                        }
                        _ => failures += 1,
                    }
                }
            }
            if failures >= self.cfg.failover_after && endpoints.len() > 1 {
                let next = (idx + 1) % endpoints.len();
                let to = format!("{}:{}", endpoints[next].0, endpoints[next].1);
                let reason = self.shared.lock().last_error.clone().unwrap_or_default();
                tracing::warn!(profile = %self.cfg.name, from = %endpoint, to = %to, failures, "failing over to the next endpoint: {reason}");
                self.shared.record_failover(&endpoint, &to, &reason);
                idx = next;
                failures = 0;
                backoff.reset();
                continue;
            }
            if immediate {
                continue;
            }
            let delay = backoff.next_delay();
            self.shared.set_state(
                TunnelState::Backoff,
                &format!(
                    "retrying {endpoint} in {}",
                    humantime::format_duration(round_ms(delay))
                ),
            );
            tokio::select! {
                _ = self.cancel.cancelled() => break 'outer,
                _ = tokio::time::sleep(delay) => {}
                Some(c) = self.restart.recv() => {
                    tracing::info!(profile = %self.cfg.name, "backoff cut short: {c}");
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

/// Requests one remote forward, retrying while the server refuses.
///
/// The classic autossh failure: after a reconnect the server still holds the port for the old,
/// half-dead session and answers "remote port forwarding failed". `ssh -o
/// ExitOnForwardFailure=yes` then exits and the loop spins; without it ssh runs on without the
/// forward. Here the request is simply retried with backoff until the old session is reaped.
#[allow(clippy::too_many_arguments)]
async fn hold_remote_forward(
    handle: Arc<Handle<ClientHandler>>,
    index: usize,
    bind: String,
    port: u16,
    shared: Arc<ProfileShared>,
    remote: Arc<RemoteForwards>,
    cancel: CancellationToken,
    mut backoff: Backoff,
) {
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = handle.tcpip_forward(bind.clone(), port as u32) => r,
        };
        match result {
            Ok(assigned) => {
                let bound = if port == 0 { assigned } else { port as u32 };
                remote.mark_bound(index, bound);
                let detail = (port == 0).then(|| format!("server assigned port {bound}"));
                shared.set_forward(index, ForwardState::Active, detail);
                return;
            }
            Err(russh::Error::RequestDenied) => {
                let delay = backoff.next_delay();
                shared.set_forward(
                    index,
                    ForwardState::Retrying,
                    Some(format!(
                        "server refused to listen on {bind}:{port} (port {port} in use on the server, often by a stale session); retrying"
                    )),
                );
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                tracing::debug!(port, "remote forward request ended: {e}");
                return;
            }
        }
    }
}
