//! A hook checked and ready to deliver, and one delivery attempt by its kind.

use std::time::Duration;

use super::config::{HookConfig, HookKind};
use super::email::Email;
use super::error::{DeliveryError, HookConfigError};
use super::format::{alertmanager_body, text, webhook_body};
use super::http::{Client, Post, post};
use crate::store::Delivery;

/// A hook ready to deliver.
#[derive(Debug, Clone)]
pub struct Hook {
    /// The hook's name (logs, metrics, the outbox).
    pub name: String,
    /// What kind of receiver it is.
    pub kind: HookKind,
    url: Option<hyper::Uri>,
    secret: Option<Vec<u8>>,
    command: Vec<String>,
    email: Option<Email>,
    timeout: Duration,
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
                if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                    return Err(err("url", format!("{raw:?} is not an http(s) URL")));
                }
                Some(uri)
            }
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
            secret,
            command: c.command.clone(),
            email,
            timeout: c.timeout,
        })
    }

    /// Delivers one entry once; `Err` says why it failed.
    #[tracing::instrument(name = "hook_delivery", skip_all, fields(hook = %self.name, alert = d.alert.id, attempt = d.attempts + 1))]
    pub async fn deliver(&self, client: &Client, d: &Delivery) -> Result<(), DeliveryError> {
        let body = match self.kind {
            HookKind::Command => return super::command::run(&self.command, self.timeout, d).await,
            HookKind::Email => {
                let Some(email) = &self.email else {
                    return Err(DeliveryError::Transport("no email settings".into()));
                };
                return email.send(d, self.timeout).await;
            }
            HookKind::Slack => serde_json::to_vec(&serde_json::json!({ "text": text(&d.alert) }))
                .unwrap_or_default(),
            HookKind::Alertmanager => alertmanager_body(&d.alert),
            HookKind::Webhook => webhook_body(d),
        };
        let Some(url) = self.url.clone() else {
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
    }
}
