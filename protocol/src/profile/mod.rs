//! The one profile model: what a profile is, its defaults, its validation and its OMA-group
//! resolution. The agent's config file (`[[profile]]`), the coordinator's admin API and store,
//! `profiles diff` and the control link's pushes all carry this type, so a profile is checked
//! by the same rules wherever it comes from.
//!
//! # Layout
//! - this module: [`ProfileSpec`], its validation, group resolution, [`validate_set`].
//! - [`health`]: a profile's health check and its target.
//!
//! Serialization follows the format: durations are `"15s"` in TOML and JSON and exact
//! seconds/nanoseconds in bincode frames ([`crate::duration`]). No field is skipped when
//! serializing, because bincode frames are positional.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod health;

use crate::addr::{split_host_port, valid_name};
use crate::forward::{ForwardParseError, ForwardSpec, is_loopback_bind};
use crate::jump::{JumpError, JumpHost};
pub use health::{HealthSpec, HealthTarget, HealthTargetError};

/// A profile or one of its keys was refused: the key (relative to the profile, e.g.
/// `forwards[2]`, or absolute from [`validate_set`], e.g. `profile.oma.forwards[2]`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ProfileError {
    /// Dotted path of the offending key.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl ProfileError {
    fn new(key: impl Into<String>, reason: impl ToString) -> Self {
        ProfileError {
            key: key.into(),
            reason: reason.to_string(),
        }
    }

    /// The same error with `prefix.` put before its key.
    pub fn within(self, prefix: &str) -> Self {
        ProfileError {
            key: format!("{prefix}.{}", self.key),
            reason: self.reason,
        }
    }
}

/// How a profile's next endpoint waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[serde(rename_all = "snake_case")]
pub enum Standby {
    /// Connected when needed.
    #[default]
    Cold,
    /// A session held open to it, no forwards bound.
    Warm,
}

