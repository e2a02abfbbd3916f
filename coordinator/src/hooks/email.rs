//! The email hook: each alert state as one message through an SMTP relay (lettre, rustls).
//!
//! `url` says how to reach the relay and how it is protected, with tunnelfleet's defaults rather
//! than SMTP's: `smtp://host[:587]` requires STARTTLS, `smtps://host[:465]` is TLS from the first
//! byte, and plaintext (`smtp://host?tls=none`) is accepted only for a relay on loopback (a local
//! postfix), so credentials and alerts never cross a network in clear. The password is read from
//! a file readable by its owner only and never logged. The idempotency key becomes the
//! `Message-ID`, so a redelivered alert is the same message to every mail system.

use std::path::Path;
use std::time::Duration;

use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::config::{HookConfig, is_loopback};
use super::error::{DeliveryError, HookConfigError};
use super::format::{text, webhook_body};
use crate::store::Delivery;

/// A checked email hook, ready to send.
#[derive(Clone)]
pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// `host:port` of the relay (for errors).
    relay: String,
}

impl std::fmt::Debug for Email {
    // The transport holds the credentials: only where it goes is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Email")
            .field("relay", &self.relay)
            .field("from", &self.from.to_string())
            .field("to", &self.to.len())
            .finish_non_exhaustive()
    }
}

/// How the relay's connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protection {
    StartTls,
    Tls,
    Plain,
}

