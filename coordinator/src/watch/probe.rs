//! Probing an OMA endpoint: TCP connect plus its SSH identification line, and when the next
//! probe comes.

use std::time::Duration;

use tokio::time::Instant;

use crate::monitor::ProbeError;

/// From one probe's start to the next one's: the group's `probe_interval` after a pass, a
/// quarter of it (at least 100 ms) after a failure, so a failing endpoint's `threshold`
/// failures come in about `threshold` probe timeouts (a blackhole) rather than `threshold`
/// intervals, while a blip of a few milliseconds still takes more than one probe's worth to
/// count `threshold` times.
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
}
