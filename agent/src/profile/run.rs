//! The runner's loop: connect, serve until the session is left (lost, health, command,
//! shutdown), decide where next, back off.

use std::sync::Arc;
use std::time::Duration;

use russh::client::Handle;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use tunnelfleet_protocol::ErrorKind;

use super::standby::WarmStandby;
use super::{Runner, SessionEnd, addr, round_ms};
use crate::dial;
use crate::health::{HealthMonitor, HealthTracker, run_check};
use crate::local::LocalForward;
use crate::placement::{Ended, HealthStep, Next, Placement, STABLE_SESSION};
use crate::ssh::{self, ClientHandler, Live, RemoteEntry};
use crate::status::{ForwardState, TunnelState};
use tokio::time::Instant;
use tunnelfleet_protocol::forward::ForwardSpec;
use tunnelfleet_protocol::profile::Standby;
use tunnelfleet_runtime::backoff::Backoff;

impl Runner {
    pub(super) async fn run(mut self) {
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
                                                Err(refusal) => refusals.push(refusal.to_string()),
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
                                            // A warm session taken for a refused move is held again.
                                            self.aim_warm(&endpoints, &on);
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
                                            self.aim_warm(&endpoints, &on);
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
