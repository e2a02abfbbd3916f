//! Human tables for `tunnelfleet tunnels …`, `agents …`, `oma list` and `alerts list` (the
//! `--json` path prints the data as is).

use comfy_table::presets::NOTHING;
use comfy_table::{Cell, Table};
use tunnelfleet_agent::status::{
    AgentStatus, ForwardState, HealthResult, ProfileStatus, TunnelState,
};
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::store::{Alert, AlertStatus};
use tunnelfleet_runtime::clock::now_unix_ms;

/// `tunnels list`: one line per profile.
pub fn list(status: &AgentStatus) -> String {
    let mut t = table(&["NAME", "STATE", "ENDPOINTS", "FORWARDS", "DESCRIPTION"]);
    for p in &status.profiles {
        t.add_row(vec![
            Cell::new(&p.name),
            Cell::new(state(p.state)),
            Cell::new(p.endpoints.join(", ")),
            Cell::new(p.forwards.len()),
            Cell::new(&p.description),
        ]);
    }
    t.to_string()
}

/// `tunnels status`: a block per profile with its forwards.
pub fn status(status: &AgentStatus) -> String {
    let mut out = String::new();
    for p in &status.profiles {
        out.push_str(&profile(p));
        out.push('\n');
    }
    if status.profiles.is_empty() {
        out.push_str("no profiles configured\n");
    }
    out
}

/// One profile's block.
pub fn profile(p: &ProfileStatus) -> String {
    let mut out = format!("{}  {}", p.name, state(p.state).to_uppercase());
    let role = match p.endpoints.iter().position(|e| e == &p.active_endpoint) {
        Some(0) => "primary".to_string(),
        Some(i) => format!("standby #{i}"),
        None => "-".to_string(),
    };
    out.push_str(&format!("  endpoint {} ({role})", p.active_endpoint));
    if !p.jump.is_empty() {
        out.push_str(&format!("  via {}", p.jump.join(" -> ")));
    }
    if let Some(since) = p.up_since_unix_ms {
        out.push_str(&format!("  up {}", ago(since)));
    }
    out.push_str(&format!(
        "  reconnects {}  failovers {}\n",
        p.reconnects, p.failovers
    ));
    if p.state != TunnelState::Up && p.failures_in_a_row > 0 {
        out.push_str(&format!(
            "  {} failure(s) in a row on {} (failed connects, sessions shorter than 30 s)\n",
            p.failures_in_a_row, p.active_endpoint
        ));
    }
    if let Some(h) = &p.health {
        out.push_str(&format!(
            "  health {}: {}  ({}/{} failing, {} checks)\n",
            h.target,
            h.last
                .as_ref()
                .map(health)
                .unwrap_or_else(|| "not run yet".into()),
            h.consecutive_failures,
            h.threshold,
            h.checks
        ));
    }
    if let Some(e) = &p.last_error
        && p.state != TunnelState::Up
    {
        out.push_str(&format!("  last error: {e}\n"));
    }
    let mut t = table(&["FORWARD", "STATE", "IN", "OUT", "CONNS", "DETAIL"]);
    for f in &p.forwards {
        t.add_row(vec![
            Cell::new(&f.spec),
            Cell::new(forward_state(f.state)),
            Cell::new(bytes(f.bytes_in)),
            Cell::new(bytes(f.bytes_out)),
            Cell::new(match f.connections_opening {
                0 => format!("{}/{}", f.connections_open, f.connections_total),
                n => format!(
                    "{}/{} ({n} opening)",
                    f.connections_open, f.connections_total
                ),
            }),
            Cell::new(f.detail.as_deref().unwrap_or("")),
        ]);
    }
    for line in t.to_string().lines() {
        out.push_str("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A health result in one line.
pub fn health(r: &HealthResult) -> String {
    format!(
        "{} {} in {:.1} ms ({} ago)",
        if r.ok { "PASS" } else { "FAIL" },
        r.detail,
        r.latency_ms,
        ago(r.at_unix_ms)
    )
}

/// A borderless table with a header row.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(header.to_vec());
    t
}

fn state(s: TunnelState) -> &'static str {
    match s {
        TunnelState::Stopped => "stopped",
        TunnelState::Connecting => "connecting",
        TunnelState::Up => "up",
        TunnelState::Backoff => "backoff",
        TunnelState::Stopping => "stopping",
    }
}

fn forward_state(s: ForwardState) -> &'static str {
    match s {
        ForwardState::Stopped => "stopped",
        ForwardState::Listening => "listening",
        ForwardState::Active => "active",
        ForwardState::Waiting => "waiting",
        ForwardState::Retrying => "RETRYING",
    }
}

