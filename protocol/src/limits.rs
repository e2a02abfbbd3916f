//! How many of each thing a message may carry, enforced while decoding.
//!
//! The frame limit bounds bytes, not memory: bincode's serde path does not charge sequence
//! elements to its limit, so 4 MiB of empty `ProfileReport`s (about 12 bytes each on the wire,
//! hundreds in memory) would decode to roughly 100 MB. Every sequence and map a peer controls is
//! therefore read through [`seq`] or [`map`], which refuse a length over its bound before
//! allocating (bincode announces the length first) and stop at the bound otherwise: a frame
//! over them is a decode error, and the connection that sent it is closed as malformed.
//!
//! The bounds are far above what a real agent sends (one profile has at most
//! [`MAX_ENDPOINTS`] endpoints and [`MAX_FORWARDS`] forwards; config files are held to the
//! same numbers when they are read, so a valid configuration always fits).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, MapAccess, SeqAccess, Visitor};

/// Profiles per agent (a heartbeat, a pushed set, an agent config).
pub const MAX_PROFILES: usize = 256;
/// Bytes of an SSH public key line or certificate line on the control link (an ed25519
/// certificate with its principal is about 700; RSA keys are not certified).
pub const MAX_SSH_KEY_LINE: usize = 4096;
/// Endpoints per profile.
pub const MAX_ENDPOINTS: usize = 16;
/// Forwards per profile.
pub const MAX_FORWARDS: usize = 64;
/// Jump hosts per profile.
pub const MAX_JUMPS: usize = 8;
/// Pinned host key fingerprints per profile.
pub const MAX_PINS: usize = 64;
/// Labels per agent.
pub const MAX_LABELS: usize = 32;
/// Health results per profile in one heartbeat.
pub const MAX_HEALTH_SAMPLES: usize = 64;
/// Error counters (endpoint × kind) per profile in one heartbeat.
pub const MAX_ERROR_COUNTS: usize = 128;
/// Remembered endpoint changes per profile in one heartbeat.
pub const MAX_FAILOVER_LOG: usize = 16;
/// Forward results in one `Applied`.
pub const MAX_RESULTS: usize = MAX_PROFILES * MAX_FORWARDS;

/// A sequence of at most `max` elements; `what` names them in the error.
pub fn seq<'de, D, T>(d: D, max: usize, what: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(SeqVisitor {
        max,
        what,
        _t: PhantomData,
    })
}

/// A map of at most `max` entries; `what` names them in the error.
pub fn map<'de, D, K, V>(d: D, max: usize, what: &'static str) -> Result<BTreeMap<K, V>, D::Error>
where
    D: Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    d.deserialize_map(MapVisitor {
        max,
        what,
        _t: PhantomData,
    })
}

struct SeqVisitor<T> {
    max: usize,
    what: &'static str,
    _t: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for SeqVisitor<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Vec<T>, A::Error> {
        let hint = s.size_hint().unwrap_or(0);
        if hint > self.max {
            return Err(A::Error::invalid_length(hint, &self));
        }
        let mut out = Vec::with_capacity(hint);
        while let Some(x) = s.next_element()? {
            if out.len() == self.max {
                return Err(A::Error::invalid_length(self.max + 1, &self));
            }
            out.push(x);
        }
        Ok(out)
    }
}

struct MapVisitor<K, V> {
    max: usize,
    what: &'static str,
    _t: PhantomData<(K, V)>,
}

impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> Visitor<'de> for MapVisitor<K, V> {
    type Value = BTreeMap<K, V>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at most {} {}", self.max, self.what)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<BTreeMap<K, V>, A::Error> {
        let hint = m.size_hint().unwrap_or(0);
        if hint > self.max {
            return Err(A::Error::invalid_length(hint, &self));
        }
        let mut out = BTreeMap::new();
        while let Some((k, v)) = m.next_entry()? {
            if out.len() == self.max {
                return Err(A::Error::invalid_length(self.max + 1, &self));
            }
            out.insert(k, v);
        }
        Ok(out)
    }
}

/// One function per bounded field, for `#[serde(deserialize_with = "…")]`; the element type is
/// the field's (so this module names none of the types it bounds).
macro_rules! bounded {
    ($($name:ident: $max:expr, $what:literal;)*) => {$(
        #[doc = concat!("At most the bound of ", $what, ".")]
        pub fn $name<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
            seq(d, $max, $what)
        }
    )*};
}

