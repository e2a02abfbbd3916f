//! A hook checked and ready to deliver, and one delivery attempt by its kind.

use std::time::Duration;

use super::config::{HookConfig, HookKind, is_loopback};
use super::email::Email;
use super::error::{DeliveryError, HookConfigError};
use super::format::{alertmanager_body, slack_text, webhook_body};
use super::http::{Client, Post, client, post};
use crate::store::Delivery;

/// A hook ready to deliver (its `Debug` shows neither its secret nor its URL's path).
#[derive(Clone)]
pub struct Hook {
    /// The hook's name (logs, metrics, the outbox).
    pub name: String,
    /// What kind of receiver it is.
    pub kind: HookKind,
    url: Option<hyper::Uri>,
    /// The HTTP client of an HTTP kind (its own: `ca_file` may add a root).
    client: Option<Client>,
    secret: Option<Vec<u8>>,
    command: Vec<String>,
    email: Option<Email>,
    timeout: Duration,
}

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field(
                "url",
                &self
                    .url
                    .as_ref()
                    .map(|u| super::config::redact_url(&u.to_string())),
            )
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("command", &self.command)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Hook {
    /// Checks a config entry and reads its secret; the error names the hook and the key.
    pub fn from_config(c: &HookConfig) -> Result<Hook, HookConfigError> {
        let err = |key: &'static str, reason: String| HookConfigError {
            hook: c.name.clone(),
            key,
            reason,
        };
        if !tunnelfleet_protocol::addr::valid_name(&c.name) {
            return Err(err("name", "use letters, digits, '-', '_', '.'".into()));
        }
        let email = match c.kind {
            HookKind::Email => Some(Email::from_config(c)?),
            _ => None,
        };
        let url = match c.kind {
            HookKind::Command | HookKind::Email => None,
            _ => {
                let raw = c
                    .url
                    .as_deref()
                    .ok_or_else(|| err("url", "required for this kind".into()))?;
                let mut raw = raw.to_string();
                if c.kind == HookKind::Alertmanager && !raw.ends_with("/api/v2/alerts") {
                    raw = format!("{}/api/v2/alerts", raw.trim_end_matches('/'));
                }
                let uri: hyper::Uri = raw.parse().map_err(|e| err("url", format!("{e}")))?;
                let Some(host) = uri.host() else {
                    return Err(err("url", format!("{raw:?} is not an http(s) URL")));
                };
                match uri.scheme_str() {
                    Some("https") => {}
                    // A Slack webhook's URL is its credential: never in the clear on a network.
                    Some("http") if c.kind == HookKind::Slack && !is_loopback(host) => {
                        return Err(err(
                            "url",
                            format!(
                                "a Slack webhook URL is its secret: https:// only (http:// only to this host), not {host:?}"
                            ),
                        ));
                    }
                    Some("http") => {}
                    _ => return Err(err("url", format!("{raw:?} is not an http(s) URL"))),
                }
                Some(uri)
            }
        };
        let client = match (url.is_some(), &c.ca_file) {
            (true, ca) => Some(client(ca.as_deref()).map_err(|e| {
                let file = ca
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                err("ca_file", format!("{file}: {e}"))
            })?),
            (false, _) => None,
        };
        if c.kind == HookKind::Command && c.command.is_empty() {
            return Err(err(
                "command",
                "required: the program and its arguments".into(),
            ));
        }
        let secret = match &c.secret_file {
            None => None,
            Some(path) => {
                tunnelfleet_runtime::secret::check_permissions(path)
                    .map_err(|e| err("secret_file", e.to_string()))?;
                let s = std::fs::read_to_string(path)
                    .map_err(|e| err("secret_file", format!("{}: {e}", path.display())))?;
                Some(s.trim().as_bytes().to_vec())
            }
        };
        Ok(Hook {
            name: c.name.clone(),
            kind: c.kind,
            url,
            client,
            secret,
            command: c.command.clone(),
            email,
            timeout: c.timeout,
        })
    }

    /// Delivers one entry once; `Err` says why it failed.
    #[tracing::instrument(name = "hook_delivery", skip_all, fields(hook = %self.name, alert = d.alert.id, attempt = d.attempts + 1))]
    pub async fn deliver(&self, d: &Delivery) -> Result<(), DeliveryError> {
        let body = match self.kind {
            HookKind::Command => return super::command::run(&self.command, self.timeout, d).await,
            HookKind::Email => {
                let Some(email) = &self.email else {
                    return Err(DeliveryError::Transport("no email settings".into()));
                };
                return email.send(d, self.timeout).await;
            }
            HookKind::Slack => {
                serde_json::to_vec(&serde_json::json!({ "text": slack_text(&d.alert) }))
                    .unwrap_or_default()
            }
            HookKind::Alertmanager => alertmanager_body(&d.alert),
            HookKind::Webhook => webhook_body(d),
        };
        let (Some(url), Some(client)) = (self.url.clone(), &self.client) else {
            return Err(DeliveryError::Transport("no url".into()));
        };
        post(
            client,
            Post {
                url,
                body,
                secret: self.secret.as_deref(),
                idempotency_key: &d.idempotency_key,
                timeout: self.timeout,
            },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn a_hook_is_refused_naming_it_and_the_key() {
        let mut c = HookConfig::webhook("ops", "ftp://x".into(), "/nonexistent".into());
        c.secret_file = None;
        let e = Hook::from_config(&c).unwrap_err();
        assert_eq!((e.hook.as_str(), e.key), ("ops", "url"));
        c.url = Some("http://127.0.0.1:9/hook".into());
        Hook::from_config(&c).unwrap();
        c.name = "a b".into();
        assert_eq!(Hook::from_config(&c).unwrap_err().key, "name");
        c.name = "ops".into();
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let e = Hook::from_config(&c).unwrap_err();
        assert_eq!(e.key, "ca_file");
        assert!(e.reason.starts_with("/nonexistent/ca.pem: "), "{e}");
    }

    /// A Slack URL is its credential and a signing secret is one: neither appears in `Debug`
    /// (logs, panics), of the config or of the hook built from it.
    #[test]
    fn debug_shows_no_secret_and_no_slack_url() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("webhook.secret");
        std::fs::write(&secret, "s3cret-signing-key\n").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let signed = HookConfig::webhook("ops", "https://hooks.example.com/in".into(), secret);
        let mut slack = HookConfig::webhook(
            "chat",
            "https://hooks.slack.com/services/T0/B0/s3cretpath".into(),
            "/x".into(),
        );
        slack.kind = HookKind::Slack;
        slack.secret_file = None;
        for c in [&signed, &slack] {
            let hook = Hook::from_config(c).unwrap();
            for shown in [format!("{c:?}"), format!("{hook:?}")] {
                assert!(
                    !shown.contains("s3cret-signing-key") && !shown.contains("s3cretpath"),
                    "{shown}"
                );
                assert!(shown.contains(&c.name), "{shown}");
            }
        }
    }

    #[test]
    fn a_slack_url_travels_only_over_tls_or_on_this_host() {
        let mut c = HookConfig::webhook("chat", String::new(), "/nonexistent".into());
        c.kind = HookKind::Slack;
        c.secret_file = None;
        for ok in [
            "https://hooks.slack.com/services/T0/B0/x",
            "http://127.0.0.1:8080/slack",
            "http://localhost/slack",
            "http://[::1]:81/slack",
        ] {
            c.url = Some(ok.into());
            Hook::from_config(&c).unwrap();
        }
        c.url = Some("http://hooks.slack.com/services/T0/B0/x".into());
        let e = Hook::from_config(&c).unwrap_err();
        assert_eq!(e.key, "url");
        assert!(e.reason.contains("https:// only"), "{e}");
    }
}