/// `agents list`: one line per agent the coordinator knows.
pub fn fleet_agents(list: &[tunnelfleet_coordinator::admin::AgentSummary]) -> String {
    let mut t = table(&[
        "AGENT",
        "STATE",
        "TUNNELS UP",
        "VERSION",
        "LABELS",
        "LAST SEEN",
        "SSH CERT",
    ]);
    for a in list {
        let state = if a.revoked {
            "REVOKED"
        } else if a.online {
            "online"
        } else if a.connected {
            "OFFLINE (silent)"
        } else {
            "disconnected"
        };
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let version = match a.applied_version {
            Some(v) if a.applied_ok => v.to_string(),
            Some(v) => format!("{v} (failed)"),
            None => "-".into(),
        };
        t.add_row(vec![
            Cell::new(&a.id),
            Cell::new(state),
            Cell::new(format!("{}/{}", a.tunnels_up, a.tunnels)),
            Cell::new(version),
            Cell::new(labels.join(",")),
            Cell::new(format!("{} ago", ago(a.last_seen_unix_ms))),
            Cell::new(ssh_cert(a.ssh_cert.as_ref())),
        ]);
    }
    t.to_string() + "\n"
}

/// An agent's certificate in `agents list`: time left, shouted when renewal is overdue.
fn ssh_cert(c: Option<&tunnelfleet_coordinator::admin::SshCertExpiry>) -> String {
    let Some(c) = c else {
        return "-".into();
    };
    let now = now_unix_ms() / 1000;
    if c.valid_before_unix_s <= now {
        return "EXPIRED".into();
    }
    // Minutes are enough to read; seconds only for the last one.
    let left = c.valid_before_unix_s - now;
    let left = if left > 60 { left - left % 60 } else { left };
    let left = humantime::format_duration(std::time::Duration::from_secs(left));
    if c.expiring {
        format!("EXPIRING {left}")
    } else {
        format!("{left} left")
    }
}

