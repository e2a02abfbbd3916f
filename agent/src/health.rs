//! Health checks through the tunnel, and the consecutive-failure rule.
//!
//! The seed curls `http://localhost:8082/health` every 60 s and restarts ssh when it fails; the
//! rule here is the same, made explicit: `threshold` failures in a row (default 3) mark the
//! profile down and ask the runner for a new session (make-before-break: it replaces the
//! current one only once its own check passes), and any pass resets the count. A single lost check is
//! noise; three in a row is an outage. The counting lives in [`HealthTracker`], free of IO and
//! time, so it is tested directly; [`HealthMonitor`] drives it on an interval.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ssh::ClientHandler;
use crate::status::{HealthResult, ProfileShared};
use russh::client::Handle;
use tunnelfleet_protocol::forward::ForwardSpec;
use tunnelfleet_protocol::profile::HealthTarget;
use tunnelfleet_runtime::clock::now_unix_ms;

/// What one observation did to the profile's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    Same,
    /// The threshold was crossed: mark down and try a new session.
    WentDown {
        /// Failures in a row that crossed it.
        failures: u32,
    },
    /// A pass after being down.
    Recovered,
}

/// Counts consecutive failures against a threshold.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    threshold: u32,
    consecutive: u32,
    healthy: bool,
    /// The endpoint the count is about: a session on another endpoint starts a fresh count.
    endpoint: Option<String>,
}

impl HealthTracker {
    /// A healthy tracker with the given threshold (at least 1).
    pub fn new(threshold: u32) -> Self {
        HealthTracker {
            threshold: threshold.max(1),
            consecutive: 0,
            healthy: true,
            endpoint: None,
        }
    }

    /// Records one result of a check through a session to `endpoint`. Failures against the
    /// endpoint the profile just left say nothing about the one it is on now, so a move starts
    /// the count afresh.
    pub fn observe_at(&mut self, endpoint: &str, ok: bool) -> Transition {
        if self.endpoint.as_deref() != Some(endpoint) {
            self.endpoint = Some(endpoint.to_string());
            self.consecutive = 0;
        }
        self.observe(ok)
    }

    /// Records one result.
    pub fn observe(&mut self, ok: bool) -> Transition {
        if ok {
            self.consecutive = 0;
            if !self.healthy {
                self.healthy = true;
                return Transition::Recovered;
            }
            return Transition::Same;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        // The count grows until a pass (it is what heartbeats report, and three in a row is the
        // alert); a new session is tried once per `threshold` of them, so a dead endpoint
        // triggers one attempt per `threshold` checks, not one per check.
        if self.consecutive.is_multiple_of(self.threshold) {
            self.healthy = false;
            return Transition::WentDown {
                failures: self.consecutive,
            };
        }
        Transition::Same
    }

    /// Failures in a row so far; grows until a check passes.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// False between crossing the threshold and the next pass.
    pub fn healthy(&self) -> bool {
        self.healthy
    }
}

/// Where a check's connection goes.
pub enum Route<'a> {
    /// Straight to the target (through the profile's listener and its current session).
    Direct,
    /// Over a `direct-tcpip` channel of `handle` to `host:port`, the destination of the `L`
    /// forward that serves the target: a check through a session that carries no traffic yet,
    /// before a move to it completes.
    Through {
        /// The candidate session.
        handle: &'a Handle<ClientHandler>,
        /// The forward's destination host, as the server resolves it.
        host: String,
        /// Its port.
        port: u16,
    },
}

/// The destination of the `L` forward that serves `target` (a check of
/// `http://127.0.0.1:8082/health` is served by `L 8082:localhost:8082`), if one does.
pub fn served_by(target: &HealthTarget, forwards: &[ForwardSpec]) -> Option<(String, u16)> {
    let (host, port) = match target {
        HealthTarget::Tcp { host, port } | HealthTarget::Http { host, port, .. } => (host, *port),
    };
    let loopback = matches!(host.as_str(), "localhost" | "127.0.0.1" | "::1" | "[::1]");
    forwards.iter().find_map(|f| match f {
        ForwardSpec::Local {
            bind,
            port: listen,
            host: to,
            host_port,
        } if *listen == port && (loopback || bind == host) => Some((to.clone(), *host_port)),
        _ => None,
    })
}

