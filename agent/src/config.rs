//! The agent's configuration file: parsed, validated whole, or refused whole.
//!
//! A config is either entirely valid or the agent does not start: a half-applied config is how
//! a fleet ends up with tunnels nobody asked for. Every error names the file, the key and the
//! reason, so an operator can fix it without reading source.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::forward::{ForwardSpec, is_loopback_bind};

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
    /// Tunnel profiles, one SSH session each.
    #[serde(default, rename = "profile")]
    pub profiles: Vec<ProfileConfig>,
    /// The coordinator to report to and take profiles from (standalone when absent).
    #[serde(default)]
    pub coordinator: Option<CoordinatorSection>,
}

/// How to reach the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// `host:port` of its QUIC control link.
    pub address: String,
    /// TLS name in its certificate (default: the host part of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// This agent's id (must match its certificate).
    pub agent_id: String,
    /// Labels for assignment, e.g. `{ site = "dc1" }`.
    #[serde(default)]
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
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            control_socket: default_control_socket(),
            drain_timeout: default_drain(),
            metrics_listen: None,
        }
    }
}

/// One SSH destination with its redundant endpoints and all its forwards.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    /// Unique name, used by `tunnelfleet tunnels start NAME`.
    pub name: String,
    /// Free text shown by `tunnels list`.
    #[serde(default)]
    pub description: String,
    /// Endpoints in priority order (`host:port`; port 22 when omitted): primary first.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// OMA group (profiles held by the coordinator): its endpoints, active one first, are put
    /// before `endpoints` when the profile is pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Remote user name.
    pub user: String,
    /// Private key file (OpenSSH format); refused when group or others can read it.
    pub identity_file: PathBuf,
    /// known_hosts file to verify host keys against (and to record into with TOFU).
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// Pinned host key fingerprints, `SHA256:…` as `ssh-keygen -lf` prints them.
    #[serde(default)]
    pub host_key_fingerprints: Vec<String>,
    /// Record an unknown host's key into `known_hosts` on first contact. Off unless asked.
    #[serde(default)]
    pub trust_on_first_use: bool,
    /// Forwards in OpenSSH syntax: `L [bind:]port:host:hostport`, `R …`, `D [bind:]port`.
    pub forwards: Vec<String>,
    /// TCP connect plus SSH handshake and authentication deadline.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Send an SSH keepalive after this much silence (ServerAliveInterval).
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// Unanswered keepalives before the session is declared dead (ServerAliveCountMax).
    #[serde(default = "default_keepalive_count")]
    pub keepalive_count: u32,
    /// Smallest reconnect delay (the backoff's base).
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Consecutive failures of the active endpoint before moving to the next one.
    #[serde(default = "default_failover_after")]
    pub failover_after: u32,
    /// Start this profile when the agent starts.
    #[serde(default = "default_true")]
    pub autostart: bool,
    /// Health check run through the tunnel.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Jump hosts to reach the endpoints through, first to last (`ssh -J`):
    /// `["ops@bastion.example:22"]`. Their host keys are verified like the endpoints'.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jump: Vec<String>,
}

/// A health check of a profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `http://host:port/path` fetched with GET (2xx passes), usually through an L forward.
    #[serde(default)]
    pub http: Option<String>,
    /// `host:port` that must accept a TCP connection.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Time between checks.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Deadline of one check.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures that mark the profile down and restart its session.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
}

/// What a health check does, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthTarget {
    /// HTTP GET; 2xx passes.
    Http {
        /// Host to connect to.
        host: String,
        /// Port to connect to.
        port: u16,
        /// Path and query to request.
        path: String,
    },
    /// TCP connect.
    Tcp {
        /// Host to connect to.
        host: String,
        /// Port to connect to.
        port: u16,
    },
}

impl HealthConfig {
    /// The target; valid after [`AgentConfig::validate`].
    pub fn target(&self) -> Result<HealthTarget, String> {
        match (&self.http, &self.tcp) {
            (Some(url), None) => parse_http_url(url),
            (None, Some(addr)) => {
                let (host, port) = split_host_port(addr, None)?;
                Ok(HealthTarget::Tcp { host, port })
            }
            (Some(_), Some(_)) => Err("set either http or tcp, not both".into()),
            (None, None) => Err("set http = \"http://…\" or tcp = \"host:port\"".into()),
        }
    }
}

