//! The admin HTTP API: JSON over HTTP on 127.0.0.1 by default, a bearer token from a file.
//!
//! The CLI's `agents`, `profiles`, `assign` and `rollout` commands are thin clients of this.
//! Every change is durable (flushed) before the response and pushed to connected agents right
//! after. Profiles arrive in the agent's own config form and are validated by the agent's own
//! rules, so a profile the coordinator accepts is one the agent will accept.

use std::collections::BTreeMap;
use std::sync::Arc;
use tunnelfleet_runtime::clock::now_unix_ms;

use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::{Heartbeat, ProfileSpec};

use crate::fleet::Fleet;
use crate::hooks::HookStats;
use crate::metrics::Metrics;
use crate::monitor::EndpointView;
use crate::store::{Alert, Silence};
use crate::store::{Assignment, Event, OmaGroup, Selector, StoreError};
use crate::watch::{Command, WatchHandle};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Admin {
    /// The fleet.
    pub fleet: Arc<Fleet>,
    /// The watcher: OMA commands, endpoint health, hook stats.
    pub watch: WatchHandle,
    /// Whether this coordinator holds the CA key and so can enroll agents with join tokens.
    pub enrollment: bool,
    /// The bearer token every request must carry.
    pub token: Arc<String>,
}

/// The router.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/v1/agents", get(agents))
        .route("/v1/agents/{id}", get(agent))
        .route("/v1/profiles", get(profiles))
        .route(
            "/v1/profiles/{name}",
            get(profile).put(put_profile).delete(delete_profile),
        )
        .route("/v1/assignments", get(assignments).post(assign))
        .route("/v1/rollout", get(rollout))
        .route("/v1/groups", get(groups))
        .route("/v1/groups/{name}", put(put_group).delete(delete_group))
        .route("/v1/groups/{name}/failover", post(group_failover))
        .route("/v1/groups/{name}/failback", post(group_failback))
        .route("/v1/oma", get(oma))
        .route("/v1/oma/drain", post(oma_drain))
        .route("/v1/oma/undrain", post(oma_undrain))
        .route("/v1/alerts", get(alerts))
        .route("/v1/alerts/{id}", get(alert))
        .route("/v1/alerts/{id}/ack", post(ack))
        .route("/v1/silences", get(silences).post(silence))
        .route("/v1/hooks", get(hooks))
        .route("/v1/events", get(events))
        .route("/v1/tokens", get(tokens).post(create_token))
        .route("/v1/tokens/{id}", axum::routing::delete(delete_token))
        .route("/v1/agents/{id}/revoke", post(revoke).delete(unrevoke))
        .route("/v1/revocations", get(revocations))
        .route("/v1/plan", post(plan))
        .route("/v1/history", get(history))
        .route("/v1/history/{version}", get(revision))
        .route("/v1/rollback", post(rollback))
        .route(
            "/v1/agents/{id}/tunnels/{profile}/{action}",
            post(agent_command),
        )
        .route("/v1/agents/{id}/net-check", post(agent_net_check))
        .route("/v1/agents/{id}/audit", post(agent_audit))
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

/// An error as JSON with a status code.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoProfile(_)
            | StoreError::NoGroup(_)
            | StoreError::NoAlert(_)
            | StoreError::NoEndpoint(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
            StoreError::NoToken(_) | StoreError::NoRevision(_) => {
                ApiError(StatusCode::NOT_FOUND, e.to_string())
            }
            StoreError::UnknownGroup { .. } | StoreError::GroupInUse { .. } => {
                ApiError(StatusCode::CONFLICT, e.to_string())
            }
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare without an early exit, so timing does not reveal the token.
    let want = admin.token.as_bytes();
    let same = given.len() == want.len()
        && given
            .as_bytes()
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        ))
    }
}

