//! The agent's configuration file: parsed, validated whole, or refused whole. What a profile
//! is and how it is checked lives in [`tunnelfleet_protocol::profile`]; this module holds the
//! file around the profiles (`[agent]`, `[coordinator]`).
//!
//! A config is either entirely valid or the agent does not start: a half-applied config is how
//! a fleet ends up with tunnels nobody asked for. Every error names the file, the key and the
//! reason, so an operator can fix it without reading source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::ProfileSpec;
use tunnelfleet_protocol::addr::{check_name, split_host_port};
use tunnelfleet_protocol::fingerprint::parse_ca_fingerprint;
use tunnelfleet_protocol::profile::validate_set;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The config file.
        file: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The TOML did not parse or a key had the wrong type or was unknown.
    #[error("{file}: {message}")]
    Syntax {
        /// The config file.
        file: PathBuf,
        /// The parser's message (it names the key and line).
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The config file.
        file: PathBuf,
        /// Dotted path of the offending key, e.g. `profile.oma.forwards[2]`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Agent-wide settings.
    #[serde(default)]
    pub agent: AgentSection,
    /// Tunnel profiles, one SSH session each (at most
    /// [`tunnelfleet_protocol::limits::MAX_PROFILES`]: every one is in each heartbeat).
    #[serde(
        default,
        rename = "profile",
        deserialize_with = "tunnelfleet_protocol::limits::set_profiles"
    )]
    pub profiles: Vec<ProfileSpec>,
    /// The coordinator to report to and take profiles from (standalone when absent).
    #[serde(default)]
    pub coordinator: Option<CoordinatorSection>,
}

/// How to reach the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// `host:port` of its QUIC control link, or a list of them for several coordinators
    /// (a DNS name stands for every address it resolves to).
    pub address: Addresses,
    /// TLS name in its certificate (default: the host part of each address).
    #[serde(default)]
    pub server_name: Option<String>,
    /// This agent's id (must match its certificate).
    pub agent_id: String,
    /// Labels for assignment, e.g. `{ site = "dc1" }` (at most
    /// [`tunnelfleet_protocol::limits::MAX_LABELS`]).
    #[serde(default, deserialize_with = "tunnelfleet_protocol::limits::labels")]
    pub labels: BTreeMap<String, String>,
    /// The fleet CA certificate.
    pub ca: PathBuf,
    /// This agent's certificate.
    pub cert: PathBuf,
    /// This agent's private key (refused when group or others can read it).
    pub key: PathBuf,
    /// Where the last applied profile set is cached, to run before (or without) the coordinator.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Reconnect backoff floor.
    #[serde(default = "default_link_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Reconnect backoff cap.
    #[serde(default = "default_link_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// A join token (file, 0600) to enroll with when `cert` or `key` does not exist yet:
    /// the agent creates its key, the coordinator signs it, and `cert`, `key` and `ca` are
    /// written. Needs `ca_fingerprint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_token_file: Option<PathBuf>,
    /// `SHA256:…` of the fleet CA certificate (`tunnelfleet pki init` prints it): the only
    /// thing an enrolling agent trusts the coordinator by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/tunnelfleet")
}
fn default_link_min() -> Duration {
    Duration::from_secs(1)
}
fn default_link_max() -> Duration {
    Duration::from_secs(60)
}

/// Settings of the agent process itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Unix socket the `tunnelfleet tunnels` commands talk to (created mode 0600).
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// How long open connections may drain at shutdown or on `stop`.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Where to serve Prometheus `/metrics` (e.g. `127.0.0.1:9465`); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Each SSH session renews its keys after this many bytes either way (OpenSSH's
    /// `RekeyLimit`; default and most 1 GiB, at least 1 MiB).
    #[serde(default = "default_rekey_bytes")]
    pub rekey_after_bytes: u64,
    /// ... and after this long (default 1 h, at least 1 s).
    #[serde(default = "default_rekey_after", with = "humantime_serde")]
    pub rekey_after: Duration,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            control_socket: default_control_socket(),
            drain_timeout: default_drain(),
            metrics_listen: None,
            rekey_after_bytes: default_rekey_bytes(),
            rekey_after: default_rekey_after(),
        }
    }
}

