//! Token buckets per key: a burst, then a steady rate, for each key on its own; how many keys
//! are tracked is bounded. The one rate limiter of the coordinator (handshakes per source
//! address, hellos per agent). No IO.

use std::collections::HashMap;
use std::hash::Hash;

use tokio::time::Instant;

/// One bucket per key.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: f64,
    per_second: f64,
    max_keys: usize,
    buckets: HashMap<K, (f64, Instant)>,
}

impl<K: Hash + Eq> Buckets<K> {
    /// `burst` at once per key, then `per_second`; at most `max_keys` tracked: past it,
    /// buckets that are full again are dropped (a full bucket is what a new key gets anyway),
    /// and if none is, the new key is let through untracked rather than refused (the cap bounds
    /// memory, not who may come).
    pub fn new(burst: f64, per_second: f64, max_keys: usize) -> Self {
        Buckets {
            burst,
            per_second,
            max_keys,
            buckets: HashMap::new(),
        }
    }

    /// Whether `key` may go at `now` (taking one token if so). A refusal takes nothing: a key
    /// that keeps trying gets its next turn as soon as one who waited would.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_keys {
            let (burst, per_second) = (self.burst, self.per_second);
            self.buckets
                .retain(|_, b| refill(*b, now, burst, per_second) < burst);
            if self.buckets.len() >= self.max_keys {
                return true;
            }
        }
        let (burst, per_second) = (self.burst, self.per_second);
        let b = self.buckets.entry(key).or_insert((burst, now));
        let tokens = refill(*b, now, burst, per_second);
        if tokens < 1.0 {
            *b = (tokens, now);
            return false;
        }
        *b = (tokens - 1.0, now);
        true
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

fn refill((tokens, at): (f64, Instant), now: Instant, burst: f64, per_second: f64) -> f64 {
    let secs = now.saturating_duration_since(at).as_secs_f64();
    (tokens + secs * per_second).min(burst)
}
