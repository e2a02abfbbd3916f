//! Silences: alerts whose key matches a silence's glob are recorded but not delivered until it
//! ends.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode_all, json};

/// Alerts whose key matches are recorded but not delivered until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Silence {
    /// Id (assigned by the store).
    pub id: u64,
    /// Glob on the alert key (`oma_down:*`, `*:vma-7*`).
    pub matcher: String,
    /// Until (Unix ms).
    pub until_unix_ms: u64,
    /// Why, from the operator who set it.
    pub comment: String,
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, rest)) => {
            let Some(tail) = text.strip_prefix(head) else {
                return false;
            };
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len())
                .filter(|&i| tail.is_char_boundary(i))
                .any(|i| glob_match(rest, &tail[i..]))
        }
    }
}

impl Store {
    /// Adds a silence; returns it with its id.
    pub async fn add_silence(&self, mut s: Silence) -> Result<Silence, StoreError> {
        s.id = self.db.generate_id().await? + 1;
        self.silences.insert(s.id.to_be_bytes(), json(&s))?;
        self.durable().await?;
        Ok(s)
    }

    /// Silences still in force at `now_unix_ms`.
    pub fn silences(&self, now_unix_ms: u64) -> Result<Vec<Silence>, StoreError> {
        let mut v: Vec<Silence> = decode_all(&self.silences, "silences")?;
        v.retain(|s| s.until_unix_ms > now_unix_ms);
        Ok(v)
    }

    /// Whether an alert with `key` is silenced at `now_unix_ms`.
    pub(super) fn silenced(&self, key: &str, now_unix_ms: u64) -> Result<bool, StoreError> {
        Ok(self
            .silences(now_unix_ms)?
            .iter()
            .any(|s| glob_match(&s.matcher, key)))
    }
}
