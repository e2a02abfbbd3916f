//! Alert delivery: a generic webhook (JSON signed with HMAC-SHA256), Slack incoming webhooks,
//! Prometheus Alertmanager (its v2 API), email through an SMTP relay ([`crate::email`]) and a
//! local command (the alert JSON on stdin).
//!
//! Every alert state reaches the hooks through the sled outbox ([`crate::store`]): written in
//! the same transaction as the alert, removed only after the hook accepted it. One task per
//! hook takes that hook's entries in order (a resolution never overtakes its firing), retries
//! with capped exponential backoff, and counts what happened for `tunnelfleet alerts hooks`.
//! Delivery is at least once: receivers deduplicate on the idempotency key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tunnelfleet_runtime::clock::now_unix_ms;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::store::{Alert, AlertStatus, Delivery};

/// The signature header of the generic webhook: `sha256=<hex HMAC-SHA256(secret, body)>`.
pub const SIGNATURE_HEADER: &str = "x-tunnelfleet-signature";
/// The idempotency key header.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

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

/// One `[[hook]]` of the coordinator's config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Name (in logs, metrics and the outbox).
    pub name: String,
    /// Kind.
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
    /// An extra CA certificate (PEM) the SMTP relay's certificate may chain to (email).
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

/// A hook ready to deliver.
#[derive(Debug, Clone)]
pub struct Hook {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: HookKind,
    url: Option<hyper::Uri>,
    secret: Option<Vec<u8>>,
    command: Vec<String>,
    email: Option<crate::email::Email>,
    timeout: Duration,
}

