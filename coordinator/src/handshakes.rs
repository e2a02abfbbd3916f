//! How many handshakes one source address may start: a token bucket per IP address, so the
//! agents of a dead coordinator relinking here (or one host gone wild) cannot crowd out the
//! handshakes of the rest. A burst covers a site's appliances behind one NAT relinking at once;
//! past it, that address gets [`PER_SECOND`] handshakes a second and the rest are refused
//! before any work (the agents retry with backoff). Loopback sources are this host (the
//! benchmarks' thousands of simulated agents, a local relay) and are not limited. No IO.

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::rate::Buckets;

/// Handshakes one address may start at once.
pub const BURST: f64 = 256.0;
/// Then this many a second.
pub const PER_SECOND: f64 = 64.0;
/// Addresses tracked at most; past it, buckets that are full again are dropped (a full bucket
/// is what a new address gets anyway), and if none is, the new address is let through
/// untracked rather than refused: the cap bounds memory, not who may connect.
pub const MAX_SOURCES: usize = 65_536;

/// The buckets, one per address.
#[derive(Debug)]
pub struct HandshakeRate {
    buckets: Buckets<IpAddr>,
}

impl Default for HandshakeRate {
    fn default() -> Self {
        HandshakeRate {
            buckets: Buckets::new(BURST, PER_SECOND, MAX_SOURCES),
        }
    }
}

impl HandshakeRate {
    /// Whether `from` may start a handshake at `now` (taking one token if so).
    pub fn allow(&mut self, from: IpAddr, now: Instant) -> bool {
        from.is_loopback() || self.buckets.allow(from, now)
    }
}

/// How long an address that used its burst waits for its next handshake.
pub fn per_handshake() -> Duration {
    Duration::from_secs_f64(1.0 / PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate_per_address_and_others_untouched() {
        let mut r = HandshakeRate::default();
        let a: IpAddr = [198, 18, 0, 1].into();
        let b: IpAddr = [198, 18, 0, 2].into();
        let now = Instant::now();
        for _ in 0..BURST as usize {
            assert!(r.allow(a, now));
        }
        assert!(!r.allow(a, now), "past the burst");
        assert!(r.allow(b, now), "another address has its own bucket");
        tokio::time::advance(per_handshake()).await;
        assert!(
            r.allow(a, Instant::now()),
            "one more after its share of a second"
        );
        assert!(!r.allow(a, Instant::now()));
        // Refused attempts do not dig the hole deeper: one interval later, one more again.
        for _ in 0..100 {
            assert!(!r.allow(a, Instant::now()));
        }
        tokio::time::advance(per_handshake()).await;
        assert!(r.allow(a, Instant::now()));
        // This host is not limited.
        let local: IpAddr = [127, 0, 0, 1].into();
        for _ in 0..2 * BURST as usize {
            assert!(r.allow(local, Instant::now()));
        }
        // Quiet for long enough: the whole burst again.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..BURST as usize {
            assert!(r.allow(a, Instant::now()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_full_buckets_make_room() {
        let mut r = HandshakeRate::default();
        let now = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            assert!(r.allow(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), now));
        }
        assert_eq!(r.buckets.len(), MAX_SOURCES);
        // Every bucket still short of full: a new address goes through untracked.
        let late: IpAddr = [203, 0, 113, 9].into();
        assert!(r.allow(late, now));
        assert_eq!(r.buckets.len(), MAX_SOURCES);
        // Refilled: room is made.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(r.allow(late, Instant::now()));
        assert_eq!(r.buckets.len(), 1);
    }
}
