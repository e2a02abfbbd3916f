//! `/v1/groups`, `/v1/oma`: OMA groups, their endpoints' health, and the operator's drain,
//! failover and failback (carried out by the watcher, the only writer of an active endpoint).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::Admin;
use super::error::ApiError;
use super::profiles::Changed;
use crate::monitor::EndpointView;
use crate::store::OmaGroup;
use crate::watch::{Command, OmaCommandError};

/// The routes of this resource.
pub(super) fn routes() -> Router<Admin> {
    Router::new()
        .route("/v1/groups", get(groups))
        .route("/v1/groups/{name}", put(put_group).delete(delete_group))
        .route("/v1/groups/{name}/failover", post(group_failover))
        .route("/v1/groups/{name}/failback", post(group_failback))
        .route("/v1/groups/{name}/ssh", get(group_ssh))
        .route("/v1/oma", get(oma))
        .route("/v1/oma/drain", post(oma_drain))
        .route("/v1/oma/undrain", post(oma_undrain))
        .route("/v1/oma/host-cert", post(oma_host_cert))
}

/// What the OMAs of a group need to let the fleet's agents in (`tunnelfleet oma sync`): the SSH
/// user CA they trust, each agent's principal line with its ports, and the revoked keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshAccess {
    /// The group.
    pub group: String,
    /// The fleet version the lines were worked out at.
    pub version: u64,
    /// The SSH user CA's public key line (`TrustedUserCAKeys`); none when the coordinator
    /// has no SSH CA.
    pub ca_public_key: Option<String>,
    /// `AuthorizedPrincipalsFile` lines.
    pub principals: Vec<String>,
    /// `RevokedKeys` lines: the certified keys of revoked agents.
    pub revoked_keys: Vec<String>,
    /// The revoked agents (certificate key ids): `oma sync` ends the sessions they still hold.
    #[serde(default)]
    pub revoked_agents: Vec<String>,
}

async fn group_ssh(
    State(a): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<SshAccess>, ApiError> {
    let store = &a.fleet.store;
    if store.group(&name)?.is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no OMA group {name:?}"),
        ));
    }
    let snapshot = store.snapshot()?;
    let sets: Vec<(String, tunnelfleet_protocol::ProfileSet)> = store
        .agent_labels()?
        .into_iter()
        .map(|(id, labels)| {
            let set = snapshot.set_for(&id, &labels);
            (id, set)
        })
        .collect();
    let agents: Vec<crate::sshd_access::AgentAccess<'_>> = sets
        .iter()
        .map(|(id, set)| crate::sshd_access::AgentAccess { id, set })
        .collect();
    let revoked = store.revoked_agents()?;
    let mut revoked_keys = Vec::new();
    for id in &revoked {
        if let Some(cert) = store.ssh_cert(id)? {
            revoked_keys.push(format!("{} {id}", cert.public_key.trim()));
        }
    }
    Ok(Json(SshAccess {
        principals: crate::sshd_access::principals(&name, &agents, &revoked),
        group: name,
        version: snapshot.version,
        ca_public_key: a.ssh_ca_public.as_deref().cloned(),
        revoked_keys,
        revoked_agents: revoked.into_iter().collect(),
    }))
}

async fn groups(State(a): State<Admin>) -> Result<Json<Vec<OmaGroup>>, ApiError> {
    Ok(Json(a.fleet.store.groups()?))
}