impl AgentConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::parse_for_coordinator(text, file)?;
        if let Some(p) = cfg.profiles.iter().find(|p| p.endpoints.is_empty()) {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                key: format!("profile.{}.endpoints", p.name),
                reason: format!(
                    "a local profile lists its endpoints; group {:?} is resolved by the coordinator (apply the file with `tunnelfleet profiles apply`)",
                    p.group.as_deref().unwrap_or_default()
                ),
            });
        }
        Ok(cfg)
    }

    /// Reads profiles to hand to the coordinator (`tunnelfleet profiles apply -f`): validated
    /// like a local config, except that a profile may name an OMA group instead of endpoints.
    pub fn load_for_coordinator(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        Self::parse_for_coordinator(&text, path)
    }

    /// Parses and validates text that may hold group profiles; `file` names it in errors.
    fn parse_for_coordinator(text: &str, file: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Checks everything that serde cannot: names, forwards, endpoints, trust, files.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            reason,
        };
        if !(1 << 20..=1 << 30).contains(&self.agent.rekey_after_bytes) {
            return Err(invalid(
                "agent.rekey_after_bytes".into(),
                format!(
                    "{} is outside 1 MiB (1048576) to 1 GiB (1073741824): more would risk nonce reuse",
                    self.agent.rekey_after_bytes
                ),
            ));
        }
        if self.agent.rekey_after < Duration::from_secs(1) {
            return Err(invalid(
                "agent.rekey_after".into(),
                "must be at least 1s".into(),
            ));
        }
        if self.coordinator.is_none()
            && let Some(p) = self.profiles.iter().find(|p| p.identity_file.is_none())
        {
            return Err(invalid(
                format!("profile.{}.identity_file", p.name),
                "required for a standalone agent: without one a profile logs in with the certificate a coordinator issues for the agent's own key, and this agent has no [coordinator]".into(),
            ));
        }
        if self.coordinator.is_none()
            && let Some(p) = self.profiles.iter().find(|p| p.fleet_host_ca)
        {
            return Err(invalid(
                format!("profile.{}.fleet_host_ca", p.name),
                "needs a [coordinator]: the agent learns the fleet's SSH host CA from it; a standalone agent names known_hosts or host_key_fingerprints".into(),
            ));
        }
        if let Some(c) = &self.coordinator {
            if c.address.list().is_empty() {
                return Err(invalid(
                    "coordinator.address".into(),
                    "names no coordinator".into(),
                ));
            }
            for (i, a) in c.address.list().iter().enumerate() {
                if let Err(r) = split_host_port(a, None) {
                    let key = if c.address.list().len() == 1 {
                        "coordinator.address".to_string()
                    } else {
                        format!("coordinator.address[{i}]")
                    };
                    return Err(invalid(key, r.to_string()));
                }
            }
            if let Err(r) = check_name(&c.agent_id) {
                return Err(invalid("coordinator.agent_id".into(), r.to_string()));
            }
            if let Some(f) = &c.ca_fingerprint
                && let Err(r) = parse_ca_fingerprint(f)
            {
                return Err(invalid("coordinator.ca_fingerprint".into(), r.to_string()));
            }
            if c.enroll_token_file.is_some() && c.ca_fingerprint.is_none() {
                return Err(invalid(
                    "coordinator.ca_fingerprint".into(),
                    "required with enroll_token_file: it is how the agent knows its coordinator (tunnelfleet pki init printed it)".into(),
                ));
            }
            if c.reconnect_min.is_zero() || c.reconnect_max < c.reconnect_min {
                return Err(invalid(
                    "coordinator.reconnect_max".into(),
                    "must be at least reconnect_min, which must be more than 0".into(),
                ));
            }
        }
        validate_set(&self.profiles).map_err(|e| invalid(e.key, e.reason))
    }
}

