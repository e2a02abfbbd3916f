//! Alert delivery: a generic webhook (JSON signed with HMAC-SHA256), Slack incoming webhooks,
//! Prometheus Alertmanager (its v2 API), email through an SMTP relay and a local command (the
//! alert JSON on stdin).
//!
//! Every alert state reaches the hooks through the sled outbox (`crate::store`): written in
//! the same transaction as the alert, removed only after the hook accepted it. One task per
//! hook takes that hook's entries in order (a resolution never overtakes its firing), retries
//! with capped exponential backoff, and counts what happened for `tunnelfleet alerts hooks`.
//! Delivery is at least once: receivers deduplicate on the idempotency key.
//!
//! # Layout
//! - [`config`]: `[[hook]]` entries as configured.
//! - [`hook`]: a checked hook and one delivery attempt, by kind.
//! - [`format`]: the bodies: webhook JSON and its signature, chat text, Alertmanager alerts.
//! - [`http`]: the HTTPS client of webhook, Slack and Alertmanager hooks.
//! - [`command`]: the command hook.
//! - [`email`]: the email hook: SMTP with STARTTLS or TLS by default.
//! - [`outbox`]: the worker that drains the durable outbox, one task per hook.
//! - [`error`]: why a hook was refused, why a delivery failed.

pub mod command;
pub mod config;
pub mod email;
pub mod error;
pub mod format;
pub mod hook;
pub mod http;
pub mod outbox;

pub use config::{HookConfig, HookKind};
pub use error::{DeliveryError, HookConfigError};
pub use format::{
    IDEMPOTENCY_HEADER, SIGNATURE_HEADER, alertmanager_body, sign, text, webhook_body,
};
pub use hook::Hook;
pub use outbox::{HookStats, Outbox};
