//! `tunnelfleet oma …` and `tunnelfleet alerts …`: OMA groups, endpoint health, planned moves
//! and alerts, through the coordinator's admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use serde::Deserialize;
use tunnelfleet_coordinator::admin::{AckRequest, Changed, Done, EndpointRequest, SilenceRequest};
use tunnelfleet_coordinator::hooks::HookStats;
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::store::OmaGroup;
use tunnelfleet_coordinator::store::{Alert, AlertStatus, Silence};

use crate::api::ApiClient;
use crate::render;

/// `tunnelfleet oma …`
#[derive(Subcommand, Debug)]
pub enum OmaAction {
    /// Every endpoint of every group: health, which is active, which agents are on it.
    List,
    /// Create or replace the groups of a TOML file (`[[group]]` with name, endpoints, …).
    Apply {
        /// The file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Delete a group no profile uses.
    Delete {
        /// Group name.
        group: String,
    },
    /// Take an endpoint out of service: its groups move to the next endpoint, the new
    /// sessions up before the old ones close.
    Drain {
        /// `host:port`.
        endpoint: String,
    },
    /// Put a drained endpoint back (failback to it follows the usual stable period).
    Undrain {
        /// `host:port`.
        endpoint: String,
    },
    /// Move a group to its next usable endpoint now.
    Failover {
        /// Group name.
        group: String,
    },
    /// Move a group back to its highest-priority usable endpoint now (no stable period).
    Failback {
        /// Group name.
        group: String,
    },
}

/// `tunnelfleet alerts …`
#[derive(Subcommand, Debug)]
pub enum AlertsAction {
    /// Firing alerts (with --all, resolved ones too).
    List {
        /// Include resolved alerts.
        #[arg(long)]
        all: bool,
    },
    /// One alert.
    Show {
        /// Alert id.
        id: u64,
    },
    /// Acknowledge an alert: someone is on it.
    Ack {
        /// Alert id.
        id: u64,
        /// Who (default: $USER).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
    /// Record but do not deliver alerts whose `kind:subject` matches a glob, for a while.
    ///
    /// Example: tunnelfleet alerts silence 'oma_down:10.0.0.1:*' --for 2h --comment "maintenance"
    Silence {
        /// Glob on `kind:subject` (`*` matches anything).
        matcher: String,
        /// How long (`30m`, `2h`).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Why.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Silences in force.
    Silences,
    /// Hook deliveries: delivered, failed attempts, backlog, last error. Exit 1 when a hook
    /// has a backlog with failures.
    Hooks,
}

/// A groups file for `oma apply`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupsFile {
    group: Vec<OmaGroup>,
}

/// Reads and checks a groups file (`[[group]]` blocks); a bad file is refused whole, with the
/// file, group and key in the error.
pub fn load_groups(file: &std::path::Path) -> anyhow::Result<Vec<OmaGroup>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let groups: GroupsFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.to_string().trim_end()))?;
    for g in &groups.group {
        g.validate()
            .map_err(|e| anyhow::anyhow!("{}: group.{}.{e}", file.display(), g.name))?;
    }
    Ok(groups.group)
}

/// Runs `oma …`.
pub async fn oma(client: &ApiClient, action: OmaAction, json: bool) -> anyhow::Result<ExitCode> {
    match action {
        OmaAction::List => {
            let v: Vec<EndpointView> = client.get("/v1/oma").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", oma_table(&v));
            }
        }
        OmaAction::Apply { file } => {
            let groups = load_groups(&file)?;
            for g in &groups {
                let c: Changed = client
                    .call("PUT", &format!("/v1/groups/{}", g.name), Some(g))
                    .await?;
                if json {
                    println!("{}", serde_json::to_string(&c)?);
                } else {
                    println!("group {}: version {}", g.name, c.version);
                }
            }
        }
        OmaAction::Delete { group } => {
            let c: Changed = client
                .call::<(), _>("DELETE", &format!("/v1/groups/{group}"), None)
                .await?;
            println!("group {group} deleted: version {}", c.version);
        }
        OmaAction::Drain { endpoint } => {
            done(
                client,
                "/v1/oma/drain",
                Some(&EndpointRequest { endpoint }),
                json,
            )
            .await?
        }
        OmaAction::Undrain { endpoint } => {
            done(
                client,
                "/v1/oma/undrain",
                Some(&EndpointRequest { endpoint }),
                json,
            )
            .await?
        }
        OmaAction::Failover { group } => {
            done::<()>(client, &format!("/v1/groups/{group}/failover"), None, json).await?
        }
        OmaAction::Failback { group } => {
            done::<()>(client, &format!("/v1/groups/{group}/failback"), None, json).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn done<B: serde::Serialize>(
    client: &ApiClient,
    path: &str,
    body: Option<&B>,
    json: bool,
) -> anyhow::Result<()> {
    let d: Done = client.call("POST", path, body).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        println!("{}", d.message);
    }
    Ok(())
}

/// `oma list` as a table.
pub fn oma_table(v: &[EndpointView]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec![
        "GROUP",
        "ENDPOINT",
        "ROLE",
        "STATE",
        "HEALTHY FOR",
        "LAST CHECK",
        "AGENTS",
    ]);
    for e in v {
        let mut role = if e.priority == 0 {
            "primary".to_string()
        } else {
            format!("standby #{}", e.priority)
        };
        if e.active {
            role.push_str(", ACTIVE");
        }
        if e.drained {
            role.push_str(", drained");
        }
        let state = match e.state.as_str() {
            "down" => format!("DOWN ({} failed)", e.consecutive_failures),
            s => s.to_string(),
        };
        let check = match e.last_latency_ms {
            Some(ms) if e.state == "up" => format!("{} ({ms:.1} ms)", e.last_detail),
            _ => e.last_detail.clone(),
        };
        t.add_row(vec![
            Cell::new(&e.group),
            Cell::new(&e.endpoint),
            Cell::new(role),
            Cell::new(state),
            Cell::new(
                e.healthy_for_s
                    .map(|s| {
                        humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
                    })
                    .unwrap_or_else(|| "-".into()),
            ),
            Cell::new(check),
            Cell::new(if e.agents.is_empty() {
                "-".to_string()
            } else {
                e.agents.join(", ")
            }),
        ]);
    }
    t.to_string() + "\n"
}