impl Hook {
    /// Checks a config entry and reads its secret; the error names the hook and the key.
    pub fn from_config(c: &HookConfig) -> Result<Hook, String> {
        let err = |key: &str, why: String| format!("hook {:?}: {key}: {why}", c.name);
        if !tunnelfleet_protocol::addr::valid_name(&c.name) {
            return Err(err("name", "use letters, digits, '-', '_', '.'".into()));
        }
        let email = match c.kind {
            HookKind::Email => {
                Some(crate::email::Email::from_config(c).map_err(|(key, why)| err(key, why))?)
            }
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
}

/// Hex HMAC-SHA256 of `body` under `secret`, as in the signature header after `sha256=`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    // HMAC takes keys of any length.
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(body);
    data_encoding::HEXLOWER.encode(&mac.finalize().into_bytes())
}

/// The webhook's JSON body.
pub fn webhook_body(d: &Delivery) -> Vec<u8> {
    let status = match d.alert.status {
        AlertStatus::Firing => "firing",
        AlertStatus::Resolved => "resolved",
    };
    serde_json::to_vec(&serde_json::json!({
        "idempotency_key": d.idempotency_key,
        "status": status,
        "alert": d.alert,
    }))
    .unwrap_or_default()
}

/// One line for chat.
pub fn text(a: &Alert) -> String {
    let (mark, state) = match a.status {
        AlertStatus::Firing => (":red_circle:", "FIRING"),
        AlertStatus::Resolved => (":large_green_circle:", "RESOLVED"),
    };
    let mut t = format!(
        "{mark} {state} [{}] {} (alert {})",
        a.kind.as_str(),
        a.summary,
        a.id
    );
    if !a.affected_agents.is_empty() {
        t.push_str(&format!("; agents: {}", a.affected_agents.join(", ")));
    }
    t
}

fn rfc3339(unix_ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Alertmanager v2 `postableAlerts`: labels identify the alert, `endsAt` resolves it.
pub fn alertmanager_body(a: &Alert) -> Vec<u8> {
    let mut alert = serde_json::json!({
        "labels": {
            "alertname": a.kind.as_str(),
            "subject": a.subject,
            "severity": a.kind.severity(),
            "tunnelfleet_alert_id": a.id.to_string(),
            "source": "tunnelfleet",
        },
        "annotations": {
            "summary": a.summary,
            "affected_agents": a.affected_agents.join(","),
        },
        "startsAt": rfc3339(a.fired_unix_ms),
    });
    if let Some(end) = a.resolved_unix_ms {
        alert["endsAt"] = rfc3339(end).into();
    }
    serde_json::to_vec(&[alert]).unwrap_or_default()
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn client() -> Result<Client, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("TLS: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

/// Delivers one entry once; `Err` says why it failed.
#[tracing::instrument(name = "hook_delivery", skip_all, fields(hook = %hook.name, alert = d.alert.id, attempt = d.attempts + 1))]
async fn deliver(hook: &Hook, client: &Client, d: &Delivery) -> Result<(), String> {
    match hook.kind {
        HookKind::Command => run_command(hook, d).await,
        HookKind::Email => {
            let email = hook.email.as_ref().ok_or("no email settings")?;
            email.send(d, hook.timeout).await
        }
        kind => {
            let (body, content_type) = match kind {
                HookKind::Slack => (
                    serde_json::to_vec(&serde_json::json!({ "text": text(&d.alert) }))
                        .unwrap_or_default(),
                    "application/json",
                ),
                HookKind::Alertmanager => (alertmanager_body(&d.alert), "application/json"),
                _ => (webhook_body(d), "application/json"),
            };
            let url = hook.url.clone().ok_or("no url")?;
            let mut req = hyper::Request::post(url)
                .header(hyper::header::CONTENT_TYPE, content_type)
                .header(
                    hyper::header::USER_AGENT,
                    concat!("tunnelfleet/", env!("CARGO_PKG_VERSION")),
                )
                .header(IDEMPOTENCY_HEADER, &d.idempotency_key);
            if let Some(secret) = &hook.secret {
                req = req.header(SIGNATURE_HEADER, format!("sha256={}", sign(secret, &body)));
            }
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(hook.timeout, client.request(req))
                .await
                .map_err(|_| format!("no answer within {:?}", hook.timeout))?
                .map_err(|e| format!("{e:?}"))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let body: String =
                tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect())
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|b| {
                        String::from_utf8_lossy(&b.to_bytes())
                            .chars()
                            .take(200)
                            .collect()
                    })
                    .unwrap_or_default();
            Err(format!("HTTP {status}: {body}"))
        }
    }
}

async fn run_command(hook: &Hook, d: &Delivery) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let (program, args) = hook.command.split_first().ok_or("no command")?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env(
            "TUNNELFLEET_ALERT_STATUS",
            match d.alert.status {
                AlertStatus::Firing => "firing",
                AlertStatus::Resolved => "resolved",
            },
        )
        .env("TUNNELFLEET_IDEMPOTENCY_KEY", &d.idempotency_key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    let body = webhook_body(d);
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let out = tokio::time::timeout(hook.timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("{program}: still running after {:?}; killed", hook.timeout))?
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err: String = String::from_utf8_lossy(&out.stderr)
            .chars()
            .take(200)
            .collect();
        Err(format!(
            "{program} exited with {}: {}",
            out.status,
            err.trim()
        ))
    }
}

/// What `tunnelfleet alerts hooks` shows per hook.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HookStats {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Deliveries accepted since the coordinator started.
    pub delivered: u64,
    /// Failed attempts since the coordinator started.
    pub failed_attempts: u64,
    /// Entries waiting in the outbox.
    pub pending: usize,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the last delivery was accepted (Unix ms).
    pub last_delivered_unix_ms: Option<u64>,
}

/// The outbox worker: one task per hook.
pub struct Outbox {
    store: Store,
    hooks: Vec<Hook>,
    wake: Notify,
    stats: Mutex<BTreeMap<String, HookStats>>,
}