/// One SSH destination with its redundant endpoints and all its forwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    /// Unique name, used by `tunnelfleet tunnels start NAME`.
    pub name: String,
    /// Free text shown by `tunnels list`.
    #[serde(default)]
    pub description: String,
    /// Endpoints in priority order (`host:port`; port 22 when omitted): primary first.
    #[serde(default, deserialize_with = "crate::limits::endpoints")]
    pub endpoints: Vec<String>,
    /// OMA group (profiles held by the coordinator): its endpoints, active one first, are put
    /// before `endpoints` when the profile is pushed ([`ProfileSpec::resolved`]).
    #[serde(default)]
    pub group: Option<String>,
    /// Remote user name.
    pub user: String,
    /// Private key file (OpenSSH format) on the agent; refused when group or others can read it.
    /// Without one the session logs in with the agent's own key and the OpenSSH certificate
    /// the coordinator issued for it (an enrolled agent's default; a standalone agent needs a
    /// key file).
    #[serde(default)]
    pub identity_file: Option<PathBuf>,
    /// known_hosts file to verify host keys against (and to record into with TOFU).
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// Pinned host key fingerprints, `SHA256:…` as `ssh-keygen -lf` prints them: a bare one
    /// trusts that key for the profile's endpoints (never for a jump host); `host[:port]
    /// SHA256:…` for that host only (how a jump host is pinned).
    #[serde(default, deserialize_with = "crate::limits::pins")]
    pub host_key_fingerprints: Vec<String>,
    /// Record an unknown host's key into `known_hosts` on first contact. Off unless asked.
    #[serde(default)]
    pub trust_on_first_use: bool,
    /// Trust host certificates signed by the fleet's SSH host CA (an enrolled agent learns it
    /// from its coordinator): an OMA whose sshd presents one for the endpoint's name is trusted
    /// with no known_hosts line or pin, so a new appliance never trusts on first use.
    #[serde(default)]
    pub fleet_host_ca: bool,
    /// Forwards in OpenSSH syntax: `L [bind:]port:host:hostport`, `R …`, `D [bind:]port`.
    #[serde(deserialize_with = "crate::limits::forwards")]
    pub forwards: Vec<String>,
    /// TCP connect plus SSH handshake and authentication deadline.
    #[serde(default = "default_connect_timeout", with = "crate::duration")]
    pub connect_timeout: Duration,
    /// Send an SSH keepalive after this much silence (ServerAliveInterval).
    #[serde(default = "default_keepalive_interval", with = "crate::duration")]
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the session is declared dead (ServerAliveCountMax).
    #[serde(default = "default_keepalive_count")]
    pub keepalive_count: u32,
    /// Smallest reconnect delay (the backoff's base).
    #[serde(default = "default_reconnect_min", with = "crate::duration")]
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    #[serde(default = "default_reconnect_max", with = "crate::duration")]
    pub reconnect_max: Duration,
    /// Consecutive failures of the active endpoint before moving to the next one.
    #[serde(default = "default_failover_after")]
    pub failover_after: u32,
    /// How long the preferred endpoint (the first; for a group, its active one) must stay
    /// reachable before a profile that left it goes back (make-before-break).
    #[serde(default = "default_failback_after", with = "crate::duration")]
    pub failback_after: Duration,
    /// When the server refuses an `R` forward because the port is held, end this account's
    /// own stale session holding it (found through the new session) and bind again.
    #[serde(default)]
    pub reclaim_remote_ports: bool,
    /// `warm`: hold a second authenticated session open (and kept alive) to the next endpoint,
    /// with no forwards bound, so a failover is only the forward setup. `cold` (the default):
    /// connect when needed.
    #[serde(default)]
    pub standby: Standby,
    /// Start this profile when the agent starts (or when it is pushed).
    #[serde(default = "default_true")]
    pub autostart: bool,
    /// Health check run through the tunnel.
    #[serde(default)]
    pub health: Option<HealthSpec>,
    /// Jump hosts to reach the endpoints through, first to last (`ssh -J`):
    /// `["ops@bastion.example:22"]`. Their host keys are verified like the endpoints'.
    #[serde(default, deserialize_with = "crate::limits::jumps")]
    pub jump: Vec<String>,
}

