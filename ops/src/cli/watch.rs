//! `tunnelfleet watch`: the fleet on one screen, refreshed.

use std::process::ExitCode;

use serde::Deserialize;
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::store::Alert;

use crate::api::ApiClient;
use crate::render;

/// What `tunnelfleet watch` shows each refresh.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct FleetView {
    /// Every agent.
    pub agents: Vec<tunnelfleet_coordinator::admin::AgentSummary>,
    /// Every OMA endpoint.
    pub oma: Vec<EndpointView>,
    /// Alerts firing.
    pub alerts: Vec<Alert>,
}

/// Reads the fleet once.
pub async fn fleet_view(client: &ApiClient) -> anyhow::Result<FleetView> {
    Ok(FleetView {
        agents: client.get("/v1/agents").await?,
        oma: client.get("/v1/oma").await?,
        alerts: client.get("/v1/alerts").await?,
    })
}

/// The view as text: a summary line, firing alerts, OMA endpoints, then agents that need
/// attention first.
pub fn render_view(v: &FleetView) -> String {
    let online = v.agents.iter().filter(|a| a.online).count();
    let tunnels: usize = v.agents.iter().map(|a| a.tunnels).sum();
    let up: usize = v.agents.iter().map(|a| a.tunnels_up).sum();
    let mut out = format!(
        "agents {online}/{} online   tunnels {up}/{tunnels} up   alerts firing {}\n\n",
        v.agents.len(),
        v.alerts.len()
    );
    if !v.alerts.is_empty() {
        out.push_str(&render::alerts_table(&v.alerts));
        out.push('\n');
    }
    if !v.oma.is_empty() {
        out.push_str(&render::oma_table(&v.oma));
        out.push('\n');
    }
    let mut agents = v.agents.clone();
    // Trouble first: offline, then tunnels down, then by id.
    agents.sort_by_key(|a| (a.online, a.tunnels_up == a.tunnels, a.id.clone()));
    out.push_str(&render::fleet_agents(&agents));
    out
}

/// `tunnelfleet watch`: the fleet refreshed in place until Ctrl+C (or `count` refreshes).
pub async fn watch(
    client: &ApiClient,
    interval: std::time::Duration,
    count: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    render::live(interval, count, json, || async {
        let v = fleet_view(client).await?;
        let screen = format!(
            "tunnelfleet watch (every {}, Ctrl+C to stop)\n\n{}",
            humantime::format_duration(interval),
            render_view(&v)
        );
        Ok((serde_json::to_string(&v)?, screen))
    })
    .await
}
