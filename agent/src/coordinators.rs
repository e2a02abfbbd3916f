//! Which coordinator to dial: every configured address, a DNS name once for each address it
//! resolves to, tried in turn.
//!
//! A fleet with several coordinators spreads over them: each agent starts at a random one.
//! An agent stays on the coordinator it reached until that link is lost or an attempt fails;
//! the next round then starts at the coordinator after it, so an agent whose coordinator died
//! dials another one first instead of waiting on the dead one; one that was asked to move (a
//! coordinator holding more than its share) starts at any other, at random. A round tries every candidate
//! once; only when all of them failed does the caller back off (full jitter).

use std::net::SocketAddr;

use crate::config::CoordinatorSection;
use tunnelfleet_protocol::addr::split_host_port;

/// One address to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Where.
    pub addr: SocketAddr,
    /// The TLS name its certificate must carry (`server_name`, or the configured host).
    pub server_name: String,
    /// The configured `host:port` it came from (for logs).
    pub configured: String,
}

/// Why no candidate could be made.
#[derive(Debug, thiserror::Error)]
#[error("no coordinator address resolved: {0}")]
pub struct ResolveError(pub String);

/// Resolves every configured address (in the configured order, duplicates dropped). A name
/// that does not resolve is skipped with a warning while others do.
pub async fn resolve(c: &CoordinatorSection) -> Result<Vec<Candidate>, ResolveError> {
    let mut out: Vec<Candidate> = Vec::new();
    let mut failures = Vec::new();
    for configured in c.address.list() {
        let host = match split_host_port(configured, None) {
            Ok((h, _)) => h,
            Err(e) => {
                failures.push(format!("{configured}: {e}"));
                continue;
            }
        };
        let server_name = c.server_name.clone().unwrap_or(host);
        match tokio::net::lookup_host(configured.as_str()).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    failures.push(format!("{configured}: no address"));
                }
                for addr in addrs {
                    if !out.iter().any(|o| o.addr == addr) {
                        out.push(Candidate {
                            addr,
                            server_name: server_name.clone(),
                            configured: configured.clone(),
                        });
                    }
                }
            }
            Err(e) => failures.push(format!("{configured}: {e}")),
        }
    }
    if out.is_empty() {
        return Err(ResolveError(failures.join("; ")));
    }
    for f in &failures {
        tracing::warn!("coordinator address skipped: {f}");
    }
    Ok(out)
}

/// Where the next round of attempts starts.
#[derive(Debug, Clone)]
pub struct Rotation {
    cursor: usize,
}

impl Rotation {
    /// A rotation starting at candidate `start` (modulo the count, whatever it will be).
    pub fn new(start: usize) -> Self {
        Rotation { cursor: start }
    }

    /// A rotation starting at a random candidate, so a fleet spreads over its coordinators.
    pub fn random() -> Self {
        Rotation::new(rand::random::<u32>() as usize)
    }

    /// The order in which to try `n` candidates this round: every one once, from the cursor.
    pub fn order(&self, n: usize) -> Vec<usize> {
        if n == 0 {
            return Vec::new();
        }
        let start = self.cursor % n;
        (0..n).map(|i| (start + i) % n).collect()
    }

    /// The link to candidate `i` of `n` is up: the next round starts there again.
    pub fn up(&mut self, i: usize, n: usize) {
        self.cursor = i % n.max(1);
    }

    /// Candidate `i` of `n` failed or its link was lost: the next round starts after it.
    pub fn down(&mut self, i: usize, n: usize) {
        self.cursor = (i + 1) % n.max(1);
    }

    /// Candidate `i` of `n` asked this agent to link to another: the next round starts at one
    /// of the others, picked at random.
    pub fn elsewhere(&mut self, i: usize, n: usize) {
        self.elsewhere_by(i, n, rand::random::<u32>() as usize);
    }

    fn elsewhere_by(&mut self, i: usize, n: usize, draw: usize) {
        let n = n.max(1);
        self.cursor = if n == 1 {
            0
        } else {
            (i + 1 + draw % (n - 1)) % n
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_candidate_once_per_round_from_the_cursor() {
        let r = Rotation::new(4);
        assert_eq!(r.order(3), vec![1, 2, 0]);
        assert_eq!(r.order(1), vec![0]);
        assert!(r.order(0).is_empty());
    }

    #[test]
    fn a_lost_coordinator_is_tried_last_and_a_live_one_is_kept() {
        let mut r = Rotation::new(0);
        r.up(0, 3);
        assert_eq!(r.order(3), vec![0, 1, 2], "stays on the one it reached");
        r.down(0, 3);
        assert_eq!(r.order(3), vec![1, 2, 0], "the lost one comes last");
        r.down(2, 3);
        assert_eq!(r.order(3), vec![0, 1, 2]);
        // Fewer candidates than before (DNS changed): still in range.
        r.up(5, 2);
        assert_eq!(r.order(2), vec![1, 0]);
    }

    #[test]
    fn asked_to_move_it_starts_at_another() {
        let mut r = Rotation::new(0);
        for draw in 0..6 {
            r.elsewhere_by(1, 3, draw);
            let order = r.order(3);
            assert_ne!(order[0], 1, "draw {draw}: not the one that asked");
        }
        r.elsewhere_by(1, 3, 0);
        assert_eq!(r.order(3), vec![2, 0, 1]);
        r.elsewhere_by(1, 3, 1);
        assert_eq!(r.order(3), vec![0, 1, 2]);
        // One coordinator: it is the only one to go back to.
        r.elsewhere_by(0, 1, 7);
        assert_eq!(r.order(1), vec![0]);
    }

    #[test]
    fn asked_to_move_the_agents_spread_over_the_others() {
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            let mut r = Rotation::new(0);
            r.elsewhere(2, 4);
            seen[r.order(4)[0]] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(
            seen.iter().enumerate().all(|(i, &n)| i == 2 || n > 80),
            "{seen:?}"
        );
    }

    #[test]
    fn random_starts_spread_a_fleet() {
        let mut seen = [0usize; 3];
        for _ in 0..300 {
            seen[Rotation::random().order(3)[0]] += 1;
        }
        assert!(seen.iter().all(|&n| n > 30), "{seen:?}");
    }

    #[tokio::test]
    async fn names_resolve_to_every_address_once_and_bad_ones_are_skipped() {
        let c: crate::config::AgentConfig = toml::from_str(
            "[coordinator]\naddress = [\"127.0.0.1:4433\", \"localhost:4433\", \"127.0.0.1:4433\", \"no-such-host.invalid:4433\"]\n\
             agent_id = \"a\"\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n",
        )
        .expect("parses");
        let c = c.coordinator.expect("section");
        let got = resolve(&c).await.expect("resolves");
        let first = &got[0];
        assert_eq!(first.addr, "127.0.0.1:4433".parse().expect("addr"));
        assert_eq!(first.server_name, "127.0.0.1");
        let addrs: std::collections::HashSet<_> = got.iter().map(|c| c.addr).collect();
        assert_eq!(addrs.len(), got.len(), "no address twice: {got:?}");
        assert!(got.iter().all(|c| !c.configured.contains("invalid")));
    }
}