/// One agent in `agents list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSummary {
    /// Agent id.
    pub id: String,
    /// Connected now.
    pub connected: bool,
    /// Heartbeats arriving (false after three missed).
    pub online: bool,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Last contact (Unix ms).
    pub last_seen_unix_ms: u64,
    /// Fleet version it acknowledged.
    pub applied_version: Option<u64>,
    /// Whether that apply succeeded.
    pub applied_ok: bool,
    /// Tunnels up / total, from the last heartbeat.
    pub tunnels_up: usize,
    /// Tunnels in the last heartbeat.
    pub tunnels: usize,
    /// Heartbeats received on its current connection.
    pub heartbeats: u64,
    /// Revoked: refused at every connection.
    #[serde(default)]
    pub revoked: bool,
}

/// `agents show`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: AgentSummary,
    /// Failures of its last apply.
    pub apply_errors: Vec<String>,
    /// The last heartbeat.
    pub last_heartbeat: Option<Heartbeat>,
}

fn summaries(fleet: &Fleet) -> Result<Vec<AgentDetail>, ApiError> {
    let mut out = Vec::new();
    let revoked: std::collections::BTreeSet<String> = fleet
        .store
        .revocations()?
        .into_iter()
        .map(|r| r.agent)
        .collect();
    for rec in fleet.store.agents()? {
        let link = fleet.links.get(&rec.id);
        let labels = rec.effective_labels();
        let hb = link.as_ref().and_then(|l| l.last_heartbeat.clone());
        let (up, total) = hb
            .as_ref()
            .map(|h| {
                (
                    h.profiles
                        .iter()
                        .filter(|p| p.state == tunnelfleet_protocol::TunnelState::Up)
                        .count(),
                    h.profiles.len(),
                )
            })
            .unwrap_or((0, 0));
        out.push(AgentDetail {
            summary: AgentSummary {
                id: rec.id.clone(),
                connected: link.as_ref().is_some_and(|l| l.connected),
                online: link.as_ref().is_some_and(|l| l.connected && l.online),
                labels,
                last_seen_unix_ms: rec.last_seen_unix_ms,
                applied_version: rec.applied_version,
                applied_ok: rec.applied_ok,
                tunnels_up: up,
                tunnels: total,
                heartbeats: link.as_ref().map(|l| l.heartbeats).unwrap_or(0),
                revoked: revoked.contains(&rec.id),
            },
            apply_errors: rec.apply_errors.clone(),
            last_heartbeat: hb,
        });
    }
    Ok(out)
}

async fn agents(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Vec<AgentSummary>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(
        summaries(&a.fleet)?
            .into_iter()
            .map(|d| d.summary)
            .collect(),
    ))
}

async fn agent(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<AgentDetail>, ApiError> {
    authorize(&a, &h)?;
    summaries(&a.fleet)?
        .into_iter()
        .find(|d| d.summary.id == id)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no agent {id:?}")))
}

async fn profiles(
    State(a): State<Admin>,
    h: HeaderMap,
) -> Result<Json<Vec<ProfileSpec>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.profiles()?))
}

async fn profile(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<ProfileSpec>, ApiError> {
    authorize(&a, &h)?;
    a.fleet
        .store
        .profiles()?
        .into_iter()
        .find(|p| p.name == name)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no profile named {name:?}")))
}

/// The answer to a change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Changed {
    /// The new fleet version.
    pub version: u64,
    /// Agents the change was pushed to.
    pub pushed_to: Vec<String>,
}

async fn put_profile(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(spec): Json<ProfileSpec>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    if spec.name != name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body names profile {:?}, the URL {name:?}", spec.name),
        ));
    }
    // A group profile is checked as the agents will get it: with the group's endpoints.
    let resolved = match &spec.group {
        Some(g) => {
            let group = a
                .fleet
                .store
                .group(g)?
                .ok_or_else(|| StoreError::UnknownGroup {
                    profile: name.clone(),
                    group: g.clone(),
                })?;
            spec.resolved(&group.ordered())
        }
        None => spec.clone(),
    };
    resolved.validate_runnable().map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            e.within(&format!("profile.{name}")).to_string(),
        )
    })?;
    let version = a.fleet.store.put_profile(&spec).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn delete_profile(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    let version = a.fleet.store.delete_profile(&name).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn assignments(
    State(a): State<Admin>,
    h: HeaderMap,
) -> Result<Json<Vec<Assignment>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.assignments()?))
}

