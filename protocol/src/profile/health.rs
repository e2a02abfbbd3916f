//! A profile's health check: HTTP GET or TCP connect through the tunnel, its interval, deadline
//! and threshold, and the target it resolves to once validated.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::addr::split_host_port;

/// A health check of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// `http://host:port/path` fetched with GET (2xx passes), usually through an L forward.
    #[serde(default)]
    pub http: Option<String>,
    /// `host:port` that must accept a TCP connection.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Time between checks.
    #[serde(default = "default_health_interval", with = "crate::duration")]
    pub interval: Duration,
    /// Deadline of one check.
    #[serde(default = "default_health_timeout", with = "crate::duration")]
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

/// Why a health check's target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthTargetError {
    /// Both kinds set.
    #[error("set either http or tcp, not both")]
    Both,
    /// Neither kind set.
    #[error("set http = \"http://…\" or tcp = \"host:port\"")]
    Neither,
    /// The TCP target is not `host:port`.
    #[error(transparent)]
    Tcp(#[from] crate::addr::AddrError),
    /// The URL does not parse.
    #[error("{url:?} is not a URL: {reason}")]
    NotAUrl {
        /// The URL as written.
        url: String,
        /// The parser's reason.
        reason: String,
    },
    /// Not `http://` (the check runs through the tunnel).
    #[error(
        "{url:?}: scheme {scheme:?} is not supported; the check runs through the tunnel, use http://"
    )]
    Scheme {
        /// The URL as written.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// No scheme.
    #[error("{0:?}: expected http://host:port/path")]
    NoScheme(String),
    /// No host.
    #[error("{0:?}: no host")]
    NoHost(String),
}

impl HealthSpec {
    /// The target; valid after [`ProfileSpec::validate`].
    pub fn target(&self) -> Result<HealthTarget, HealthTargetError> {
        match (&self.http, &self.tcp) {
            (Some(url), None) => parse_http_url(url),
            (None, Some(addr)) => {
                let (host, port) = split_host_port(addr, None)?;
                Ok(HealthTarget::Tcp { host, port })
            }
            (Some(_), Some(_)) => Err(HealthTargetError::Both),
            (None, None) => Err(HealthTargetError::Neither),
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

fn parse_http_url(url: &str) -> Result<HealthTarget, HealthTargetError> {
    let uri: http::Uri =
        url.parse()
            .map_err(|e: http::uri::InvalidUri| HealthTargetError::NotAUrl {
                url: url.into(),
                reason: e.to_string(),
            })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(HealthTargetError::Scheme {
                url: url.into(),
                scheme: other.into(),
            });
        }
        None => return Err(HealthTargetError::NoScheme(url.into())),
    }
    let host = uri
        .host()
        .ok_or_else(|| HealthTargetError::NoHost(url.into()))?
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

fn default_health_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_threshold() -> u32 {
    3
}
