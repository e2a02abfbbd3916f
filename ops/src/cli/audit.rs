//! `tunnelfleet audit`: keys, sshd settings, sockets, failed logins and this tool's own config;
//! here or (`--agent ID`, `--all`) on agents through the coordinator.

use std::process::ExitCode;

use crate::api::ApiClient;

/// `tunnelfleet audit` on this host.
pub(super) async fn local(
    opts: crate::audit::AuditOptions,
    fail_on: crate::audit::Severity,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let report = tokio::task::spawn_blocking(move || crate::audit::run(&opts)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.worst().is_some_and(|w| w >= fail_on) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `audit --agent ID` or `--all` (every connected agent): each agent audits its own host.
/// Exit 1 when a finding reaches `fail_on` on any of them.
pub async fn remote_audit(
    client: &ApiClient,
    agent: Option<String>,
    fail_on: crate::audit::Severity,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let agents = match agent {
        Some(a) => vec![a],
        None => {
            let list: Vec<tunnelfleet_coordinator::admin::AgentSummary> =
                client.get("/v1/agents").await?;
            list.into_iter()
                .filter(|a| a.connected)
                .map(|a| a.id)
                .collect()
        }
    };
    let mut failed = false;
    let mut out = serde_json::Map::new();
    for id in &agents {
        let r: Result<tunnelfleet_protocol::CommandResult, _> = client
            .call::<(), _>("POST", &format!("/v1/agents/{id}/audit"), None)
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                failed = true;
                eprintln!("{id}: {e}");
                continue;
            }
        };
        let report: serde_json::Value = r
            .report
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(serde_json::Value::Null);
        let worst = report["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["severity"].as_str())
            .filter_map(|s| <crate::audit::Severity as clap::ValueEnum>::from_str(s, true).ok())
            .max();
        failed |= !r.ok || worst.is_some_and(|w| w >= fail_on);
        if json {
            out.insert(id.clone(), report);
        } else {
            println!("== agent {id}");
            print!("{}", r.message);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
