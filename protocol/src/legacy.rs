//! Profiles as protocol 3 and earlier wrote them to disk (the coordinator's store, the agent's
//! profile cache): durations as integer `*_ms` fields. Read once at upgrade and converted to
//! [`ProfileSpec`]; nothing writes this form any more.

use std::time::Duration;

use serde::Deserialize;

use crate::profile::{HealthSpec, ProfileSpec};

/// A profile as protocol 3 stored it.
#[derive(Debug, Clone, Deserialize)]
pub struct ProfileSpecV3 {
    name: String,
    #[serde(default)]
    group: Option<String>,
    description: String,
    endpoints: Vec<String>,
    user: String,
    identity_file: String,
    known_hosts: Option<String>,
    host_key_fingerprints: Vec<String>,
    trust_on_first_use: bool,
    forwards: Vec<String>,
    connect_timeout_ms: u64,
    keepalive_interval_ms: u64,
    keepalive_count: u32,
    reconnect_min_ms: u64,
    reconnect_max_ms: u64,
    failover_after: u32,
    health: Option<HealthSpecV3>,
    #[serde(default)]
    jump: Vec<String>,
}

/// A health check as protocol 3 stored it.
#[derive(Debug, Clone, Deserialize)]
struct HealthSpecV3 {
    http: Option<String>,
    tcp: Option<String>,
    interval_ms: u64,
    timeout_ms: u64,
    threshold: u32,
}

impl From<ProfileSpecV3> for ProfileSpec {
    fn from(s: ProfileSpecV3) -> Self {
        let ms = Duration::from_millis;
        ProfileSpec {
            name: s.name,
            description: s.description,
            endpoints: s.endpoints,
            group: s.group,
            user: s.user,
            identity_file: Some(s.identity_file.into()),
            known_hosts: s.known_hosts.map(Into::into),
            host_key_fingerprints: s.host_key_fingerprints,
            trust_on_first_use: s.trust_on_first_use,
            forwards: s.forwards,
            connect_timeout: ms(s.connect_timeout_ms),
            keepalive_interval: ms(s.keepalive_interval_ms),
            keepalive_count: s.keepalive_count,
            reconnect_min: ms(s.reconnect_min_ms),
            reconnect_max: ms(s.reconnect_max_ms),
            failover_after: s.failover_after,
            // Protocol 3 had no such field: every pushed profile started.
            autostart: true,
            health: s.health.map(|h| HealthSpec {
                http: h.http,
                tcp: h.tcp,
                interval: ms(h.interval_ms),
                timeout: ms(h.timeout_ms),
                threshold: h.threshold,
            }),
            jump: s.jump,
            // Fields protocol 3 did not have take today's defaults.
            failback_after: ProfileSpec::new("", "", "").failback_after,
            reclaim_remote_ports: false,
            standby: Default::default(),
            fleet_host_ca: false,
        }
    }
}

/// A profile set as a protocol-3 agent cached it.
#[derive(Debug, Clone, Deserialize)]
pub struct ProfileSetV3 {
    version: u64,
    profiles: Vec<ProfileSpecV3>,
}

impl From<ProfileSetV3> for crate::ProfileSet {
    fn from(s: ProfileSetV3) -> Self {
        crate::ProfileSet {
            version: s.version,
            profiles: s.profiles.into_iter().map(Into::into).collect(),
        }
    }
}

/// Reads a profile stored as JSON in either form, the current one first.
pub fn profile_from_json(bytes: &[u8]) -> Result<ProfileSpec, serde_json::Error> {
    serde_json::from_slice::<ProfileSpec>(bytes).or_else(|e| {
        serde_json::from_slice::<ProfileSpecV3>(bytes)
            .map(Into::into)
            .map_err(|_| e)
    })
}

/// Reads a cached profile set as JSON in either form, the current one first.
pub fn profile_set_from_json(bytes: &[u8]) -> Result<crate::ProfileSet, serde_json::Error> {
    serde_json::from_slice::<crate::ProfileSet>(bytes).or_else(|e| {
        serde_json::from_slice::<ProfileSetV3>(bytes)
            .map(Into::into)
            .map_err(|_| e)
    })
}