/// The most coordinator addresses a config may list.
pub const MAX_COORDINATORS: usize = 16;

/// `address = "c1:4433"` or `address = ["c1:4433", "c2:4433"]` (at most [`MAX_COORDINATORS`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(Vec<String>);

impl Addresses {
    /// The configured addresses, in order.
    pub fn list(&self) -> &[String] {
        &self.0
    }
}

impl From<&str> for Addresses {
    fn from(a: &str) -> Self {
        Addresses(vec![a.to_string()])
    }
}

impl std::fmt::Display for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl Serialize for Addresses {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Addresses;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "a `host:port` string or a list of at most {MAX_COORDINATORS} of them"
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Addresses, E> {
                Ok(Addresses(vec![v.to_string()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Addresses, A::Error> {
                let mut out = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    if out.len() == MAX_COORDINATORS {
                        return Err(serde::de::Error::invalid_length(
                            MAX_COORDINATORS + 1,
                            &self,
                        ));
                    }
                    out.push(a);
                }
                Ok(Addresses(out))
            }
        }
        d.deserialize_any(V)
    }
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/tunnelfleet/agent.sock")
}
fn default_rekey_bytes() -> u64 {
    1 << 30
}

fn default_rekey_after() -> Duration {
    Duration::from_secs(3600)
}

fn default_drain() -> Duration {
    Duration::from_secs(5)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use tunnelfleet_protocol::profile::HealthTarget;

    const SEED: &str = r#"
[agent]
control_socket = "/tmp/tf.sock"

[[profile]]
name = "oma"
endpoints = ["10.245.246.125:443", "10.245.246.126:443"]
user = "vma"
identity_file = "/home/vma/.ssh/cloudstack_key"
known_hosts = "/etc/tunnelfleet/known_hosts"
forwards = ["L 8082:localhost:8082", "L 10809:localhost:10809", "L 10808:localhost:10809", "R 9081:localhost:8081"]
[profile.health]
http = "http://localhost:8082/health"
interval = "60s"
"#;

    #[test]
    fn parses_the_seed_profile() {
        let cfg = AgentConfig::parse(SEED, Path::new("agent.toml")).unwrap();
        let p = &cfg.profiles[0];
        assert_eq!(p.forward_specs().unwrap().len(), 4);
        assert_eq!(
            p.endpoint_addrs().unwrap()[1],
            ("10.245.246.126".into(), 443)
        );
        let h = p.health.as_ref().unwrap();
        assert_eq!(h.threshold, 3);
        assert_eq!(h.interval, Duration::from_secs(60));
        assert_eq!(
            h.target().unwrap(),
            HealthTarget::Http {
                host: "localhost".into(),
                port: 8082,
                path: "/health".into()
            }
        );
    }

    #[test]
    fn more_profiles_or_forwards_than_a_heartbeat_carries_are_refused_naming_them() {
        let one = |i: usize, forwards: usize| {
            let f: Vec<String> = (0..forwards)
                .map(|n| format!("\"L {}:localhost:22\"", 10000 + i * 100 + n))
                .collect();
            format!(
                "[[profile]]\nname = \"p{i}\"\nendpoints = [\"oma:22\"]\nuser = \"u\"\nidentity_file = \"/k\"\nknown_hosts = \"/kh\"\nforwards = [{}]\n",
                f.join(", ")
            )
        };
        let many: String = (0..=tunnelfleet_protocol::limits::MAX_PROFILES)
            .map(|i| one(i, 1))
            .collect();
        let e = AgentConfig::parse(&many, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent.toml") && e.contains("at most 256 profiles"),
            "{e}"
        );
        let wide = one(0, tunnelfleet_protocol::limits::MAX_FORWARDS + 1);
        let e = AgentConfig::parse(&wide, Path::new("agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("forwards") && e.contains("at most 64 forwards"),
            "{e}"
        );
    }
}