bounded! {
    report_profiles: MAX_PROFILES, "profiles";
    set_profiles: MAX_PROFILES, "profiles";
    endpoints: MAX_ENDPOINTS, "endpoints";
    forwards: MAX_FORWARDS, "forwards";
    jumps: MAX_JUMPS, "jump hosts";
    pins: MAX_PINS, "host key fingerprints";
    forward_reports: MAX_FORWARDS, "forwards";
    health_samples: MAX_HEALTH_SAMPLES, "health results";
    error_counts: MAX_ERROR_COUNTS, "error counters";
    failover_log: MAX_FAILOVER_LOG, "failover records";
    results: MAX_RESULTS, "forward results";
}

/// Labels: at most [`MAX_LABELS`].
pub fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    map(d, MAX_LABELS, "labels")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use crate::*;

    fn heartbeat(profiles: usize, forwards: usize) -> AgentMessage {
        let report = ProfileReport {
            forwards: vec![
                ForwardReport {
                    spec: "L 1:a:2".into(),
                    state: ForwardState::Active,
                    detail: None,
                    bytes_out: 0,
                    bytes_in: 0,
                    connections_open: 0,
                };
                forwards
            ],
            ..ProfileReport::new("p", TunnelState::Up, "oma:22")
        };
        AgentMessage::Heartbeat(Heartbeat {
            seq: 1,
            sent_unix_ms: 0,
            profiles: vec![report; profiles],
        })
    }

    #[test]
    fn a_count_at_its_bound_decodes_and_one_more_is_refused_naming_it() {
        let ok = heartbeat(super::MAX_PROFILES, super::MAX_FORWARDS);
        let frame = encode(&ok).unwrap();
        assert_eq!(decode::<AgentMessage>(&frame[4..]).unwrap(), ok);
        for (msg, what) in [
            (
                heartbeat(super::MAX_PROFILES + 1, 0),
                "at most 256 profiles",
            ),
            (heartbeat(1, super::MAX_FORWARDS + 1), "at most 64 forwards"),
        ] {
            let frame = encode(&msg).unwrap();
            let e = decode::<AgentMessage>(&frame[4..]).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Bounded {
        #[serde(deserialize_with = "super::labels")]
        labels: std::collections::BTreeMap<String, String>,
        #[serde(deserialize_with = "super::results")]
        results: Vec<u8>,
    }

    fn bounded(labels: usize, results: usize) -> Bounded {
        Bounded {
            labels: (0..labels).map(|i| (format!("k{i}"), "v".into())).collect(),
            results: vec![0; results],
        }
    }

    /// Counts that come with a length (bincode): exactly the bound passes, one more is refused
    /// before a single element is read. `MAX_RESULTS` is every forward of every profile.
    #[test]
    fn a_map_or_list_at_its_bound_decodes_from_bincode() {
        assert_eq!(
            super::MAX_RESULTS,
            super::MAX_PROFILES * super::MAX_FORWARDS
        );
        let ok = bounded(super::MAX_LABELS, super::MAX_RESULTS);
        let frame = encode(&ok).unwrap();
        assert_eq!(decode::<Bounded>(&frame[4..]).unwrap(), ok);
        for (over, what) in [
            (
                bounded(super::MAX_LABELS + 1, 0),
                "invalid length 33, expected at most 32 labels",
            ),
            (
                bounded(0, super::MAX_RESULTS + 1),
                "invalid length 16385, expected at most 16384 forward results",
            ),
        ] {
            let frame = encode(&over).unwrap();
            let e = decode::<Bounded>(&frame[4..]).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
    }

    /// Counts that come without a length (JSON): the element past the bound is refused, and the
    /// error names how many there were at least.
    #[test]
    fn a_map_or_list_without_a_length_is_cut_at_its_bound() {
        let json = |labels: usize, results: usize| {
            serde_json::to_string(&bounded(labels, results)).unwrap()
        };
        serde_json::from_str::<Bounded>(&json(super::MAX_LABELS, super::MAX_RESULTS)).unwrap();
        let e = serde_json::from_str::<Bounded>(&json(super::MAX_LABELS + 1, 0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid length 33, expected at most 32 labels"),
            "{e}"
        );
        let e = serde_json::from_str::<Bounded>(&json(0, super::MAX_RESULTS + 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid length 16385, expected at most 16384 forward results"),
            "{e}"
        );
    }

    #[test]
    fn labels_and_config_lists_are_bounded_in_toml_too() {
        let mut labels = String::from("[l]\n");
        for i in 0..=super::MAX_LABELS {
            labels.push_str(&format!("k{i} = \"v\"\n"));
        }
        #[derive(Debug, serde::Deserialize)]
        struct L {
            #[serde(deserialize_with = "super::labels")]
            #[allow(dead_code)]
            l: std::collections::BTreeMap<String, String>,
        }
        let e = toml::from_str::<L>(&labels).unwrap_err().to_string();
        assert!(e.contains("at most 32 labels"), "{e}");
    }
}
