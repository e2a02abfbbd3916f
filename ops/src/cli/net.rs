//! `tunnelfleet net …`: DNS, latency, ports and SSH banners, and bandwidth through a tunnel;
//! here or (`--agent ID`) on another agent through the coordinator.

use std::process::ExitCode;

use super::args::NetAction;
use crate::api::ApiClient;
use crate::render;

pub(super) async fn net(action: NetAction, json: bool) -> anyhow::Result<ExitCode> {
    match action {
        NetAction::Check {
            agent: Some(agent),
            api,
            ..
        } => remote_net_check(&api.client()?, &agent, json).await,
        NetAction::Check {
            targets,
            ports,
            ssh_ports,
            probes,
            timeout,
            ..
        } => {
            let opts = crate::net::CheckOptions {
                ports,
                ssh_ports,
                probes: probes.max(1),
                timeout,
            };
            let mut reports = Vec::new();
            for t in &targets {
                reports.push(crate::net::check(t, &opts).await);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                print!("{}", crate::net::render(&reports));
            }
            Ok(if reports.iter().all(|r| r.ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        NetAction::Bandwidth {
            profile,
            url,
            socket,
            config,
            timeout,
        } => {
            let socket = super::tunnels::control_socket(socket, &config)?;
            let r = crate::net::bandwidth(&socket, &profile, url.as_deref(), timeout).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: {} in {:.2}s = {:.1} Mbit/s through {} (agent counted {} into the forward)",
                    r.url,
                    render::bytes(r.bytes),
                    r.seconds,
                    r.mbit_s,
                    r.forward,
                    render::bytes(r.tunnel_bytes_in)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `net check --agent ID`: the agent checks its OMA endpoints (DNS, latency, SSH banner).
pub async fn remote_net_check(
    client: &ApiClient,
    agent: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let r: tunnelfleet_protocol::CommandResult = client
        .call::<(), _>("POST", &format!("/v1/agents/{agent}/net-check"), None)
        .await?;
    if json {
        println!("{}", r.report.as_deref().unwrap_or("null"));
    } else {
        println!("from agent {agent}:");
        print!("{}", r.message);
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
