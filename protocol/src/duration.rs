//! Durations as each format wants them: `"15s"` in TOML and JSON (what operators write and
//! read, as humantime spells it), seconds and nanoseconds in bincode frames (exact and compact).
//! Use as `#[serde(with = "crate::duration")]`.

use std::time::Duration;

use serde::de::{Error as _, Unexpected};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Serializes `d` as a humantime string for human-readable formats, natively otherwise.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    if s.is_human_readable() {
        s.collect_str(&humantime::format_duration(*d))
    } else {
        d.serialize(s)
    }
}

/// The inverse of [`serialize`]: humantime text (`"1m 30s"`) or the native form.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    if d.is_human_readable() {
        let text = String::deserialize(d)?;
        // The message humantime_serde gave, which operators and tests already know.
        humantime::parse_duration(&text)
            .map_err(|_| D::Error::invalid_value(Unexpected::Str(&text), &"a duration"))
    } else {
        Duration::deserialize(d)
    }
}