/// `POST /v1/assignments`: a profile to one agent or to every agent with these labels.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssignRequest {
    /// Profile name.
    pub profile: String,
    /// One agent.
    pub agent: Option<String>,
    /// Or every agent with all these labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

async fn assign(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(req): Json<AssignRequest>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    let selector = match (req.agent, req.labels.is_empty()) {
        (Some(id), true) => Selector::Agent(id),
        (None, false) => Selector::Labels(req.labels),
        _ => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "give either an agent or labels".into(),
            ));
        }
    };
    let version = a
        .fleet
        .store
        .assign(&Assignment {
            profile: req.profile,
            selector,
        })
        .await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

/// The rollout of the current version: who applied it, who failed and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    /// The current fleet version.
    pub version: u64,
    /// Agents at this version with every forward applied.
    pub applied: Vec<String>,
    /// Agents at this version with failures, and the failures.
    pub failed: BTreeMap<String, Vec<String>>,
    /// Agents not at this version yet (offline, or still applying).
    pub pending: Vec<String>,
}

async fn rollout(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Rollout>, ApiError> {
    authorize(&a, &h)?;
    let version = a.fleet.store.fleet_version()?;
    let mut r = Rollout {
        version,
        applied: vec![],
        failed: BTreeMap::new(),
        pending: vec![],
    };
    for rec in a.fleet.store.agents()? {
        match rec.applied_version {
            Some(v) if v == version && rec.applied_ok => r.applied.push(rec.id),
            Some(v) if v == version => {
                r.failed.insert(rec.id, rec.apply_errors);
            }
            _ => r.pending.push(rec.id),
        }
    }
    Ok(Json(r))
}

async fn groups(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Vec<OmaGroup>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.groups()?))
}

fn watcher(a: &Admin) -> Result<&WatchHandle, ApiError> {
    Ok(&a.watch)
}

async fn put_group(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(group): Json<OmaGroup>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    if group.name != name {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the body names group {:?}, the URL {name:?}", group.name),
        ));
    }
    group
        .validate()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("group.{name}.{e}")))?;
    let version = a.fleet.store.put_group(&group).await?;
    if let Ok(w) = watcher(&a) {
        w.command(Command::GroupsChanged)
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    }
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn delete_group(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    let version = a.fleet.store.delete_group(&name).await?;
    if let Ok(w) = watcher(&a) {
        w.command(Command::GroupsChanged)
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    }
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

/// The answer to an OMA command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    /// What happened.
    pub message: String,
}

async fn run_command(a: &Admin, cmd: Command) -> Result<Json<Done>, ApiError> {
    watcher(a)?
        .command(cmd)
        .await
        .map(|message| Json(Done { message }))
        .map_err(|e| {
            let status = if e.starts_with("no ") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::CONFLICT
            };
            ApiError(status, e)
        })
}

async fn group_failover(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Done>, ApiError> {
    authorize(&a, &h)?;
    run_command(&a, Command::Failover(name)).await
}

async fn group_failback(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Done>, ApiError> {
    authorize(&a, &h)?;
    run_command(&a, Command::Failback(name)).await
}

/// Body of `oma drain | undrain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointRequest {
    /// `host:port`.
    pub endpoint: String,
}

async fn oma_drain(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(r): Json<EndpointRequest>,
) -> Result<Json<Done>, ApiError> {
    authorize(&a, &h)?;
    run_command(&a, Command::Drain(r.endpoint)).await
}

async fn oma_undrain(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(r): Json<EndpointRequest>,
) -> Result<Json<Done>, ApiError> {
    authorize(&a, &h)?;
    run_command(&a, Command::Undrain(r.endpoint)).await
}

async fn oma(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Vec<EndpointView>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(watcher(&a)?.view()))
}