impl Email {
    /// Checks an `[[hook]]` of kind `email`; the error names the hook and the key.
    pub fn from_config(c: &HookConfig) -> Result<Email, HookConfigError> {
        let err = |key: &'static str, reason: String| HookConfigError {
            hook: c.name.clone(),
            key,
            reason,
        };
        let raw = c.url.as_deref().ok_or_else(|| {
            err(
                "url",
                "required: smtp://relay:587 or smtps://relay:465".into(),
            )
        })?;
        let (protection, host, port) = parse_url(raw).map_err(|e| err("url", e.to_string()))?;
        let from: Mailbox = c
            .from
            .as_deref()
            .ok_or_else(|| err("from", "required: the sender address".to_string()))?
            .parse()
            .map_err(|e| err("from", format!("{e}")))?;
        if c.to.is_empty() {
            return Err(err("to", "at least one recipient is required".into()));
        }
        let to =
            c.to.iter()
                .map(|t| {
                    t.parse::<Mailbox>()
                        .map_err(|e| err("to", format!("{t:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
        let tls = |host: &str| -> Result<TlsParameters, HookConfigError> {
            let mut b = TlsParameters::builder(host.to_string());
            if let Some(ca) = &c.ca_file {
                let cert =
                    read_ca(ca).map_err(|e| err("ca_file", format!("{}: {e}", ca.display())))?;
                b = b.add_root_certificate(cert);
            }
            b.build().map_err(|e| err("url", format!("TLS: {e}")))
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(port)
            .timeout(Some(c.timeout))
            .tls(match protection {
                Protection::StartTls => Tls::Required(tls(&host)?),
                Protection::Tls => Tls::Wrapper(tls(&host)?),
                Protection::Plain => Tls::None,
            });
        match (&c.username, &c.password_file) {
            (Some(user), Some(file)) => {
                tunnelfleet_runtime::secret::check_permissions(file)
                    .map_err(|e| err("password_file", e.to_string()))?;
                let password = std::fs::read_to_string(file)
                    .map_err(|e| err("password_file", format!("{}: {e}", file.display())))?;
                b = b.credentials(Credentials::new(
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                ));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(err("password_file", "required with username".into()));
            }
            (None, Some(_)) => return Err(err("username", "required with password_file".into())),
        }
        Ok(Email {
            transport: b.build(),
            from,
            to,
            relay: format!("{host}:{port}"),
        })
    }

    /// Sends one alert state; `Err` says why the relay did not take it.
    pub async fn send(&self, d: &Delivery, timeout: Duration) -> Result<(), DeliveryError> {
        let message = self.message(d)?;
        let failed = |reason: String| DeliveryError::Smtp {
            relay: self.relay.clone(),
            reason,
        };
        tokio::time::timeout(timeout, self.transport.send(message))
            .await
            .map_err(|_| failed(format!("no answer within {timeout:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(())
    }

    /// The message: a subject a pager can show, the one-line summary, then the alert as JSON.
    pub fn message(&self, d: &Delivery) -> Result<Message, DeliveryError> {
        let a = &d.alert;
        let state = a.status.as_str().to_ascii_uppercase();
        let subject = format!("[tunnelfleet] {state} {}: {}", a.kind.as_str(), a.summary);
        let json = String::from_utf8_lossy(&webhook_body(d)).into_owned();
        let body = format!(
            "{}\n\nAlert {} ({}), subject {}.\nIdempotency key: {}\n\n{json}\n",
            text(a),
            a.id,
            a.kind.as_str(),
            a.subject,
            d.idempotency_key
        );
        let mut m = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(format!("<{}@tunnelfleet>", d.idempotency_key)))
            .header(ContentType::TEXT_PLAIN);
        for t in &self.to {
            m = m.to(t.clone());
        }
        Ok(m.body(body)?)
    }
}

/// Why a relay URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum UrlError {
    /// Not `scheme://…`.
    #[error("{0:?}: expected smtp://relay:587 or smtps://relay:465")]
    Form(String),
    /// Credentials in the URL.
    #[error("{0:?}: no credentials in the URL; use username and password_file")]
    Credentials(String),
    /// Another scheme.
    #[error("{raw:?}: scheme {scheme:?} (use smtp or smtps)")]
    Scheme {
        /// The URL.
        raw: String,
        /// Its scheme.
        scheme: String,
    },
    /// A query other than `tls=none` with `smtp://`.
    #[error("{raw:?}: unknown parameter {query:?} (only tls=none, with smtp://)")]
    Parameter {
        /// The URL.
        raw: String,
        /// The query.
        query: String,
    },
    /// The host part is not `host[:port]`.
    #[error(transparent)]
    Addr(#[from] tunnelfleet_protocol::addr::AddrError),
    /// Plaintext beyond this host.
    #[error(
        "{0:?}: plaintext SMTP only to a relay on this host (127.0.0.1, ::1, localhost); use smtp:// (STARTTLS) or smtps://"
    )]
    Plaintext(String),
}

/// `smtp://host[:port][?tls=none]` or `smtps://host[:port]`.
fn parse_url(raw: &str) -> Result<(Protection, String, u16), UrlError> {
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| UrlError::Form(raw.into()))?;
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a.trim_end_matches('/'), Some(q)),
        None => (rest.trim_end_matches('/'), None),
    };
    if authority.contains('@') {
        return Err(UrlError::Credentials(raw.into()));
    }
    let (mut protection, default_port) = match scheme {
        "smtp" => (Protection::StartTls, 587),
        "smtps" => (Protection::Tls, 465),
        other => {
            return Err(UrlError::Scheme {
                raw: raw.into(),
                scheme: other.into(),
            });
        }
    };
    match query {
        None => {}
        Some("tls=none") if protection == Protection::StartTls => protection = Protection::Plain,
        Some(q) => {
            return Err(UrlError::Parameter {
                raw: raw.into(),
                query: q.into(),
            });
        }
    }
    let (host, port) = tunnelfleet_protocol::addr::split_host_port(authority, Some(default_port))?;
    if protection == Protection::Plain && !is_loopback(&host) {
        return Err(UrlError::Plaintext(raw.into()));
    }
    Ok((protection, host, port))
}

/// Why `ca_file` could not be used.
#[derive(Debug, thiserror::Error)]
enum CaFileError {
    /// Not readable.
    #[error(transparent)]
    Read(#[from] std::io::Error),
    /// Not a PEM certificate.
    #[error(transparent)]
    Pem(#[from] lettre::transport::smtp::Error),
}

fn read_ca(path: &Path) -> Result<Certificate, CaFileError> {
    let pem = std::fs::read(path)?;
    Ok(Certificate::from_pem(&pem)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn urls_default_to_protected_relays() {
        assert_eq!(
            parse_url("smtp://mail.example.com").unwrap(),
            (Protection::StartTls, "mail.example.com".into(), 587)
        );
        assert_eq!(
            parse_url("smtps://mail.example.com").unwrap(),
            (Protection::Tls, "mail.example.com".into(), 465)
        );
        assert_eq!(
            parse_url("smtp://127.0.0.1:2525?tls=none").unwrap(),
            (Protection::Plain, "127.0.0.1".into(), 2525)
        );
        for bad in [
            "smtp://mail.example.com?tls=none",
            "smtps://127.0.0.1?tls=none",
            "http://mail.example.com",
            "smtp://user:pw@mail.example.com",
            "mail.example.com:25",
            "smtp://mail.example.com:0",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }
}