impl ProfileSpec {
    /// A profile with every default (the ones a TOML file gets for keys it leaves out), no
    /// endpoints, forwards or host-key trust yet: fill those in, then validate.
    pub fn new(
        name: impl Into<String>,
        user: impl Into<String>,
        identity_file: impl Into<PathBuf>,
    ) -> ProfileSpec {
        ProfileSpec {
            name: name.into(),
            description: String::new(),
            endpoints: Vec::new(),
            group: None,
            user: user.into(),
            identity_file: Some(identity_file.into()),
            known_hosts: None,
            host_key_fingerprints: Vec::new(),
            trust_on_first_use: false,
            fleet_host_ca: false,
            forwards: Vec::new(),
            connect_timeout: default_connect_timeout(),
            keepalive_interval: default_keepalive_interval(),
            keepalive_count: default_keepalive_count(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
            failover_after: default_failover_after(),
            failback_after: default_failback_after(),
            reclaim_remote_ports: false,
            standby: Standby::Cold,
            autostart: true,
            health: None,
            jump: Vec::new(),
        }
    }

    /// The parsed forwards (valid after validation).
    pub fn forward_specs(&self) -> Result<Vec<ForwardSpec>, ForwardParseError> {
        self.forwards
            .iter()
            .map(|f| ForwardSpec::parse(f))
            .collect()
    }

    /// The parsed jump hosts, first to last (valid after validation).
    pub fn jump_hosts(&self) -> Result<Vec<JumpHost>, JumpError> {
        self.jump.iter().map(|j| JumpHost::parse(j)).collect()
    }

    /// The parsed endpoints as `(host, port)`.
    pub fn endpoint_addrs(&self) -> Result<Vec<(String, u16)>, crate::addr::AddrError> {
        self.endpoints
            .iter()
            .map(|e| split_host_port(e, Some(22)))
            .collect()
    }

    /// The profile as agents get it: the group's endpoints (as
    /// `OmaGroup::ordered` puts them: active first) before its own, each endpoint once.
    /// The one place a group is resolved, for pushes and for validating what will be pushed.
    pub fn resolved(&self, group_endpoints: &[String]) -> ProfileSpec {
        let mut p = self.clone();
        let mut endpoints = group_endpoints.to_vec();
        for e in p.endpoints.drain(..) {
            if !endpoints.contains(&e) {
                endpoints.push(e);
            }
        }
        // The group's endpoints first; what does not fit the bound is the lowest priority.
        endpoints.truncate(crate::limits::MAX_ENDPOINTS);
        p.endpoints = endpoints;
        p
    }

    /// Validates a profile an agent is to run: [`ProfileSpec::validate`], and its endpoints
    /// are listed (a group profile is only runnable once [`ProfileSpec::resolved`]).
    pub fn validate_runnable(&self) -> Result<(), ProfileError> {
        self.validate()?;
        if self.endpoints.is_empty() {
            return Err(ProfileError::new(
                "endpoints",
                "the pushed profile has no endpoints (is its OMA group empty?)",
            ));
        }
        Ok(())
    }

    /// Checks everything serde cannot; the error's key is relative to the profile.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let err = |k: &str, r: String| Err(ProfileError::new(k, r));
        use crate::limits::{MAX_ENDPOINTS, MAX_FORWARDS, MAX_JUMPS, MAX_PINS};
        for (key, n, max) in [
            ("endpoints", self.endpoints.len(), MAX_ENDPOINTS),
            ("forwards", self.forwards.len(), MAX_FORWARDS),
            ("jump", self.jump.len(), MAX_JUMPS),
            (
                "host_key_fingerprints",
                self.host_key_fingerprints.len(),
                MAX_PINS,
            ),
        ] {
            if n > max {
                return err(key, format!("{n} given; at most {max}"));
            }
        }
        if !valid_name(&self.name) {
            return err(
                "name",
                format!(
                    "{:?} is not a valid name (letters, digits, '-', '_', '.')",
                    self.name
                ),
            );
        }
        if self.endpoints.is_empty() && self.group.is_none() {
            return err(
                "endpoints",
                "at least one host:port is required (or a group, for a profile held by the coordinator)".into(),
            );
        }
        if let Some(g) = &self.group
            && !valid_name(g)
        {
            return err("group", format!("{g:?} is not a valid group name"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Err(r) = split_host_port(e, Some(22)) {
                return err(&format!("endpoints[{i}]"), r.to_string());
            }
        }
        for (i, j) in self.jump.iter().enumerate() {
            if let Err(r) = JumpHost::parse(j) {
                return err(&format!("jump[{i}]"), r.to_string());
            }
        }
        if self.user.is_empty() {
            return err("user", "must not be empty".into());
        }
        if self.forwards.is_empty() {
            return err("forwards", "a profile needs at least one forward".into());
        }
        let mut seen = HashSet::new();
        for (i, f) in self.forwards.iter().enumerate() {
            let spec = match ForwardSpec::parse(f) {
                Ok(s) => s,
                Err(e) => return err(&format!("forwards[{i}]"), e.to_string()),
            };
            if let ForwardSpec::Remote { port: rp, .. } = &spec
                && !seen.insert(*rp)
                && *rp != 0
            {
                return err(
                    &format!("forwards[{i}]"),
                    format!("remote port {rp} is forwarded twice"),
                );
            }
        }
        for (i, fp) in self.host_key_fingerprints.iter().enumerate() {
            if let Err(r) = crate::fingerprint::parse_pin(fp) {
                return err(&format!("host_key_fingerprints[{i}]"), r.to_string());
            }
        }
        if self.known_hosts.is_none()
            && self.host_key_fingerprints.is_empty()
            && !self.fleet_host_ca
        {
            return err(
                "known_hosts",
                "no host-key trust configured: set known_hosts = \"/path\", host_key_fingerprints = [\"SHA256:…\"] and/or fleet_host_ca = true (host keys are always verified)".into(),
            );
        }
        if self.trust_on_first_use && self.known_hosts.is_none() {
            return err(
                "trust_on_first_use",
                "needs known_hosts: the first key seen is recorded there".into(),
            );
        }
        if self.connect_timeout.is_zero() {
            return err("connect_timeout", "must be more than 0".into());
        }
        if self.keepalive_interval.is_zero() {
            return err("keepalive_interval", "must be more than 0".into());
        }
        if self.keepalive_count == 0 {
            return err("keepalive_count", "must be at least 1".into());
        }
        if self.reconnect_min.is_zero() {
            return err("reconnect_min", "must be more than 0".into());
        }
        if self.reconnect_max < self.reconnect_min {
            return err(
                "reconnect_max",
                format!(
                    "{} is less than reconnect_min {}",
                    humantime::format_duration(self.reconnect_max),
                    humantime::format_duration(self.reconnect_min)
                ),
            );
        }
        if self.failover_after == 0 {
            return err("failover_after", "must be at least 1".into());
        }
        if self.failback_after.is_zero() {
            return err("failback_after", "must be more than 0".into());
        }
        if let Some(h) = &self.health {
            if let Err(r) = h.target() {
                return err("health", r.to_string());
            }
            if h.threshold == 0 {
                return err("health.threshold", "must be at least 1".into());
            }
            if h.interval.is_zero() {
                return err("health.interval", "must be more than 0".into());
            }
            if h.timeout.is_zero() {
                return err("health.timeout", "must be more than 0".into());
            }
        }
        Ok(())
    }

    /// Forwards that listen beyond loopback (reported at start; the operator asked for them).
    pub fn exposed_forwards(&self) -> Vec<String> {
        self.forward_specs()
            .unwrap_or_default()
            .iter()
            .filter_map(|f| match f.local_listen() {
                Some((bind, _)) if !is_loopback_bind(bind) => Some(f.to_string()),
                _ => None,
            })
            .collect()
    }
}

/// Validates every profile of one agent's set, and what only the set can tell: names are
/// unique and no two forwards listen on one local port. Keys are absolute
/// (`profile.NAME.forwards[1]`, `profile[0].name` for an unnamed one).
pub fn validate_set(profiles: &[ProfileSpec]) -> Result<(), ProfileError> {
    let mut names = HashSet::new();
    let mut listens: BTreeMap<u16, String> = BTreeMap::new();
    for (i, p) in profiles.iter().enumerate() {
        let key = if p.name.is_empty() {
            format!("profile[{i}]")
        } else {
            format!("profile.{}", p.name)
        };
        p.validate().map_err(|e| e.within(&key))?;
        if !names.insert(p.name.as_str()) {
            return Err(ProfileError::new(
                format!("{key}.name"),
                format!("profile name {:?} is used twice", p.name),
            ));
        }
        for (j, f) in p.forwards.iter().enumerate() {
            // validate() parsed every forward already.
            let Ok(spec) = ForwardSpec::parse(f) else {
                continue;
            };
            if let Some((_, port)) = spec.local_listen() {
                let here = format!("{key}.forwards[{j}]");
                if let Some(other) = listens.insert(port, here.clone()) {
                    return Err(ProfileError::new(
                        here,
                        format!("local port {port} is already used by {other}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_keepalive_count() -> u32 {
    3
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}
fn default_failover_after() -> u32 {
    3
}
fn default_failback_after() -> Duration {
    Duration::from_secs(30)
}
fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests;