/// `?all=true` includes resolved alerts.
#[derive(Debug, Deserialize)]
struct AlertsQuery {
    #[serde(default)]
    all: bool,
}

async fn alerts(
    State(a): State<Admin>,
    h: HeaderMap,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<Vec<Alert>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.alerts(q.all)?))
}

async fn alert(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Json<Alert>, ApiError> {
    authorize(&a, &h)?;
    a.fleet
        .store
        .alert(id)?
        .map(Json)
        .ok_or_else(|| StoreError::NoAlert(id).into())
}

/// Body of `alerts ack`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckRequest {
    /// Who.
    pub by: String,
}

async fn ack(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<u64>,
    Json(r): Json<AckRequest>,
) -> Result<Json<Alert>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.ack_alert(id, &r.by).await?))
}

async fn silences(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Vec<Silence>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.silences(now_unix_ms())?))
}

/// Body of `alerts silence`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SilenceRequest {
    /// Glob on `kind:subject`.
    pub matcher: String,
    /// For how many seconds.
    pub for_s: u64,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

async fn silence(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(r): Json<SilenceRequest>,
) -> Result<Json<Silence>, ApiError> {
    authorize(&a, &h)?;
    if r.matcher.is_empty() || r.for_s == 0 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "a silence needs a matcher and a duration".into(),
        ));
    }
    Ok(Json(
        a.fleet
            .store
            .add_silence(Silence {
                id: 0,
                matcher: r.matcher,
                until_unix_ms: now_unix_ms() + r.for_s.saturating_mul(1000),
                comment: r.comment,
            })
            .await?,
    ))
}

async fn hooks(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Vec<HookStats>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(watcher(&a)?.outbox.stats()))
}

async fn events(State(a): State<Admin>, h: HeaderMap) -> Result<Json<Vec<Event>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.events(200)?))
}

/// Body of `token create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    /// Labels the enrolled agent gets.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Lifetime in seconds.
    pub ttl_s: u64,
    /// Restrict the token to one agent id (needed to re-enroll a known agent).
    #[serde(default)]
    pub agent: Option<String>,
}

/// Answer of `token create`: the secret, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    /// The secret to give the agent (not stored by the coordinator).
    pub token: String,
    /// The token as stored.
    #[serde(flatten)]
    pub info: crate::enroll::JoinToken,
}

/// Longest a join token may live: a week.
const MAX_TOKEN_TTL_S: u64 = 7 * 24 * 3600;

async fn create_token(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(r): Json<TokenRequest>,
) -> Result<Json<TokenCreated>, ApiError> {
    authorize(&a, &h)?;
    if r.ttl_s == 0 || r.ttl_s > MAX_TOKEN_TTL_S {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("ttl: between 1 s and {MAX_TOKEN_TTL_S} s (a week)"),
        ));
    }
    if let Some(agent) = &r.agent {
        crate::pki::check_agent_id(agent)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    }
    if !a.enrollment {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "enrollment is not enabled on this coordinator: its PKI directory holds no CA key"
                .into(),
        ));
    }
    let (secret, hash, id) = crate::enroll::new_token();
    let now = now_unix_ms();
    let info = crate::enroll::JoinToken {
        id,
        labels: r.labels,
        agent: r.agent,
        created_unix_ms: now,
        expires_unix_ms: now + r.ttl_s * 1000,
        used_by: None,
        used_unix_ms: None,
    };
    a.fleet.store.put_token(&hash, &info).await?;
    Ok(Json(TokenCreated {
        token: secret,
        info,
    }))
}

async fn tokens(
    State(a): State<Admin>,
    h: HeaderMap,
) -> Result<Json<Vec<crate::enroll::JoinToken>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.tokens()?))
}

async fn delete_token(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Done>, ApiError> {
    authorize(&a, &h)?;
    a.fleet.store.delete_token(&id).await?;
    Ok(Json(Done {
        message: format!("join token {id} deleted"),
    }))
}

/// Body of `agents revoke`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Why (kept with the revocation, shown to the agent).
    #[serde(default)]
    pub reason: String,
}

