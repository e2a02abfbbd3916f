//! The one count every rule of the monitor keeps: failures in a row against a threshold. A
//! result without a failure starts it again; the threshold is reached once the count is at or
//! over it. Probes of an endpoint, refused keys, a tunnel that stays down and an agent's own
//! health checks (counted by the agent, judged here) all go by it.

/// Failures in a row.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Streak(u32);

impl Streak {
    /// Counts a result that brought `failed` failures (0: it passed); the count after it.
    pub(super) fn record(&mut self, failed: u32) -> u32 {
        self.0 = if failed == 0 {
            0
        } else {
            self.0.saturating_add(failed)
        };
        self.0
    }

    /// Failures in a row now.
    pub(super) fn count(self) -> u32 {
        self.0
    }

    /// Whether `threshold` failures in a row were reached.
    pub(super) fn reached(self, threshold: u32) -> bool {
        reached(self.0, threshold)
    }
}

/// Whether `count` failures in a row (counted here or by the agent) reach `threshold`.
pub(super) fn reached(count: u32, threshold: u32) -> bool {
    count >= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_add_up_a_pass_starts_again_and_the_threshold_is_reached_at_it() {
        let mut s = Streak::default();
        assert_eq!(s.record(1), 1);
        assert_eq!(s.record(2), 3);
        assert!(s.reached(3) && !s.reached(4));
        assert_eq!(s.record(0), 0);
        assert!(!s.reached(1));
        assert_eq!(s.record(1), 1);
        assert!(s.reached(1));
        s.0 = u32::MAX - 1;
        assert_eq!(s.record(5), u32::MAX, "saturates");
        assert_eq!(s.count(), u32::MAX);
        assert!(reached(2, 2) && !reached(1, 2));
    }
}
