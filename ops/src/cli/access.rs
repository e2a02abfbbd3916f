//! `tunnelfleet token …` and `tunnelfleet agents revoke|unrevoke`: who may join the fleet;
//! `tunnelfleet admin-token …` and `audit-log`: who may run it, and what they did.
//!
//! A join or admin token is shown once, when it is made; the coordinator keeps only its hash.
//! The commands are thin clients of the admin API.

use std::process::ExitCode;

use std::collections::BTreeMap;
use std::time::Duration;

use tunnelfleet_coordinator::admin::{
    AdminTokenCreated, AdminTokenRequest, Done, RevokeRequest, TokenCreated, TokenRequest,
};
use tunnelfleet_coordinator::store::{AdminToken, AuditEntry, JoinToken, Revocation};
use tunnelfleet_runtime::clock::now_unix_ms;

use super::args::{AdminTokenAction, TokenAction};
use crate::api::ApiClient;
use crate::render;

/// Runs a `token` command.
pub async fn token(api: &ApiClient, action: TokenAction, json: bool) -> anyhow::Result<ExitCode> {
    match action {
        TokenAction::Create { labels, ttl, agent } => {
            let req = TokenRequest {
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                ttl_s: ttl.as_secs().max(1),
                agent,
            };
            let t: TokenCreated = api.call("POST", "/v1/tokens", Some(&req)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "join token {} for {}, labels {}, expires in {} — shown once; give it to the agent as coordinator.enroll_token_file (mode 0600)",
                    t.info.id,
                    t.info.agent.as_deref().unwrap_or("any new agent"),
                    labels_text(&t.info.labels),
                    humantime::format_duration(ttl)
                );
            }
        }
        TokenAction::List => {
            let list: Vec<JoinToken> = api.get("/v1/tokens").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut t = render::table(&["TOKEN", "STATE", "AGENT", "LABELS", "CREATED"]);
                let now = now_unix_ms();
                for k in &list {
                    let state = match (&k.used_by, now >= k.expires_unix_ms) {
                        (Some(by), _) => format!("used by {by}"),
                        (None, true) => "expired".into(),
                        (None, false) => format!(
                            "unused, expires in {}",
                            humantime::format_duration(Duration::from_secs(
                                (k.expires_unix_ms - now) / 1000
                            ))
                        ),
                    };
                    t.add_row(vec![
                        k.id.clone(),
                        state,
                        k.agent.clone().unwrap_or_else(|| "any".into()),
                        labels_text(&k.labels),
                        format!("{} ago", render::ago(k.created_unix_ms)),
                    ]);
                }
                println!("{t}");
            }
        }
        TokenAction::Delete { id } => {
            let d: Done = api
                .call::<(), _>("DELETE", &format!("/v1/tokens/{id}"), None)
                .await?;
            print_done(&d, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `agents revoke ID`: durable, and the agent's connection is closed at once.
pub async fn revoke(
    api: &ApiClient,
    id: &str,
    reason: String,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let r: Revocation = api
        .call(
            "POST",
            &format!("/v1/agents/{id}/revoke"),
            Some(&RevokeRequest { reason }),
        )
        .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "agent {} revoked: {} (its connection was closed; it is refused from now on)",
            r.agent, r.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `agents unrevoke ID`.
pub async fn unrevoke(api: &ApiClient, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let d: Done = api
        .call::<(), _>("DELETE", &format!("/v1/agents/{id}/revoke"), None)
        .await?;
    print_done(&d, json)?;
    Ok(ExitCode::SUCCESS)
}

fn print_done(d: &Done, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(d)?);
    } else {
        println!("{}", d.message);
    }
    Ok(())
}

fn labels_text(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs an `admin-token` command.
pub async fn admin_token(
    api: &ApiClient,
    action: AdminTokenAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match action {
        AdminTokenAction::Create { name, role } => {
            let t: AdminTokenCreated = api
                .call(
                    "POST",
                    "/v1/admin-tokens",
                    Some(&AdminTokenRequest { name, role }),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "admin token {:?} with role {} — shown once; keep it in a file of mode 0600 (--token-file)",
                    t.info.name, t.info.role
                );
            }
        }
        AdminTokenAction::List => {
            let list: Vec<AdminToken> = api.get("/v1/admin-tokens").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut t = render::table(&["NAME", "ROLE", "CREATED", "BY"]);
                for k in &list {
                    t.add_row(vec![
                        k.name.clone(),
                        k.role.to_string(),
                        format!("{} ago", render::ago(k.created_unix_ms)),
                        k.created_by.clone(),
                    ]);
                }
                println!("{t}");
            }
        }
        AdminTokenAction::Revoke { name } => {
            let t: AdminToken = api
                .call::<(), _>("DELETE", &format!("/v1/admin-tokens/{name}"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!(
                    "admin token {:?} ({}) revoked: refused from now on",
                    t.name, t.role
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit-log`: the changes of the last `since`, oldest first.
pub async fn audit_log(
    api: &ApiClient,
    since: Duration,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let from = now_unix_ms().saturating_sub(since.as_millis() as u64);
    let list: Vec<AuditEntry> = api
        .get(&format!("/v1/audit?since_unix_ms={from}&limit={limit}"))
        .await?;
    if json {
        // One entry per line, for shippers and jq.
        for e in &list {
            println!("{}", serde_json::to_string(e)?);
        }
    } else {
        let mut t = render::table(&["WHEN", "TOKEN", "ROLE", "REQUEST", "STATUS", "RESULT"]);
        for e in &list {
            t.add_row(vec![
                format!("{} ago", render::ago(e.at_unix_ms)),
                e.token.clone(),
                e.role.to_string(),
                e.request.clone(),
                e.status.to_string(),
                e.result.clone(),
            ]);
        }
        println!("{t}");
    }
    Ok(ExitCode::SUCCESS)
}
