//! Exponential backoff with full jitter.
//!
//! Full jitter (a uniform delay between zero and the capped exponential) is what keeps hundreds
//! of appliances that lost the same OMA from reconnecting in lockstep; the floor keeps one agent
//! from spinning when the cap is small.

use std::time::Duration;

use rand::RngExt;

/// Reconnect delays between `min` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `min` and never exceeding `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The backoff as it stands after `attempts` delays, for a count of failures kept elsewhere
    /// (on disk, say).
    pub fn after(mut self, attempts: u32) -> Self {
        self.attempt = attempts;
        self
    }

    /// The next delay: uniform in `[min, min(max, min·2^attempt)]`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        if ceiling <= self.min {
            return self.min;
        }
        let span = (ceiling - self.min).as_micros() as u64;
        self.min + Duration::from_micros(rand::rng().random_range(0..=span))
    }

    /// The largest delay the next call may return.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(31));
        self.min.saturating_mul(factor).min(self.max)
    }

    /// Back to the first step (after a session proved stable).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_within_bounds() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let mut last_ceiling = Duration::ZERO;
        for _ in 0..40 {
            let c = b.ceiling();
            assert!(c >= last_ceiling && c <= max);
            last_ceiling = c;
            let d = b.next_delay();
            assert!(d >= min && d <= c, "{d:?} outside [{min:?}, {c:?}]");
        }
        assert_eq!(b.ceiling(), max);
        b.reset();
        assert_eq!(b.ceiling(), min);
    }

    #[test]
    fn after_starts_where_that_many_delays_would_have_left_it() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(Backoff::new(min, max).after(0).ceiling(), min);
        assert_eq!(
            Backoff::new(min, max).after(3).ceiling(),
            Duration::from_secs(8)
        );
        let mut stepped = Backoff::new(min, max);
        for _ in 0..5 {
            stepped.next_delay();
        }
        assert_eq!(stepped.ceiling(), Backoff::new(min, max).after(5).ceiling());
        assert_eq!(Backoff::new(min, max).after(u32::MAX).ceiling(), max);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(10));
            for _ in 0..6 {
                b.next_delay();
            }
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 10, "delays are not jittered: {seen:?}");
    }
}