/// Runs one check with a deadline.
pub async fn run_check(target: &HealthTarget, timeout: Duration) -> HealthResult {
    run_check_via(target, timeout, Route::Direct).await
}

/// Runs one check along `route` with a deadline.
pub async fn run_check_via(
    target: &HealthTarget,
    timeout: Duration,
    route: Route<'_>,
) -> HealthResult {
    let start = Instant::now();
    let outcome = tokio::time::timeout(timeout, check_once(target, route)).await;
    let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    let (ok, detail) = match outcome {
        Ok(Ok(detail)) => (true, detail),
        Ok(Err(failure)) => (false, failure.to_string()),
        Err(_) => (
            false,
            format!("timed out after {}", humantime::format_duration(timeout)),
        ),
    };
    HealthResult {
        at_unix_ms: now_unix_ms(),
        ok,
        latency_ms,
        detail,
    }
}

/// Why one check failed (its text is the check's detail in status and heartbeats).
#[derive(Debug, thiserror::Error)]
enum CheckFailure {
    /// The target refused or was unreachable.
    #[error("connect {host}:{port}: {source}")]
    Connect {
        /// Host the check connects to.
        host: String,
        /// Its port.
        port: u16,
        /// The connect error.
        source: std::io::Error,
    },
    /// The candidate session could not reach the forward's destination.
    #[error("through the new session, {host}:{port}: {source}")]
    Channel {
        /// The forward's destination host.
        host: String,
        /// Its port.
        port: u16,
        /// The server's refusal.
        source: russh::Error,
    },
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    /// The request could not be built.
    #[error("http request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The body broke off.
    #[error("http body: {0}")]
    Body(#[source] hyper::Error),
    /// A status other than 2xx.
    #[error("HTTP {0}")]
    Status(u16),
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, CheckFailure> {
    TcpStream::connect((host, port))
        .await
        .map_err(|source| CheckFailure::Connect {
            host: host.to_string(),
            port,
            source,
        })
}

/// One check: `Ok` with what passed (`connected`, `HTTP 200`).
async fn check_once(target: &HealthTarget, route: Route<'_>) -> Result<String, CheckFailure> {
    let (host, port) = match target {
        HealthTarget::Tcp { host, port } | HealthTarget::Http { host, port, .. } => (host, *port),
    };
    match route {
        Route::Direct => check_over(target, connect(host, port).await?).await,
        Route::Through { handle, host, port } => {
            let channel = handle
                .channel_open_direct_tcpip(host.clone(), u32::from(port), "127.0.0.1", 0)
                .await
                .map_err(|source| CheckFailure::Channel { host, port, source })?;
            check_over(target, channel.into_stream()).await
        }
    }
}

/// The check over an open connection to its target.
/// How much of a health endpoint's body is read (and dropped) before its status decides.
const BODY_READ_LIMIT: usize = 64 * 1024;

async fn check_over<S>(target: &HealthTarget, stream: S) -> Result<String, CheckFailure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match target {
        HealthTarget::Tcp { .. } => Ok("connected".to_string()),
        HealthTarget::Http { host, port, path } => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(CheckFailure::Http)?;
            let driver = tokio::spawn(conn);
            let req = hyper::Request::get(path.as_str())
                .header(hyper::header::HOST, format!("{host}:{port}"))
                .header(hyper::header::USER_AGENT, "tunnelfleet-agent")
                .body(Empty::<Bytes>::new())?;
            let result = async {
                let resp = sender.send_request(req).await.map_err(CheckFailure::Http)?;
                let status = resp.status();
                // Read the body (a server that fails mid-response fails the check), up to a
                // bound: its status decides, and an endless body is not held in memory.
                let mut body = resp.into_body();
                let mut read = 0usize;
                while read < BODY_READ_LIMIT {
                    match body.frame().await {
                        None => break,
                        Some(Err(e)) => return Err(CheckFailure::Body(e)),
                        Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len()),
                    }
                }
                if status.is_success() {
                    Ok(format!("HTTP {}", status.as_u16()))
                } else {
                    Err(CheckFailure::Status(status.as_u16()))
                }
            }
            .await;
            driver.abort();
            result
        }
    }
}

