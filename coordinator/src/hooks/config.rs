//! `[[hook]]` entries of the coordinator's config, as written.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which kind of hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    /// POST the alert as JSON, signed when a secret is set.
    Webhook,
    /// A Slack incoming webhook.
    Slack,
    /// Prometheus Alertmanager (`url` is its base address).
    Alertmanager,
    /// Run a program with the alert JSON on stdin.
    Command,
    /// Send an email through an SMTP relay (`url` is `smtp://relay:587` or `smtps://relay:465`).
    Email,
}

/// One `[[hook]]` of the coordinator's config. Its `Debug` shows a URL only up to its host: a
/// Slack URL's path is its credential, and other receivers put tokens there too.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Name (in logs, metrics and the outbox).
    pub name: String,
    /// What kind of receiver it is.
    pub kind: HookKind,
    /// Where (webhook, slack, alertmanager).
    #[serde(default)]
    pub url: Option<String>,
    /// Shared secret for the webhook's signature (file readable by its owner only).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Program and arguments (command).
    #[serde(default)]
    pub command: Vec<String>,
    /// Per attempt.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Sender (email): `tunnelfleet <tunnelfleet@example.com>`.
    #[serde(default)]
    pub from: Option<String>,
    /// Recipients (email).
    #[serde(default)]
    pub to: Vec<String>,
    /// SMTP login (email), with `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the SMTP password (readable by its owner only).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) the receiver's certificate may chain to, besides the web
    /// PKI roots: an internal Alertmanager, a company relay (every kind but `command`).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

impl HookConfig {
    /// A signed generic webhook posting to `url` with a 2 s timeout (the demo, tests, benches).
    pub fn webhook(name: &str, url: String, secret_file: PathBuf) -> HookConfig {
        HookConfig {
            name: name.to_string(),
            kind: HookKind::Webhook,
            url: Some(url),
            secret_file: Some(secret_file),
            command: Vec::new(),
            timeout: Duration::from_secs(2),
            from: None,
            to: Vec::new(),
            username: None,
            password_file: None,
            ca_file: None,
        }
    }
}

impl std::fmt::Debug for HookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("secret_file", &self.secret_file)
            .field("command", &self.command)
            .field("timeout", &self.timeout)
            .field("from", &self.from)
            .field("to", &self.to)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// `scheme://host[:port]/…`: a URL without what may be a credential (path, query, login).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let more = if rest.len() > authority.len() {
        "/…"
    } else {
        ""
    };
    format!("{scheme}://{host}{more}")
}

/// `localhost` or a loopback address.
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