async fn put_group(
    State(a): State<Admin>,
    Path(name): Path<String>,
    Json(group): Json<OmaGroup>,
) -> Result<Json<Changed>, ApiError> {
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
    groups_changed(&a).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

async fn delete_group(
    State(a): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<Changed>, ApiError> {
    let version = a.fleet.store.delete_group(&name).await?;
    groups_changed(&a).await?;
    let pushed_to = a.fleet.push_changed()?;
    Ok(Json(Changed { version, pushed_to }))
}

/// The answer to an OMA command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    /// What happened.
    pub message: String,
}

/// Tells the watcher the groups changed. On a coordinator that does not lead there is none:
/// the leader reads the groups again within seconds on its own.
async fn groups_changed(a: &Admin) -> Result<(), ApiError> {
    match a.watch.command(Command::GroupsChanged).await {
        Ok(_) | Err(OmaCommandError::NotLeader) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn run_command(a: &Admin, cmd: Command) -> Result<Json<Done>, ApiError> {
    match a.watch.command(cmd).await {
        Ok(message) => Ok(Json(Done { message })),
        Err(OmaCommandError::NotLeader) => Err(not_leader(a)),
        Err(e) => Err(e.into()),
    }
}

/// 421 naming the coordinator that leads and its admin API, where the command must go; 503
/// while nobody leads.
fn not_leader(a: &Admin) -> ApiError {
    match a.fleet.store.leader().ok().flatten() {
        Some(l) => ApiError::elsewhere(
            &a.fleet.store,
            &l,
            &format!("coordinator {l} leads the fleet and decides OMA moves"),
        ),
        None => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no coordinator leads the fleet right now (an election is under way): try again in a few seconds".into(),
        ),
    }
}

async fn group_failover(
    State(a): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<Done>, ApiError> {
    run_command(&a, Command::Failover(name)).await
}

async fn group_failback(
    State(a): State<Admin>,
    Path(name): Path<String>,
) -> Result<Json<Done>, ApiError> {
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
    Json(r): Json<EndpointRequest>,
) -> Result<Json<Done>, ApiError> {
    run_command(&a, Command::Drain(r.endpoint)).await
}

async fn oma_undrain(
    State(a): State<Admin>,
    Json(r): Json<EndpointRequest>,
) -> Result<Json<Done>, ApiError> {
    run_command(&a, Command::Undrain(r.endpoint)).await
}

/// `POST /v1/oma/host-cert`: an OMA's host key to certify with the fleet's SSH host CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostCertRequest {
    /// The endpoint agents reach the OMA at (`host:port`, listed in an OMA group): the
    /// certificate is valid for its host name.
    pub endpoint: String,
    /// The OMA's ed25519 host public key line (`/etc/ssh/ssh_host_ed25519_key.pub`).
    pub public_key: String,
    /// Validity in seconds (default a year, at most five).
    #[serde(default)]
    pub validity_s: Option<u64>,
}

/// The host certificate issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostCert {
    /// One OpenSSH line, for sshd's `HostCertificate`.
    pub certificate: String,
    /// Its serial.
    pub serial: u64,
    /// The names it is valid for.
    pub principals: Vec<String>,
    /// Until when (Unix seconds).
    pub valid_before_unix_s: u64,
    /// The host CA's fingerprint.
    pub ca_fingerprint: String,
}

async fn oma_host_cert(
    State(a): State<Admin>,
    Json(r): Json<HostCertRequest>,
) -> Result<Json<HostCert>, ApiError> {
    let bad = |why: String| ApiError(StatusCode::BAD_REQUEST, why);
    let Some(ca) = &a.ssh_host_ca else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "this coordinator has no SSH host CA (tunnelfleet pki ssh-ca on it)".into(),
        ));
    };
    // Only the fleet's own OMAs, by the name agents dial.
    let listed = a
        .fleet
        .store
        .groups()?
        .iter()
        .any(|g| g.endpoints.contains(&r.endpoint));
    if !listed {
        return Err(bad(format!(
            "endpoint {:?} is in no OMA group: host certificates are for the fleet's OMAs",
            r.endpoint
        )));
    }
    let (host, _) = tunnelfleet_protocol::addr::split_host_port(&r.endpoint, Some(22))
        .map_err(|e| bad(format!("endpoint {:?}: {e}", r.endpoint)))?;
    let validity = std::time::Duration::from_secs(
        r.validity_s
            .unwrap_or(crate::sshca::DEFAULT_HOST_VALIDITY.as_secs()),
    );
    let principals = vec![host];
    let serial = a.fleet.store.next_ssh_serial().await?;
    let issued = ca
        .certify_host(&crate::sshca::HostCertRequest {
            public_key: &r.public_key,
            principals: &principals,
            serial,
            now_unix: tunnelfleet_runtime::clock::now_unix_ms() / 1000,
            validity,
        })
        .map_err(|e| bad(format!("endpoint {}: {e}", r.endpoint)))?;
    tracing::info!(endpoint = %r.endpoint, serial, key = %issued.key_fingerprint, "OMA host key certified");
    Ok(Json(HostCert {
        certificate: issued.certificate,
        serial,
        principals,
        valid_before_unix_s: issued.valid_before,
        ca_fingerprint: ca.fingerprint(),
    }))
}

async fn oma(State(a): State<Admin>) -> Result<Json<Vec<EndpointView>>, ApiError> {
    Ok(Json(a.watch.view()))
}
