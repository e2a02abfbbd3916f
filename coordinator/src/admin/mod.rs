//! The admin HTTP API: JSON over HTTP on 127.0.0.1 by default, bearer tokens with roles
//! (the file's, an admin, and named ones), every change in the audit log.
//!
//! The CLI's `agents`, `profiles`, `assign`, `rollout`, `oma`, `alerts` and `token` commands are
//! thin clients of this. Every change is durable (flushed) before the response and pushed to
//! connected agents right after. Profiles are validated by the one profile model the agents
//! use, so a profile the coordinator accepts is one the agent will accept.
//!
//! # Layout
//! - this module: the shared state, the router, request spans, and the read-only `/metrics`
//!   router.
//! - [`auth`]: the bearer token, the role each route needs, the audit entry of each change.
//! - [`agents`], [`profiles`], [`rollouts`], [`oma`], [`alerts`], [`access`], [`admins`],
//!   [`coordinators`]: one file per resource.
//! - [`error`]: status codes by error variant.

pub mod access;
pub mod admins;
pub mod agents;
pub mod alerts;
pub mod auth;
pub mod coordinators;
pub mod error;
pub mod oma;
pub mod profiles;
pub mod rollouts;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub use access::{RevokeRequest, TokenCreated, TokenRequest};
pub use admins::{AdminTokenCreated, AdminTokenRequest};
pub use agents::{AgentDetail, AgentSummary, SshCertExpiry};
pub use alerts::{AckRequest, SilenceRequest};
pub use auth::Caller;
pub use error::ApiError;
pub use oma::{Done, EndpointRequest, HostCert, HostCertRequest, SshAccess};
pub use profiles::{AssignRequest, Changed, RollbackRequest, Rollout};
pub use rollouts::{Aborted, RolloutView};

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::watch::WatchHandle;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Admin {
    /// The fleet.
    pub fleet: Arc<Fleet>,
    /// The watcher: OMA commands, endpoint health, hook stats.
    pub watch: WatchHandle,
    /// Whether this coordinator holds the CA key and so can enroll agents with join tokens.
    pub enrollment: bool,
    /// The SSH user CA's public key line, when this coordinator has one.
    pub ssh_ca_public: Option<Arc<String>>,
    /// The fleet's SSH host CA (`oma host-cert`); none: host keys are not certified here.
    pub ssh_host_ca: Option<Arc<crate::sshca::SshCa>>,
    /// Staged rollouts.
    pub rollouts: crate::rollout::Rollouts,
    /// The `admin_token_file`'s token (an `admin`; named tokens are in the store).
    pub token: Arc<String>,
    /// This coordinator's name.
    pub name: Arc<String>,
    /// Where it stands among the coordinators sharing the store.
    pub standing: tokio::sync::watch::Receiver<crate::store::Standing>,
}

/// The router: every resource's routes behind the bearer token.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .merge(agents::routes())
        .merge(profiles::routes())
        .merge(oma::routes())
        .merge(alerts::routes())
        .merge(access::routes())
        .merge(admins::routes())
        .merge(rollouts::routes())
        .merge(coordinators::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            admin.clone(),
            auth::authorize,
        ))
        .layer(axum::middleware::from_fn(request_span))
        .with_state(admin)
}

/// One span per admin request (exported over OTLP when configured), with its outcome.
async fn request_span(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "admin_request",
        method = %req.method(),
        path = %req.uri().path(),
        status = tracing::field::Empty
    );
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("status", resp.status().as_u16());
    resp
}

/// The read-only `/metrics` router (its own listener, no token).
pub fn metrics_router(metrics: Option<Arc<Metrics>>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(metrics)
}

async fn render_metrics(State(metrics): State<Option<Arc<Metrics>>>) -> Response {
    match metrics.as_ref().map(|m| m.render()) {
        Some(Ok(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Some(Err(e)) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        None => ApiError(StatusCode::NOT_FOUND, "metrics are disabled".into()).into_response(),
    }
}