/// `alerts list` as a table.
pub fn alerts_table(v: &[Alert]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(vec![
        "ID", "STATE", "KIND", "SUBJECT", "SINCE", "ACK", "SUMMARY",
    ]);
    for a in v {
        let state = match (a.status, a.silenced) {
            (AlertStatus::Firing, false) => "FIRING",
            (AlertStatus::Firing, true) => "firing (silenced)",
            (AlertStatus::Resolved, _) => "resolved",
        };
        t.add_row(vec![
            Cell::new(a.id),
            Cell::new(state),
            Cell::new(a.kind.as_str()),
            Cell::new(&a.subject),
            Cell::new(format!("{} ago", render::ago(a.fired_unix_ms))),
            Cell::new(a.acked_by.as_deref().unwrap_or("-")),
            Cell::new(&a.summary),
        ]);
    }
    t.to_string() + "\n"
}

/// Runs `alerts …`.
pub async fn alerts(
    client: &ApiClient,
    action: AlertsAction,
    json: bool,
) -> anyhow::Result<ExitCode> {
    match action {
        AlertsAction::List { all } => {
            let v: Vec<Alert> = client
                .get(if all {
                    "/v1/alerts?all=true"
                } else {
                    "/v1/alerts"
                })
                .await?;
            if json {
                print_json(&v)?;
            } else {
                print!("{}", alerts_table(&v));
            }
        }
        AlertsAction::Show { id } => {
            let a: Alert = client.get(&format!("/v1/alerts/{id}")).await?;
            print_json(&a)?;
        }
        AlertsAction::Ack { id, by } => {
            let a: Alert = client
                .call(
                    "POST",
                    &format!("/v1/alerts/{id}/ack"),
                    Some(&AckRequest { by }),
                )
                .await?;
            if json {
                print_json(&a)?;
            } else {
                println!(
                    "alert {id} acknowledged by {}",
                    a.acked_by.unwrap_or_default()
                );
            }
        }
        AlertsAction::Silence {
            matcher,
            duration,
            comment,
        } => {
            let s: Silence = client
                .call(
                    "POST",
                    "/v1/silences",
                    Some(&SilenceRequest {
                        matcher,
                        for_s: duration.as_secs().max(1),
                        comment,
                    }),
                )
                .await?;
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "silence {} on {:?} for {}",
                    s.id,
                    s.matcher,
                    humantime::format_duration(duration)
                );
            }
        }
        AlertsAction::Silences => {
            let v: Vec<Silence> = client.get("/v1/silences").await?;
            print_json(&v)?;
        }
        AlertsAction::Hooks => {
            let v: Vec<HookStats> = client.get("/v1/hooks").await?;
            if json {
                print_json(&v)?;
            } else {
                let mut t = Table::new();
                t.load_preset(NOTHING);
                t.set_header(vec![
                    "HOOK",
                    "KIND",
                    "DELIVERED",
                    "FAILED ATTEMPTS",
                    "BACKLOG",
                    "LAST ERROR",
                ]);
                for h in &v {
                    t.add_row(vec![
                        Cell::new(&h.name),
                        Cell::new(&h.kind),
                        Cell::new(h.delivered),
                        Cell::new(h.failed_attempts),
                        Cell::new(h.pending),
                        Cell::new(h.last_error.as_deref().unwrap_or("-")),
                    ]);
                }
                println!("{t}");
            }
            if v.iter().any(|h| h.pending > 0 && h.last_error.is_some()) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

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
        out.push_str(&alerts_table(&v.alerts));
        out.push('\n');
    }
    if !v.oma.is_empty() {
        out.push_str(&oma_table(&v.oma));
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

/// What `tunnels … --agent ID` does through the coordinator.
#[derive(Debug, Clone)]
pub enum RemoteAction {
    /// `list` / `status`: the agent's last heartbeat.
    Status,
    /// `start|stop|restart|health NAME`, run on the agent.
    Command(tunnelfleet_protocol::CommandAction, String),
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
                let active = p
                    .forwards
                    .iter()
                    .filter(|f| f.state == tunnelfleet_protocol::ForwardState::Active)
                    .count();
                t.add_row(vec![
                    p.name.clone(),
                    format!("{:?}", p.state).to_uppercase(),
                    p.active_endpoint.clone(),
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