impl Outbox {
    /// A worker over `store` for `hooks`.
    pub fn new(store: Store, hooks: Vec<Hook>) -> Arc<Outbox> {
        let stats = hooks
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    HookStats {
                        name: h.name.clone(),
                        kind: format!("{:?}", h.kind).to_lowercase(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        Arc::new(Outbox {
            store,
            hooks,
            wake: Notify::new(),
            stats: Mutex::new(stats),
        })
    }

    /// Names of the configured hooks (every alert state goes to each).
    pub fn names(&self) -> Vec<String> {
        self.hooks.iter().map(|h| h.name.clone()).collect()
    }

    /// New entries were written: look now.
    pub fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Per-hook counters with the outbox's current backlog.
    pub fn stats(&self) -> Vec<HookStats> {
        let pending = self.store.deliveries().unwrap_or_default();
        let mut v: Vec<HookStats> = self.lock().values().cloned().collect();
        for s in &mut v {
            s.pending = pending.iter().filter(|d| d.hook == s.name).count();
        }
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, HookStats>> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Delivers until `shutdown`; entries of hooks no longer configured are dropped with a
    /// warning (nobody could ever take them).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let client = match client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("alert hooks disabled: {e}");
                return;
            }
        };
        let known: Vec<String> = self.names();
        if let Ok(all) = self.store.deliveries() {
            for d in all.iter().filter(|d| !known.contains(&d.hook)) {
                tracing::warn!(hook = %d.hook, key = %d.idempotency_key, "hook no longer configured; dropping its queued delivery");
                let _ = self.store.delivered(d.seq).await;
            }
        }
        let mut tasks = Vec::new();
        for hook in self.hooks.clone() {
            let me = self.clone();
            let client = client.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                me.run_hook(hook, client, shutdown).await
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn run_hook(&self, hook: Hook, client: Client, shutdown: CancellationToken) {
        // At start, try the backlog at once: the receiver may have been fixed while the
        // coordinator was down.
        let mut fresh = true;
        loop {
            // Register for a wake-up before looking, so an entry written meanwhile is seen.
            let woken = self.wake.notified();
            let head = match self.store.deliveries() {
                Ok(all) => all.into_iter().find(|d| d.hook == hook.name),
                Err(e) => {
                    tracing::error!(hook = %hook.name, "reading the outbox: {e}");
                    None
                }
            };
            let wait = match &head {
                None => Duration::from_secs(5),
                Some(_) if fresh => Duration::ZERO,
                Some(d) => {
                    Duration::from_millis(d.next_attempt_unix_ms.saturating_sub(now_unix_ms()))
                }
            };
            if head.is_none() || !wait.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = woken => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            let Some(mut d) = head else { continue };
            fresh = false;
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = deliver(&hook, &client, &d) => r,
            };
            match result {
                Ok(()) => {
                    if let Err(e) = self.store.delivered(d.seq).await {
                        tracing::error!(hook = %hook.name, "outbox: {e}");
                    }
                    tracing::info!(hook = %hook.name, alert = d.alert.id, key = %d.idempotency_key, attempts = d.attempts + 1, "alert delivered");
                    let mut s = self.lock();
                    if let Some(s) = s.get_mut(&hook.name) {
                        s.delivered += 1;
                        s.last_delivered_unix_ms = Some(now_unix_ms());
                    }
                }
                Err(e) => {
                    d.attempts += 1;
                    let delay = backoff(d.attempts);
                    d.next_attempt_unix_ms = now_unix_ms() + delay.as_millis() as u64;
                    tracing::warn!(hook = %hook.name, alert = d.alert.id, attempts = d.attempts, retry_in = ?delay, "alert delivery failed: {e}");
                    d.last_error = Some(e.clone());
                    if let Err(e) = self.store.delivery_failed(&d).await {
                        tracing::error!(hook = %hook.name, "outbox: {e}");
                    }
                    let mut s = self.lock();
                    if let Some(s) = s.get_mut(&hook.name) {
                        s.failed_attempts += 1;
                        s.last_error = Some(e);
                    }
                }
            }
        }
    }
}

/// 1 s, 2 s, 4 s … capped at [`MAX_BACKOFF`], with up to 20 % jitter so that a recovering
/// receiver is not hit by every queued entry in the same instant.
fn backoff(attempts: u32) -> Duration {
    use rand::RngExt;
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let jitter = rand::rng().random_range(0.0..0.2);
    base.mul_f64(1.0 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_hmac_sha256_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) >= Duration::from_secs(1) && backoff(1) < Duration::from_millis(1200));
        assert!(backoff(3) >= Duration::from_secs(4));
        assert!(backoff(40) <= MAX_BACKOFF.mul_f64(1.2));
    }
}