/// Drives a profile's checks while its session is up.
pub struct HealthMonitor<C> {
    /// Time between checks.
    pub interval: Duration,
    /// The counting rule.
    pub tracker: HealthTracker,
    /// Where results go.
    pub shared: Arc<ProfileShared>,
    /// True while the session is up; checks pause while it is down.
    pub session_up: watch::Receiver<bool>,
    /// The check itself (a closure so tests can script results).
    pub check: C,
    /// Told when the threshold is crossed, with the failure count.
    pub on_down: tokio::sync::mpsc::Sender<u32>,
    /// Stops the monitor.
    pub cancel: CancellationToken,
}

impl<C, F> HealthMonitor<C>
where
    C: FnMut() -> F,
    F: Future<Output = HealthResult>,
{
    /// Runs until cancelled.
    pub async fn run(mut self) {
        let mut next = tokio::time::Instant::now() + self.interval;
        loop {
            // Wait for the session: a check against a tunnel that is known to be down says
            // nothing new and would only count towards a restart that is already happening.
            if !*self.session_up.borrow() {
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    r = self.session_up.wait_for(|up| *up) => if r.is_err() { return },
                }
                // A session (back) up: its first check an interval from now.
                next = tokio::time::Instant::now() + self.interval;
            }
            // Checks start `interval` apart, however long one takes (a hanging service
            // answers at its timeout): `threshold` failures take `threshold` intervals.
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            if !*self.session_up.borrow() {
                continue;
            }
            next += self.interval;
            let result = (self.check)().await;
            self.record(result).await;
            // A check that took longer than the interval: the next one at once, not a burst.
            next = next.max(tokio::time::Instant::now());
        }
    }

    /// Records a scheduled check's result and acts on the transition.
    async fn record(&mut self, result: HealthResult) {
        let name;
        let transition;
        {
            let mut s = self.shared.lock();
            name = s.name.clone();
            transition = self.tracker.observe_at(&s.active_endpoint, result.ok);
            if let Some(h) = s.health.as_mut() {
                h.checks += 1;
                if !result.ok {
                    h.failures += 1;
                }
                h.consecutive_failures = self.tracker.consecutive();
                h.healthy = self.tracker.healthy();
                h.last = Some(result.clone());
            }
        }
        match transition {
            Transition::WentDown { failures } => {
                tracing::warn!(profile = %name, failures, reason = %result.detail, "health check failed {failures} times in a row: profile down, trying a new session");
                // The runner may be busy reconnecting already; a full queue means a restart
                // is pending, which is what we want anyway.
                let _ = self.on_down.try_send(failures);
            }
            Transition::Recovered => {
                tracing::info!(profile = %name, latency_ms = result.latency_ms, "health check passes again: profile healthy")
            }
            Transition::Same if !result.ok => {
                tracing::debug!(profile = %name, reason = %result.detail, consecutive = self.tracker.consecutive(), "health check failed")
            }
            Transition::Same => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::HealthStatus;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    #[test]
    fn threshold_and_reset() {
        let mut t = HealthTracker::new(3);
        assert_eq!(t.observe(false), Transition::Same);
        assert_eq!(t.observe(false), Transition::Same);
        // A pass resets the count.
        assert_eq!(t.observe(true), Transition::Same);
        assert_eq!(t.consecutive(), 0);
        assert_eq!(t.observe(false), Transition::Same);
        assert_eq!(t.observe(false), Transition::Same);
        assert_eq!(t.observe(false), Transition::WentDown { failures: 3 });
        assert!(!t.healthy());
        // Still failing: the count keeps growing (heartbeats carry it), and the next restart
        // comes after another full streak.
        assert_eq!(t.observe(false), Transition::Same);
        assert_eq!(t.consecutive(), 4);
        assert_eq!(t.observe(false), Transition::Same);
        assert_eq!(t.observe(false), Transition::WentDown { failures: 6 });
        assert_eq!(t.observe(true), Transition::Recovered);
        assert_eq!(t.consecutive(), 0);
        assert!(t.healthy());
    }

    #[test]
    fn a_move_to_another_endpoint_starts_a_fresh_count() {
        let mut t = HealthTracker::new(3);
        for _ in 0..4 {
            t.observe_at("oma-a:22", false);
        }
        assert_eq!(t.consecutive(), 4);
        // The failures were oma-a's: on oma-b the count starts again.
        assert_eq!(t.observe_at("oma-b:22", false), Transition::Same);
        assert_eq!(t.consecutive(), 1);
        assert_eq!(t.observe_at("oma-b:22", true), Transition::Recovered);
    }

    fn result(ok: bool) -> HealthResult {
        HealthResult {
            at_unix_ms: 0,
            ok,
            latency_ms: 1.0,
            detail: if ok {
                "HTTP 200".into()
            } else {
                "HTTP 503".into()
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn monitor_restarts_after_threshold_on_the_interval() {
        let shared = Arc::new(ProfileShared::new(
            "p",
            "",
            vec!["h:22".into()],
            &[],
            Some(HealthStatus {
                target: "t".into(),
                threshold: 3,
                consecutive_failures: 0,
                healthy: true,
                checks: 0,
                failures: 0,
                last: None,
            }),
        ));
        let script = Arc::new(Mutex::new(VecDeque::from([
            false, false, true, false, false, false,
        ])));
        let (up_tx, up_rx) = watch::channel(true);
        let (down_tx, mut down_rx) = tokio::sync::mpsc::channel(1);
        let cancel = CancellationToken::new();
        let s = script.clone();
        let monitor = HealthMonitor {
            interval: Duration::from_secs(60),
            tracker: HealthTracker::new(3),
            shared: shared.clone(),
            session_up: up_rx,
            check: move || {
                let ok = s.lock().unwrap().pop_front().unwrap_or(true);
                async move { result(ok) }
            },
            on_down: down_tx,
            cancel: cancel.clone(),
        };
        let start = tokio::time::Instant::now();
        let task = tokio::spawn(monitor.run());
        let failures = down_rx.recv().await.unwrap();
        assert_eq!(failures, 3);
        // Six checks at 60 s intervals: the pass at check 3 reset the first streak.
        assert_eq!(start.elapsed(), Duration::from_secs(360));
        let h = shared.snapshot().health.unwrap();
        assert_eq!((h.checks, h.failures, h.healthy), (6, 5, false));
        // What the heartbeat carries: three in a row, not a count reset at the restart (which
        // kept the coordinator's `tunnel_health` rule from ever seeing three).
        assert_eq!(h.consecutive_failures, 3);
        // While the session is down no checks run.
        up_tx.send(false).unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(shared.snapshot().health.unwrap().checks, 6);
        up_tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_secs(61)).await;
        let h = shared.snapshot().health.unwrap();
        assert_eq!((h.checks, h.healthy), (7, true));
        cancel.cancel();
        task.await.unwrap();
    }

    /// A health endpoint that answers 200 and then streams forever (or gigabytes) is healthy by
    /// its status: the check reads a bounded part of the body and stops, instead of holding it
    /// all in memory until the timeout fails the check.
    #[tokio::test]
    async fn an_endless_body_is_read_only_so_far() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                        .await;
                    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
                    while s.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        let r = run_check(
            &HealthTarget::Http {
                host: "127.0.0.1".into(),
                port,
                path: "/health".into(),
            },
            Duration::from_secs(5),
        )
        .await;
        assert!(r.ok, "{r:?}");
        assert_eq!(r.detail, "HTTP 200");
    }

    #[tokio::test]
    async fn real_checks_against_real_listeners() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ok = run_check(
            &HealthTarget::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            Duration::from_secs(5),
        )
        .await;
        assert!(ok.ok, "{ok:?}");
        drop(listener);
        let bad = run_check(
            &HealthTarget::Http {
                host: "127.0.0.1".into(),
                port,
                path: "/health".into(),
            },
            Duration::from_secs(5),
        )
        .await;
        assert!(!bad.ok);
        assert!(bad.detail.contains(&format!("127.0.0.1:{port}")), "{bad:?}");
    }
}
