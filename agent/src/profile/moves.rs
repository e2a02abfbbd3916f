//! Make-before-break moves: a new session is made, binds every remote forward and passes the
//! health check through itself before it carries anything; the old one finishes its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::remote::{RemoteRefused, RemoteRequest, bind_remote, hold_remote_forward};
use super::{Candidate, Current, Runner, addr};
use crate::dial;
use crate::health::{Route, run_check_via, served_by};
use crate::placement::Placement;
use crate::ssh::{self, Live, SessionError, SshSession};
use crate::status::ForwardState;
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_protocol::forward::ForwardSpec;
use tunnelfleet_runtime::backoff::Backoff;

/// Why a move was not made: the profile stays where it is, with this in its status.
#[derive(Debug, thiserror::Error)]
pub enum MoveRefused {
    /// No session to the target.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The profile is stopping.
    #[error("stopping")]
    Stopping,
    /// The target would not bind a remote forward.
    #[error("{forward} on {to}: {why}")]
    Remote {
        /// The forward as written.
        forward: String,
        /// The target endpoint.
        to: String,
        /// The server's refusal.
        why: RemoteRefused,
    },
    /// The health check through the new session failed.
    #[error("health check {check} through the new session to {to} failed: {detail}")]
    Health {
        /// The check, described.
        check: String,
        /// The target endpoint.
        to: String,
        /// What it found.
        detail: String,
    },
}

impl Runner {
    /// The second half of a make-before-break move: `candidate` carries new connections from
    /// now on, the session it replaces is retired (it finishes its own), the warm standby is
    /// re-aimed. Returns the endpoint left.
    pub(super) fn take_over(
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
    pub(super) fn aim_warm(&self, endpoints: &[(String, u16)], on: &str) {
        let Some(w) = &self.warm else { return };
        let at = endpoints.iter().position(|e| addr(e) == on).unwrap_or(0);
        let next = endpoints.get((at + 1) % endpoints.len()).cloned();
        w.aim(next.filter(|n| addr(n) != on));
    }

    pub(super) fn set_active(&self, endpoint: &str) {
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
    pub(super) fn go_live(
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
            closes: session.closes,
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
    pub(super) fn retire(&self, old: Current, specs: &[ForwardSpec]) {
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
    pub(super) async fn try_move(
        &self,
        host: &str,
        port: u16,
        specs: &[ForwardSpec],
        old: &Live,
    ) -> Result<Candidate, MoveRefused> {
        let to = format!("{host}:{port}");
        let session = match self.warm.as_ref().and_then(|w| w.take(host, port)) {
            Some(s) => s,
            None => tokio::select! {
                r = dial::connect(&self.params, host, port) => r?,
                _ = self.cancel.cancelled() => return Err(MoveRefused::Stopping),
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
                    refusal = Some(MoveRefused::Remote {
                        forward: spec.to_string(),
                        to: to.clone(),
                        why,
                    });
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
                refusal = Some(MoveRefused::Health {
                    check: target.describe(),
                    to,
                    detail: r.detail,
                });
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
    pub(super) async fn probe(&self, host: &str, port: u16) -> bool {
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
    pub(super) fn retargeted(
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
}