async fn revoke(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<String>,
    Json(r): Json<RevokeRequest>,
) -> Result<Json<crate::enroll::Revocation>, ApiError> {
    authorize(&a, &h)?;
    crate::pki::check_agent_id(&id)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let reason = if r.reason.is_empty() {
        "revoked by an operator".to_string()
    } else {
        r.reason
    };
    Ok(Json(a.fleet.revoke(&id, &reason).await?))
}

async fn unrevoke(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Done>, ApiError> {
    authorize(&a, &h)?;
    if a.fleet.store.unrevoke(&id).await? {
        Ok(Json(Done {
            message: format!("agent {id} may connect again"),
        }))
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("agent {id} is not revoked"),
        ))
    }
}

async fn revocations(
    State(a): State<Admin>,
    h: HeaderMap,
) -> Result<Json<Vec<crate::enroll::Revocation>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.revocations()?))
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

async fn plan(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(proposed): Json<Vec<ProfileSpec>>,
) -> Result<Json<crate::plan::Plan>, ApiError> {
    authorize(&a, &h)?;
    let store = &a.fleet.store;
    let agents: Vec<(String, BTreeMap<String, String>)> = store
        .agents()?
        .into_iter()
        .map(|r| {
            let labels = r.effective_labels();
            (r.id, labels)
        })
        .collect();
    Ok(Json(crate::plan::plan(
        store.fleet_version()?,
        &store.profiles()?,
        &store.assignments()?,
        &agents,
        &proposed,
    )))
}

/// `?limit=` of `profiles history`.
#[derive(Debug, Deserialize)]
struct HistoryQuery {
    #[serde(default = "default_history")]
    limit: usize,
}

fn default_history() -> usize {
    20
}

async fn history(
    State(a): State<Admin>,
    h: HeaderMap,
    Query(q): Query<HistoryQuery>,
) -> Result<Json<Vec<crate::store::RevisionSummary>>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.history(q.limit)?))
}

async fn revision(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(version): Path<u64>,
) -> Result<Json<crate::store::Revision>, ApiError> {
    authorize(&a, &h)?;
    Ok(Json(a.fleet.store.revision(version)?))
}

/// Body of `profiles rollback`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    /// The version whose profiles and assignments to restore.
    pub version: u64,
}

async fn rollback(
    State(a): State<Admin>,
    h: HeaderMap,
    Json(r): Json<RollbackRequest>,
) -> Result<Json<Changed>, ApiError> {
    authorize(&a, &h)?;
    let version = a.fleet.store.rollback(r.version).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn agent_net_check(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    authorize(&a, &h)?;
    on_agent(&a, &id, tunnelfleet_protocol::CommandAction::NetCheck, "").await
}

async fn agent_audit(
    State(a): State<Admin>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    authorize(&a, &h)?;
    on_agent(&a, &id, tunnelfleet_protocol::CommandAction::Audit, "").await
}

/// Runs a command on a connected agent; not connected or no answer is a 409.
async fn on_agent(
    a: &Admin,
    id: &str,
    action: tunnelfleet_protocol::CommandAction,
    profile: &str,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    a.fleet
        .command(id, action, profile)
        .await
        .map(Json)
        .map_err(|e| ApiError(StatusCode::CONFLICT, e.to_string()))
}

async fn agent_command(
    State(a): State<Admin>,
    h: HeaderMap,
    Path((id, profile, action)): Path<(String, String, String)>,
) -> Result<Json<tunnelfleet_protocol::CommandResult>, ApiError> {
    use tunnelfleet_protocol::CommandAction;
    authorize(&a, &h)?;
    let action = match action.as_str() {
        "start" => CommandAction::Start,
        "stop" => CommandAction::Stop,
        "restart" => CommandAction::Restart,
        "health" => CommandAction::Health,
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("{other:?}: expected start, stop, restart or health"),
            ));
        }
    };
    on_agent(&a, &id, action, &profile).await
}
