//! The fleet page: a read-only view of the fleet in a browser, on its own listener (`web_listen`,
//! loopback unless told; TLS with `admin_tls`), behind the admin credentials. One static page
//! and its script over one JSON view (`/api/fleet`), polled every two seconds: OMA groups and
//! endpoints with health and who is on each, every agent (state, endpoint following the group
//! or diverged, tunnels up, last heartbeat), alerts firing and recent, the rollout in progress.
//!
//! # Layout
//! - this module: the router, the security headers, sign-in and sign-out, the JSON view.
//! - [`session`]: sessions and their cookie.
//! - `assets/`: the page, its script and style (compiled in).

pub mod session;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::admin::{Admin, AgentDetail, RolloutView};
use crate::monitor::EndpointView;
use crate::store::Alert;
use session::{Session, Sessions};

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// Resolved alerts the page shows.
const RECENT_ALERTS: usize = 20;

/// The page's state.
#[derive(Clone)]
pub struct Web {
    admin: Admin,
    sessions: Arc<Sessions>,
}

/// The fleet as the page shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetView {
    /// The fleet version.
    pub version: u64,
    /// Every OMA endpoint by group, with its health and the agents on it.
    pub endpoints: Vec<EndpointView>,
    /// Every agent, with where each of its profiles runs.
    pub agents: Vec<AgentDetail>,
    /// Alerts firing.
    pub firing: Vec<AlertRow>,
    /// The latest resolved alerts, newest first.
    pub recent: Vec<AlertRow>,
    /// The rollout in progress or the last one.
    pub rollout: Option<RolloutView>,
    /// The coordinators, who leads, and the agents on each.
    pub coordinators: crate::admin::coordinators::CoordinatorsView,
}

/// An alert with its severity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertRow {
    /// The alert.
    #[serde(flatten)]
    pub alert: Alert,
    /// `critical` or `warning`.
    pub severity: String,
}

/// The page's router over the admin API's state.
pub fn router(admin: Admin) -> Router {
    let web = Web {
        admin,
        sessions: Arc::default(),
    };
    Router::new()
        .route("/", get(index))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/api/fleet", get(fleet))
        .route(
            "/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/style.css",
            get(|| asset(STYLE, "text/css; charset=utf-8")),
        )
        .layer(axum::middleware::from_fn(headers))
        .with_state(web)
}

/// Every answer: no framing, no sniffing, no referrer, scripts and styles from here only.
async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (k, v) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The signed-in session of a request, its token still valid.
fn signed_in(web: &Web, headers: &axum::http::HeaderMap) -> Option<Session> {
    let id = session::cookie_of(headers)?;
    let s = web.sessions.get(&id, Instant::now())?;
    if s.caller.name == crate::admin::auth::FILE_TOKEN_NAME {
        return Some(s);
    }
    // A named token revoked since: the session ends with it.
    match web.admin.fleet.store.admin_token(&s.token_hash) {
        Ok(Some(t)) if t.name == s.caller.name => Some(s),
        _ => {
            web.sessions.end(&id);
            None
        }
    }
}

async fn index(State(web): State<Web>, headers: axum::http::HeaderMap) -> Response {
    match signed_in(&web, &headers) {
        Some(_) => Html(INDEX).into_response(),
        None => see_other("/login", None),
    }
}

fn see_other(to: &'static str, cookie: Option<String>) -> Response {
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}

fn login_html(error: &str) -> Html<String> {
    // The only text put in the page is ours, never the caller's.
    Html(LOGIN.replace("{{error}}", error))
}

async fn login_page() -> Html<String> {
    login_html("")
}

/// The sign-in form.
#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(web): State<Web>, Form(f): Form<LoginForm>) -> Response {
    let given = f.token.trim();
    match crate::admin::auth::caller(&web.admin, given) {
        Ok(Some(caller)) => {
            tracing::info!(target: "tunnelfleet::audit", token = %caller.name, role = %caller.role, "signed in to the fleet page");
            let id = web
                .sessions
                .start(caller, crate::enroll::token_hash(given), Instant::now());
            see_other("/", Some(session::set_cookie(&id)))
        }
        Ok(None) => (
            StatusCode::UNAUTHORIZED,
            login_html("That token is unknown or revoked."),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn logout(State(web): State<Web>, headers: axum::http::HeaderMap) -> Response {
    if let Some(id) = session::cookie_of(&headers) {
        web.sessions.end(&id);
    }
    see_other("/login", Some(session::clear_cookie()))
}

async fn fleet(State(web): State<Web>, headers: axum::http::HeaderMap) -> Response {
    if signed_in(&web, &headers).is_none() {
        return crate::admin::ApiError(StatusCode::UNAUTHORIZED, "sign in first".into())
            .into_response();
    }
    match view(&web.admin) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The fleet now.
pub fn view(a: &Admin) -> Result<FleetView, crate::admin::ApiError> {
    let store = &a.fleet.store;
    let row = |alert: Alert| AlertRow {
        severity: alert.kind.severity().to_string(),
        alert,
    };
    let firing = store.alerts(false)?.into_iter().map(row).collect();
    let resolved = store.recent_resolved(RECENT_ALERTS)?;
    let version = store.fleet_version()?;
    Ok(FleetView {
        version,
        endpoints: a.watch.view(),
        agents: crate::admin::agents::details(&a.fleet, &a.name)?
            .into_iter()
            .map(|mut d| {
                // The page shows the summary and the placement; the heartbeat stays out.
                d.last_heartbeat = None;
                d
            })
            .collect(),
        firing,
        recent: resolved.into_iter().map(row).collect(),
        coordinators: crate::admin::coordinators::view(a)?,
        rollout: store.last_rollout()?.map(|mut r| {
            r.base_profiles.clear();
            r.base_assignments.clear();
            RolloutView {
                rollout: r,
                fleet_version: version,
            }
        }),
    })
}