impl HealthTarget {
    /// Human description for logs and status.
    pub fn describe(&self) -> String {
        match self {
            HealthTarget::Http { host, port, path } => format!("GET http://{host}:{port}{path}"),
            HealthTarget::Tcp { host, port } => format!("TCP {host}:{port}"),
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
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        cfg.validate(file)?;
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
        let cfg: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
            file: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks everything that serde cannot: names, forwards, endpoints, trust, files.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            reason,
        };
        if let Some(c) = &self.coordinator {
            if let Err(r) = split_host_port(&c.address, None) {
                return Err(invalid("coordinator.address".into(), r));
            }
            let id_ok = !c.agent_id.is_empty()
                && c.agent_id.len() <= 64
                && c.agent_id
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
            if !id_ok {
                return Err(invalid(
                    "coordinator.agent_id".into(),
                    format!(
                        "{:?}: use 1-64 letters, digits, '.', '_' or '-'",
                        c.agent_id
                    ),
                ));
            }
            if let Some(f) = &c.ca_fingerprint
                && let Err(r) = crate::enroll::parse_fingerprint(f)
            {
                return Err(invalid("coordinator.ca_fingerprint".into(), r));
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
        let mut names = HashSet::new();
        let mut listens: BTreeMap<u16, String> = BTreeMap::new();
        for (i, p) in self.profiles.iter().enumerate() {
            let key = if p.name.is_empty() {
                format!("profile[{i}]")
            } else {
                format!("profile.{}", p.name)
            };
            p.validate_fields()
                .map_err(|(k, reason)| invalid(format!("{key}.{k}"), reason))?;
            if !names.insert(p.name.clone()) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("profile name {:?} is used twice", p.name),
                ));
            }
            for (j, f) in p.forwards.iter().enumerate() {
                // Safe: validate_fields parsed every forward already.
                let Ok(spec) = ForwardSpec::parse(f) else {
                    continue;
                };
                if let Some((_, port)) = spec.local_listen() {
                    let here = format!("{key}.forwards[{j}]");
                    if let Some(other) = listens.insert(port, here.clone()) {
                        return Err(invalid(
                            here,
                            format!("local port {port} is already used by {other}"),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

impl ProfileConfig {
    /// The parsed forwards (valid after validation).
    pub fn forward_specs(&self) -> Result<Vec<ForwardSpec>, crate::forward::ForwardParseError> {
        self.forwards
            .iter()
            .map(|f| ForwardSpec::parse(f))
            .collect()
    }

    /// The parsed jump hosts, first to last (valid after validation).
    pub fn jump_hosts(&self) -> Result<Vec<crate::jump::JumpHost>, String> {
        self.jump
            .iter()
            .map(|j| crate::jump::JumpHost::parse(j))
            .collect()
    }

    /// The parsed endpoints as `(host, port)`.
    pub fn endpoint_addrs(&self) -> Result<Vec<(String, u16)>, String> {
        self.endpoints
            .iter()
            .map(|e| split_host_port(e, Some(22)))
            .collect()
    }

    /// Validates one profile; on error returns (key relative to the profile, reason).
    pub fn validate_fields(&self) -> Result<(), (String, String)> {
        let err = |k: &str, r: String| Err((k.to_string(), r));
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
                return err(&format!("endpoints[{i}]"), r);
            }
        }
        for (i, j) in self.jump.iter().enumerate() {
            if let Err(r) = crate::jump::JumpHost::parse(j) {
                return err(&format!("jump[{i}]"), r);
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
                && !seen.insert(('R', *rp))
                && *rp != 0
            {
                return err(
                    &format!("forwards[{i}]"),
                    format!("remote port {rp} is forwarded twice"),
                );
            }
        }
        for (i, fp) in self.host_key_fingerprints.iter().enumerate() {
            if let Err(r) = crate::hostkey::parse_fingerprint(fp) {
                return err(&format!("host_key_fingerprints[{i}]"), r);
            }
        }
        if self.known_hosts.is_none() && self.host_key_fingerprints.is_empty() {
            return err(
                "known_hosts",
                "no host-key trust configured: set known_hosts = \"/path\" and/or host_key_fingerprints = [\"SHA256:…\"] (host keys are always verified)".into(),
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
        if let Some(h) = &self.health {
            if let Err(r) = h.target() {
                return err("health", r);
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

/// Splits `host:port`, `[v6]:port` or (with a default) a bare host.
pub fn split_host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty address".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err(format!("{s:?}: unclosed '['"));
        };
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(format!("{s:?}: expected [host]:port")),
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').unwrap_or((s, ""));
        (h, Some(p))
    } else if s.contains(':') {
        return Err(format!("{s:?}: write IPv6 addresses as [addr]:port"));
    } else {
        (s, None)
    };
    if host.is_empty() {
        return Err(format!("{s:?}: the host is empty"));
    }
    let port = match (port, default_port) {
        (Some(p), _) => match p.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(format!("{s:?}: {p:?} is not a port (1-65535)")),
        },
        (None, Some(d)) => d,
        (None, None) => return Err(format!("{s:?}: expected host:port")),
    };
    Ok((host.to_string(), port))
}

fn parse_http_url(url: &str) -> Result<HealthTarget, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "{url:?}: scheme {other:?} is not supported; the check runs through the tunnel, use http://"
            ));
        }
        None => return Err(format!("{url:?}: expected http://host:port/path")),
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("{url:?}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    Ok(HealthTarget::Http { host, port, path })
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/tunnelfleet/agent.sock")
}
fn default_drain() -> Duration {
    Duration::from_secs(5)
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
fn default_true() -> bool {
    true
}
fn default_health_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_threshold() -> u32 {
    3
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn host_port_forms() {
        assert_eq!(split_host_port("a:1", None).unwrap(), ("a".into(), 1));
        assert_eq!(split_host_port("a", Some(22)).unwrap(), ("a".into(), 22));
        assert_eq!(split_host_port("[::1]:2", None).unwrap(), ("::1".into(), 2));
        assert!(split_host_port("::1:2", None).is_err());
        assert!(split_host_port("a:0", None).is_err());
        assert!(split_host_port("a", None).is_err());
    }
}

/// Names of profiles and groups: 1-64 letters, digits, '-', '_', '.'.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Pushed profiles travel as [`tunnelfleet_protocol::ProfileSpec`]; these conversions keep the
/// wire model and the local model the same thing, so a pushed profile is validated exactly as a
/// local one.
impl From<&ProfileConfig> for tunnelfleet_protocol::ProfileSpec {
    fn from(p: &ProfileConfig) -> Self {
        let ms = |d: Duration| d.as_millis() as u64;
        tunnelfleet_protocol::ProfileSpec {
            name: p.name.clone(),
            group: p.group.clone(),
            description: p.description.clone(),
            endpoints: p.endpoints.clone(),
            user: p.user.clone(),
            identity_file: p.identity_file.display().to_string(),
            known_hosts: p.known_hosts.as_ref().map(|k| k.display().to_string()),
            host_key_fingerprints: p.host_key_fingerprints.clone(),
            trust_on_first_use: p.trust_on_first_use,
            forwards: p.forwards.clone(),
            connect_timeout_ms: ms(p.connect_timeout),
            keepalive_interval_ms: ms(p.keepalive_interval),
            keepalive_count: p.keepalive_count,
            reconnect_min_ms: ms(p.reconnect_min),
            reconnect_max_ms: ms(p.reconnect_max),
            failover_after: p.failover_after,
            health: p.health.as_ref().map(|h| tunnelfleet_protocol::HealthSpec {
                http: h.http.clone(),
                tcp: h.tcp.clone(),
                interval_ms: ms(h.interval),
                timeout_ms: ms(h.timeout),
                threshold: h.threshold,
            }),
            jump: p.jump.clone(),
        }
    }
}

impl ProfileConfig {
    /// A pushed profile as a local one, validated; the error names the key and the reason.
    pub fn from_spec(s: &tunnelfleet_protocol::ProfileSpec) -> Result<Self, (String, String)> {
        let ms = Duration::from_millis;
        let p = ProfileConfig {
            name: s.name.clone(),
            // Resolved by the coordinator into `endpoints`: the agent runs endpoints only.
            group: None,
            description: s.description.clone(),
            endpoints: s.endpoints.clone(),
            user: s.user.clone(),
            identity_file: PathBuf::from(&s.identity_file),
            known_hosts: s.known_hosts.as_ref().map(PathBuf::from),
            host_key_fingerprints: s.host_key_fingerprints.clone(),
            trust_on_first_use: s.trust_on_first_use,
            forwards: s.forwards.clone(),
            connect_timeout: ms(s.connect_timeout_ms),
            keepalive_interval: ms(s.keepalive_interval_ms),
            keepalive_count: s.keepalive_count,
            reconnect_min: ms(s.reconnect_min_ms),
            reconnect_max: ms(s.reconnect_max_ms),
            failover_after: s.failover_after,
            autostart: true,
            health: s.health.as_ref().map(|h| HealthConfig {
                http: h.http.clone(),
                tcp: h.tcp.clone(),
                interval: ms(h.interval_ms),
                timeout: ms(h.timeout_ms),
                threshold: h.threshold,
            }),
            jump: s.jump.clone(),
        };
        if p.endpoints.is_empty() {
            return Err((
                format!("profile.{}.endpoints", p.name),
                "the pushed profile has no endpoints (is its OMA group empty?)".into(),
            ));
        }
        p.validate_fields()?;
        Ok(p)
    }
}

#[cfg(test)]
mod spec_tests {
    use super::*;

    #[test]
    fn a_profile_survives_the_wire_and_bad_pushes_are_refused_with_the_key() {
        let cfg = AgentConfig::parse(
            r#"[[profile]]
name = "oma"
endpoints = ["oma-a:443", "oma-b:443"]
user = "vma"
identity_file = "/k"
known_hosts = "/kh"
forwards = ["L 8082:localhost:8082", "R 9081:localhost:8081"]
jump = ["ops@bastion:2222"]
[profile.health]
http = "http://localhost:8082/health"
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        let p = &cfg.profiles[0];
        let spec = tunnelfleet_protocol::ProfileSpec::from(p);
        let back = ProfileConfig::from_spec(&spec).unwrap();
        assert_eq!(&back, p);
        let mut bad = spec.clone();
        bad.forwards.push("L nope".into());
        let (key, reason) = ProfileConfig::from_spec(&bad).unwrap_err();
        assert_eq!(key, "forwards[2]");
        assert!(reason.contains("L nope"), "{reason}");
        bad = spec;
        bad.host_key_fingerprints.clear();
        bad.known_hosts = None;
        assert_eq!(ProfileConfig::from_spec(&bad).unwrap_err().0, "known_hosts");
    }
}
