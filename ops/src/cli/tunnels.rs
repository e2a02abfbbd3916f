//! `tunnelfleet tunnels …`: the local agent's tunnels through its control socket, or (`--agent
//! ID`) another agent's through the coordinator.

use std::process::ExitCode;

use anyhow::Context;

use std::path::PathBuf;

use tunnelfleet_agent::config::AgentConfig;
use tunnelfleet_agent::control;
use tunnelfleet_agent::status::AgentStatus;
use tunnelfleet_agent::supervisor::{Request, Response};

use super::args::{Target, TunnelAction};
use crate::api::ApiClient;
use crate::render;

/// The agent's socket: given, or read from its config.
pub(super) fn control_socket(
    socket: Option<PathBuf>,
    config: &std::path::Path,
) -> anyhow::Result<PathBuf> {
    match socket {
        Some(s) => Ok(s),
        None => Ok(AgentConfig::load(config)
            .with_context(|| "finding the agent's control socket (or pass --socket)")?
            .agent
            .control_socket),
    }
}

pub(super) async fn tunnels(
    socket: &std::path::Path,
    action: TunnelAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let req = match action {
        TunnelAction::List | TunnelAction::Status => {
            let status = status(socket).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else if matches!(action, TunnelAction::List) {
                print!("{}", render::list(&status));
            } else {
                print!("{}", render::status(&status));
            }
            return Ok(ExitCode::SUCCESS);
        }
        TunnelAction::Monitor { interval, count } => {
            return monitor(socket, interval, count, json).await;
        }
        TunnelAction::Start(ref t) | TunnelAction::Stop(ref t) if t.all => {
            let start = matches!(action, TunnelAction::Start(_));
            let mut code = ExitCode::SUCCESS;
            for p in status(socket).await?.profiles {
                let req = if start {
                    Request::Start { name: p.name }
                } else {
                    Request::Stop { name: p.name }
                };
                if print_response(control::call(socket, &req).await?, json)? != ExitCode::SUCCESS {
                    code = ExitCode::FAILURE;
                }
            }
            return Ok(code);
        }
        TunnelAction::Start(t) => Request::Start {
            name: t.name.unwrap_or_default(),
        },
        TunnelAction::Stop(t) => Request::Stop {
            name: t.name.unwrap_or_default(),
        },
        TunnelAction::Restart { name } => Request::Restart { name },
        TunnelAction::Health { name } => Request::Health { name },
    };
    print_response(control::call(socket, &req).await?, json)
}

async fn status(socket: &std::path::Path) -> anyhow::Result<AgentStatus> {
    match control::call(socket, &Request::Status).await? {
        Response::Status(s) => Ok(s),
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
}

/// Prints a command's answer; the exit code says whether it succeeded.
fn print_response(resp: Response, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(&resp)?);
    }
    Ok(match resp {
        Response::Ok { message } => {
            if !json {
                println!("{message}");
            }
            ExitCode::SUCCESS
        }
        Response::Health(r) => {
            if !json {
                println!("{}", render::health(&r));
            }
            if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Response::Status(_) => ExitCode::SUCCESS,
        Response::Error { message } => {
            eprintln!("tunnelfleet: {message}");
            ExitCode::FAILURE
        }
    })
}

async fn monitor(
    socket: &std::path::Path,
    interval: std::time::Duration,
    count: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    render::live(interval, count, json, || async {
        let s = status(socket).await?;
        let screen = format!(
            "tunnelfleet monitor: agent pid {} (every {}, Ctrl+C to stop)\n\n{}",
            s.pid,
            humantime::format_duration(interval),
            render::status(&s)
        );
        Ok((serde_json::to_string(&s)?, screen))
    })
    .await
}

/// What `tunnels … --agent ID` does through the coordinator.
#[derive(Debug, Clone)]
pub enum RemoteAction {
    /// `list` / `status`: the agent's last heartbeat.
    Status,
    /// `start|stop|restart|health NAME`, run on the agent.
    Command(tunnelfleet_protocol::CommandAction, String),
}