/// `1.5 MB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// How long ago a Unix-ms timestamp was, rounded to seconds.
pub fn ago(unix_ms: u64) -> String {
    let secs = now_unix_ms().saturating_sub(unix_ms) / 1000;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// `profiles diff`: a plan, one profile per block.
pub fn plan(p: &tunnelfleet_coordinator::plan::Plan) -> String {
    use std::fmt::Write;
    use tunnelfleet_coordinator::plan::PlanAction;
    let mut out = String::new();
    let _ = writeln!(out, "against fleet version {}:", p.version);
    for pp in &p.profiles {
        let (mark, what) = match pp.action {
            PlanAction::Create => ("+", "create"),
            PlanAction::Change => ("~", "change"),
            PlanAction::Unchanged => ("=", "unchanged"),
        };
        let _ = writeln!(out, "{mark} {} ({what})", pp.name);
        for f in &pp.forwards_added {
            let _ = writeln!(out, "    + forward {f}");
        }
        for f in &pp.forwards_removed {
            let _ = writeln!(out, "    - forward {f}");
        }
        for c in &pp.changes {
            let _ = writeln!(out, "    ~ {c}");
        }
        if pp.action == PlanAction::Change {
            let _ = writeln!(
                out,
                "    {}",
                if pp.session_restarts {
                    "the SSH session is re-established: every forward of the profile reconnects"
                } else {
                    "the session stays up: unchanged forwards keep their connections"
                }
            );
        }
        if pp.action != PlanAction::Unchanged {
            let _ = writeln!(
                out,
                "    agents: {}",
                if pp.agents.is_empty() {
                    "none assigned yet".to_string()
                } else {
                    pp.agents.join(", ")
                }
            );
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if p.has_changes() {
            format!("{} agent(s) affected", p.agents_affected.len())
        } else {
            "no changes".to_string()
        }
    );
    out
}

/// Shows `frame()` every `interval` until Ctrl+C or `count` frames (0 = no limit): with
/// `json`, one line per frame; otherwise the screen is cleared and redrawn, like watch(1).
/// `frame` returns (JSON line, screen text).
pub async fn live<F, Fut>(
    interval: std::time::Duration,
    count: u64,
    json: bool,
    mut frame: F,
) -> anyhow::Result<std::process::ExitCode>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(String, String)>>,
{
    let mut shown = 0u64;
    loop {
        let (line, screen) = frame().await?;
        if json {
            println!("{line}");
        } else {
            print!("\x1b[2J\x1b[H{screen}");
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        shown += 1;
        if count != 0 && shown >= count {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(std::process::ExitCode::SUCCESS),
            _ = tokio::time::sleep(interval) => {}
        }
    }
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
            s if e.degraded.is_some() => format!("{s}, DEGRADED"),
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
    let mut out = t.to_string() + "\n";
    for e in v.iter() {
        if let Some(why) = &e.degraded {
            out.push_str(&format!(
                "group {}: {} degraded: {why}\n",
                e.group, e.endpoint
            ));
        }
    }
    for e in v.iter().filter(|e| !e.diverged.is_empty()) {
        out.push_str(&format!(
            "group {}: {} not on its active endpoint {}:\n",
            e.group,
            e.diverged.len(),
            e.endpoint
        ));
        for d in &e.diverged {
            out.push_str(&format!("  {d}\n"));
        }
    }
    out
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
            Cell::new(format!("{} ago", ago(a.fired_unix_ms))),
            Cell::new(a.acked_by.as_deref().unwrap_or("-")),
            Cell::new(&a.summary),
        ]);
    }
    t.to_string() + "\n"
}

/// A staged rollout: where it stands, each stage, why it halted and what to do.
pub fn staged_rollout(v: &tunnelfleet_coordinator::admin::RolloutView) -> String {
    use std::fmt::Write;
    use tunnelfleet_coordinator::store::RolloutState;
    let r = &v.rollout;
    let mut out = String::new();
    let state = match r.state {
        RolloutState::Running => "running",
        RolloutState::Halted => "HALTED",
        RolloutState::Done => "done",
        RolloutState::Aborted => "aborted",
    };
    let _ = writeln!(
        out,
        "staged rollout of version {} ({state}): {}, started {} ago by {}, {} of health per stage",
        r.version,
        r.what,
        ago(r.started_unix_ms),
        r.started_by,
        humantime::format_duration(std::time::Duration::from_millis(r.wait_ms))
    );
    for (i, s) in r.stages.iter().enumerate() {
        let mark = match (s.passed_unix_ms, s.started_unix_ms) {
            (Some(_), _) => "passed".to_string(),
            (None, Some(t)) if i == r.current && r.state == RolloutState::Halted => {
                format!("halted ({} ago)", ago(r.halted_unix_ms.unwrap_or(t)))
            }
            (None, Some(t)) if i == r.current => format!("in progress for {}", ago(t)),
            _ if r.state == RolloutState::Aborted => "never got it".to_string(),
            _ => "waiting".to_string(),
        };
        let away = if s.offline.is_empty() {
            String::new()
        } else {
            format!(
                " ({} away when it started, not waited for: {})",
                s.offline.len(),
                s.offline.join(", ")
            )
        };
        let _ = writeln!(
            out,
            "  {:<8} {:<24} {}{away}",
            s.name,
            mark,
            s.agents.join(", ")
        );
    }
    if r.state == RolloutState::Halted {
        for (agent, why) in &r.reasons {
            let _ = writeln!(
                out,
                "  FAILED {agent}: {why} (back on the previous version)"
            );
        }
        let _ = writeln!(
            out,
            "  fix the cause, then `tunnelfleet rollout resume`; or `tunnelfleet rollout abort` to put every agent back on version {}'s profiles",
            r.base_version
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_500_000), "1.5 MB");
    }
}
