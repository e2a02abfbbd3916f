//! `tunnelfleet agents …`: the fleet's agents through the coordinator.

use std::process::ExitCode;

use super::args::{AgentsAction, ApiArgs};
use crate::render;

pub(super) async fn fleet_agents(
    api: &ApiArgs,
    action: AgentsAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = api.client()?;
    match action {
        AgentsAction::List => {
            let list: Vec<tunnelfleet_coordinator::admin::AgentSummary> =
                client.get("/v1/agents").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", render::fleet_agents(&list));
            }
        }
        AgentsAction::Show { id } => {
            let a: serde_json::Value = client.get(&format!("/v1/agents/{id}")).await?;
            println!("{}", serde_json::to_string_pretty(&a)?);
        }
        AgentsAction::Revoke { id, reason } => {
            return super::access::revoke(&client, &id, reason, json).await;
        }
        AgentsAction::Unrevoke { id } => {
            return super::access::unrevoke(&client, &id, json).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}
