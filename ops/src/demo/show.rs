//! What the demo prints: the commands an operator would run, and what they show.

use std::io::Write;
use std::time::Instant;

use anyhow::bail;
use tunnelfleet_agent::status::AgentStatus;
use tunnelfleet_coordinator::admin::AgentSummary;
use tunnelfleet_coordinator::monitor::EndpointView;
use tunnelfleet_coordinator::store::Alert;

use crate::api::ApiClient;
use crate::render;

use super::checks::{echo, get, status};
use super::setup::*;

pub(super) fn say(out: &mut impl Write, line: &str) -> std::io::Result<()> {
    writeln!(out, "{line}")?;
    out.flush()
}

pub(super) async fn print_agents(
    out: &mut (impl Write + Send),
    api: &ApiClient,
) -> anyhow::Result<()> {
    let list: Vec<AgentSummary> = api.get("/v1/agents").await?;
    say(out, "\n  $ tunnelfleet agents list")?;
    for line in render::fleet_agents(&list).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(())
}

pub(super) async fn print_oma(
    out: &mut (impl Write + Send),
    api: &ApiClient,
) -> anyhow::Result<()> {
    let v: Vec<EndpointView> = api.get("/v1/oma").await?;
    say(out, "\n  $ tunnelfleet oma list")?;
    for line in crate::render::oma_table(&v).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(())
}

/// Counters read off `/metrics`.
pub(super) struct Counters {
    /// `tunnelfleet_oma_failovers_total`, every group.
    pub failovers: u64,
}

/// A few lines of what Prometheus would scrape; the counters the summary repeats.
pub(super) async fn print_metrics(
    out: &mut (impl Write + Send),
    port: u16,
) -> anyhow::Result<Counters> {
    let text = get(port, "/metrics").await?;
    let failovers = text
        .lines()
        .filter(|l| l.starts_with("tunnelfleet_oma_failovers_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    say(
        out,
        &format!(
            "\n  $ curl -s http://127.0.0.1:{port}/metrics | grep -E 'agents|failovers|alerts_fired|hook_deliveries'"
        ),
    )?;
    for line in text.lines().filter(|l| {
        !l.starts_with('#')
            && [
                "tunnelfleet_agents{",
                "tunnelfleet_oma_failovers_total",
                "tunnelfleet_alerts_fired_total",
                "tunnelfleet_hook_deliveries_total",
            ]
            .iter()
            .any(|m| l.starts_with(m))
    }) {
        say(out, &format!("    {line}"))?;
    }
    Ok(Counters { failovers })
}

pub(super) async fn print_alerts(
    out: &mut (impl Write + Send),
    api: &ApiClient,
) -> anyhow::Result<()> {
    let v: Vec<Alert> = api.get("/v1/alerts?all=true").await?;
    say(out, "\n  $ tunnelfleet alerts list --all")?;
    for line in crate::render::alerts_table(&v).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(())
}

pub(super) async fn show_traffic(
    out: &mut (impl Write + Send),
    a: &DemoAgent,
    oma: &str,
) -> anyhow::Result<u64> {
    let [l_api, l_nbd, l_alt, r_vma] = a.ports;
    let body = get(l_api, "/health").await?;
    if !body.starts_with(oma) {
        bail!("expected the API of {oma}, got {body:?}");
    }
    say(
        out,
        &format!("    L {l_api} -> {oma}:8082   GET /health -> {body:?}"),
    )?;
    let n = 8 << 20;
    let t = Instant::now();
    echo(l_nbd, n).await?;
    say(
        out,
        &format!(
            "    L {l_nbd} -> {oma}:10809  {} echoed through NBD in {:.0} ms",
            render::bytes(n as u64),
            t.elapsed().as_secs_f64() * 1000.0
        ),
    )?;
    echo(l_alt, 64 << 10).await?;
    say(
        out,
        &format!("    L {l_alt} -> {oma}:10809  alternate NBD port echoes"),
    )?;
    let body = get(r_vma, "/health").await?;
    say(
        out,
        &format!("    R {oma}:{r_vma} -> VMA api  reverse GET /health -> {body:?}"),
    )?;
    Ok(2 * n as u64 + 2 * (64 << 10))
}

pub(super) async fn print_status(
    out: &mut (impl Write + Send),
    a: &DemoAgent,
) -> anyhow::Result<AgentStatus> {
    let status = status(&a.socket).await?;
    say(
        out,
        &format!("\n  $ tunnelfleet tunnels status   # on {}", a.id),
    )?;
    for line in render::status(&status).lines() {
        say(out, &format!("  {line}"))?;
    }
    Ok(status)
}
