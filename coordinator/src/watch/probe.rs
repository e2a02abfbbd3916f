//! Probing an OMA endpoint: TCP connect plus its SSH identification line, and when the next
//! probe comes.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::monitor::ProbeError;

/// Probes of one endpoint in flight at most (a failing endpoint's probes overlap).
const MAX_IN_FLIGHT: usize = 4;

/// From one probe's start to the next one's: the group's `probe_interval` after a pass, a
/// quarter of it (at least 100 ms) after a failure, so a failing endpoint's `threshold`
/// failures come in about one probe timeout plus `threshold - 1` quarter intervals (a
/// blackhole: the confirming probes run side by side), while a blip of a few milliseconds
/// still takes more than one probe's worth to count `threshold` times.
pub fn probe_gap(interval: Duration, passed: bool) -> Duration {
    if passed {
        interval
    } else {
        (interval / 4).max(Duration::from_millis(100))
    }
}

/// TCP connect plus the SSH identification line, within `timeout`. A blackholed server (or a
/// stopped sshd whose kernel still completes the handshake) fails here by the deadline.
pub async fn probe(endpoint: &str, timeout: Duration) -> Result<Duration, ProbeError> {
    let start = Instant::now();
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(endpoint)
            .await
            .map_err(ProbeError::Connect)?;
        let banner = tunnelfleet_runtime::banner::read_banner(&mut s)
            .await
            .map_err(ProbeError::Read)?;
        if banner.is_empty() {
            Err(ProbeError::Closed)
        } else if banner.starts_with("SSH-") {
            Ok(())
        } else {
            Err(ProbeError::NotSsh(banner.chars().take(40).collect()))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

/// One endpoint's probes, in start order: every `interval` while it passes; once one fails, the
/// next ones start [`probe_gap`] apart without waiting for the one before to time out (at most
/// [`MAX_IN_FLIGHT`] at once), so a blackhole is confirmed in about one timeout plus two
/// quarter intervals instead of three timeouts. Dropping it stops every probe in flight.
pub struct Prober {
    endpoint: String,
    interval: Duration,
    timeout: Duration,
    in_flight: VecDeque<AbortOnDropHandle<Result<Duration, ProbeError>>>,
    last_start: Option<Instant>,
    next_start: Instant,
    failing: bool,
}

impl Prober {
    /// The first probe starts at once.
    pub fn new(endpoint: String, interval: Duration, timeout: Duration) -> Prober {
        Prober {
            endpoint,
            interval,
            timeout,
            in_flight: VecDeque::new(),
            last_start: None,
            next_start: Instant::now(),
            failing: false,
        }
    }

    /// The next probe's result, in the order the probes started.
    pub async fn next(&mut self) -> Result<Duration, ProbeError> {
        loop {
            let room = self.in_flight.len() < MAX_IN_FLIGHT;
            let next_start = self.next_start;
            let Some(front) = self.in_flight.front_mut() else {
                tokio::time::sleep_until(next_start).await;
                self.start();
                continue;
            };
            tokio::select! {
                biased;
                joined = front => {
                    self.in_flight.pop_front();
                    // A probe task only ends by returning (it is aborted only with `self`).
                    let result = joined.unwrap_or(Err(ProbeError::Closed));
                    self.settle(result.is_ok());
                    return result;
                }
                () = tokio::time::sleep_until(next_start), if room => {}
            }
            self.start();
        }
    }

    fn start(&mut self) {
        let endpoint = self.endpoint.clone();
        let timeout = self.timeout;
        self.in_flight
            .push_back(AbortOnDropHandle::new(tokio::spawn(async move {
                probe(&endpoint, timeout).await
            })));
        let now = Instant::now();
        self.last_start = Some(now);
        self.next_start = now + probe_gap(self.interval, !self.failing);
    }

    /// After a result: a failure brings the next start forward to a quarter interval after the
    /// last one (now, if that has passed); a pass puts it back a whole interval after it.
    fn settle(&mut self, passed: bool) {
        self.failing = !passed;
        let last = self.last_start.unwrap_or_else(Instant::now);
        self.next_start = (last + probe_gap(self.interval, passed)).max(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_probe_is_confirmed_sooner_than_a_pass_is_repeated() {
        let second = Duration::from_secs(1);
        assert_eq!(probe_gap(second, true), second);
        assert_eq!(probe_gap(second, false), Duration::from_millis(250));
        // Never a tight loop against an endpoint that refuses at once.
        assert_eq!(
            probe_gap(Duration::from_millis(200), false),
            Duration::from_millis(100)
        );
    }

    /// A listener that takes connections and never says a word: a stopped sshd, as its kernel
    /// completes the handshake.
    async fn silent() -> (tokio::net::TcpListener, String) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        (l, addr)
    }

    async fn results(p: &mut Prober, n: usize) -> Vec<(bool, Duration)> {
        let t0 = Instant::now();
        let mut out = Vec::new();
        for _ in 0..n {
            let r = p.next().await;
            out.push((r.is_ok(), t0.elapsed()));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_endpoint_fails_three_times_in_one_timeout_and_two_quarter_intervals() {
        let (_l, addr) = silent().await;
        let mut p = Prober::new(addr, Duration::from_secs(1), Duration::from_millis(800));
        let got = results(&mut p, 4).await;
        assert!(got.iter().all(|(ok, _)| !ok), "{got:?}");
        let at: Vec<u128> = got.iter().map(|(_, d)| d.as_millis()).collect();
        // First at its timeout; the next started at once, then a quarter interval apart, each
        // taking its own timeout: 0.8 s, 1.6, 1.85, 2.1 (one after another: 0.8, 1.6, 2.4).
        assert_eq!(at, vec![800, 1600, 1850, 2100]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_endpoint_is_probed_once_an_interval() {
        let (l, addr) = silent().await;
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(b"SSH-2.0-test\r\n").await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        let mut p = Prober::new(addr, Duration::from_secs(1), Duration::from_millis(800));
        let got = results(&mut p, 3).await;
        assert!(got.iter().all(|(ok, _)| *ok), "{got:?}");
        let at: Vec<u128> = got.iter().map(|(_, d)| d.as_millis()).collect();
        assert_eq!(at, vec![0, 1000, 2000]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_that_refuses_at_once_is_probed_a_quarter_interval_apart() {
        // A port nobody listens on: refused at once, never a tight loop.
        let (l, addr) = silent().await;
        drop(l);
        let mut p = Prober::new(addr, Duration::from_secs(1), Duration::from_millis(800));
        let got = results(&mut p, 4).await;
        assert!(got.iter().all(|(ok, _)| !ok), "{got:?}");
        let at: Vec<u128> = got.iter().map(|(_, d)| d.as_millis()).collect();
        assert_eq!(at, vec![0, 250, 500, 750]);
    }
}