/// A `tunnels` action as the coordinator can carry it to another agent.
pub(super) fn remote_action(a: TunnelAction) -> anyhow::Result<RemoteAction> {
    use RemoteAction;
    use tunnelfleet_protocol::CommandAction;
    let one = |t: Target, what: &str| match (t.name, t.all) {
        (Some(n), false) => Ok(n),
        _ => Err(anyhow::anyhow!(
            "tunnels {what} --all --agent: name one profile (tunnels list --agent shows them)"
        )),
    };
    Ok(match a {
        TunnelAction::List | TunnelAction::Status => RemoteAction::Status,
        TunnelAction::Start(t) => RemoteAction::Command(CommandAction::Start, one(t, "start")?),
        TunnelAction::Stop(t) => RemoteAction::Command(CommandAction::Stop, one(t, "stop")?),
        TunnelAction::Restart { name } => RemoteAction::Command(CommandAction::Restart, name),
        TunnelAction::Health { name } => RemoteAction::Command(CommandAction::Health, name),
        TunnelAction::Monitor { .. } => {
            anyhow::bail!("tunnels monitor --agent: use `tunnelfleet watch` for the fleet")
        }
    })
}

/// `tunnelfleet tunnels … --agent ID`.
pub async fn remote_tunnels(
    client: &ApiClient,
    agent: &str,
    action: RemoteAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match action {
        RemoteAction::Status => {
            let d: tunnelfleet_coordinator::admin::AgentDetail =
                client.get(&format!("/v1/agents/{agent}")).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
                return Ok(ExitCode::SUCCESS);
            }
            let state = if d.summary.online {
                "online"
            } else if d.summary.connected {
                "OFFLINE (silent)"
            } else {
                "disconnected"
            };
            println!(
                "agent {agent}: {state}, last seen {} ago (as of its last heartbeat)",
                render::ago(d.summary.last_seen_unix_ms)
            );
            let Some(hb) = d.last_heartbeat else {
                println!("no heartbeat on its current connection");
                return Ok(ExitCode::SUCCESS);
            };
            let mut t = render::table(&[
                "PROFILE",
                "STATE",
                "ENDPOINT",
                "RECONNECTS",
                "FAILOVERS",
                "FORWARDS",
                "IN",
                "OUT",
                "LAST ERROR",
            ]);
            for p in &hb.profiles {
                let at = d.placement.iter().find(|x| x.profile == p.name);
                let endpoint = match at {
                    Some(at) if !at.follows => format!(
                        "{} (diverged from {} {}: {})",
                        p.active_endpoint,
                        at.group.as_deref().unwrap_or("its group"),
                        at.group_active.as_deref().unwrap_or("-"),
                        at.reason.as_deref().unwrap_or("no reason reported")
                    ),
                    Some(at) if at.group.is_some() => format!(
                        "{} (follows {})",
                        p.active_endpoint,
                        at.group.as_deref().unwrap_or_default()
                    ),
                    _ => p.active_endpoint.clone(),
                };
                let active = p
                    .forwards
                    .iter()
                    .filter(|f| f.state == tunnelfleet_protocol::ForwardState::Active)
                    .count();
                t.add_row(vec![
                    p.name.clone(),
                    format!("{:?}", p.state).to_uppercase(),
                    endpoint,
                    p.reconnects.to_string(),
                    p.failovers.to_string(),
                    format!("{active}/{} active", p.forwards.len()),
                    render::bytes(p.forwards.iter().map(|f| f.bytes_in).sum()),
                    render::bytes(p.forwards.iter().map(|f| f.bytes_out).sum()),
                    p.last_error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            println!("{t}");
        }
        RemoteAction::Command(action, profile) => {
            let verb = format!("{action:?}").to_ascii_lowercase();
            let r: tunnelfleet_protocol::CommandResult = client
                .call::<(), _>(
                    "POST",
                    &format!("/v1/agents/{agent}/tunnels/{profile}/{verb}"),
                    None,
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("{agent}: {}", r.message);
            }
            if !r.ok {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
