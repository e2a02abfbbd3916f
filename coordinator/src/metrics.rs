//! Prometheus metrics of the coordinator, built with OpenTelemetry.
//!
//! Fleet state (agents, tunnels per OMA endpoint, firing alerts, heartbeat age, hook outbox) is
//! read at scrape time by observable instruments, so a scrape always shows the state as it is
//! and nothing is kept twice; events (failovers, alerts fired, push latency) are counted where
//! they happen. Each coordinator owns its registry, so several can run in one process (tests).
//! `/metrics` is served on its own listener without authentication, read-only, because giving
//! Prometheus the admin token would give it the fleet.

use std::collections::BTreeMap;
use std::sync::Weak;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use tunnelfleet_protocol::TunnelState;
use tunnelfleet_runtime::metrics::Exporter;

use crate::link::Fleet;

/// The coordinator's instruments and the registry they are exported through.
pub struct Metrics {
    exporter: Exporter,
    /// OMA group moves (failover, failback, operator), by group.
    pub failovers: Counter<u64>,
    /// Alerts raised, by kind.
    pub alerts_fired: Counter<u64>,
    /// Time from a push to the agent's acknowledgement, seconds.
    pub push_latency: Histogram<f64>,
    /// Heartbeats received.
    pub heartbeats: Counter<u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Why metrics could not be set up or rendered.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(String);

impl Metrics {
    /// Instruments on a fresh registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let exporter = Exporter::new().map_err(|e| MetricsError(e.to_string()))?;
        let meter = exporter.meter("tunnelfleet-coordinator");
        Ok(Metrics {
            failovers: meter
                .u64_counter("tunnelfleet_oma_failovers")
                .with_description(
                    "OMA group moves to another endpoint (failover, failback, operator)",
                )
                .build(),
            alerts_fired: meter
                .u64_counter("tunnelfleet_alerts_fired")
                .with_description("Alerts raised")
                .build(),
            push_latency: meter
                .f64_histogram("tunnelfleet_push_ack")
                .with_description(
                    "Time from pushing a profile version to the agent acknowledging it",
                )
                .with_unit("s")
                .with_boundaries(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
                ])
                .build(),
            heartbeats: meter
                .u64_counter("tunnelfleet_heartbeats")
                .with_description("Agent heartbeats received")
                .build(),
            exporter,
        })
    }

    /// Registers the instruments that read the fleet at scrape time.
    pub fn observe(&self, fleet: Weak<Fleet>) {
        let meter = self.exporter.meter("tunnelfleet-coordinator");
        let f = fleet.clone();
        let _ = meter
            .u64_observable_gauge("tunnelfleet_agents")
            .with_description(
                "Agents known to the coordinator, by state (online, silent, disconnected, revoked)",
            )
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                for (state, n) in agent_states(&fleet) {
                    o.observe(n, &[KeyValue::new("state", state)]);
                }
            })
            .build();
        let f = fleet.clone();
        let _ = meter
            .u64_observable_gauge("tunnelfleet_tunnels")
            .with_description("Tunnels (profiles) of connected agents by OMA endpoint and state, from their last heartbeats")
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                for ((endpoint, state), n) in tunnels(&fleet) {
                    o.observe(
                        n,
                        &[
                            KeyValue::new("endpoint", endpoint),
                            KeyValue::new("state", state),
                        ],
                    );
                }
            })
            .build();
        let f = fleet.clone();
        let _ = meter
            .f64_observable_gauge("tunnelfleet_agent_heartbeat_age")
            .with_description("Seconds since each connected agent was last heard from")
            .with_unit("s")
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                for (agent, age) in fleet.links.heartbeat_ages() {
                    o.observe(age.as_secs_f64(), &[KeyValue::new("agent", agent)]);
                }
            })
            .build();
        let f = fleet.clone();
        let _ = meter
            .u64_observable_gauge("tunnelfleet_alerts_firing")
            .with_description("Alerts firing now, by kind")
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
                for a in fleet.store.alerts(false).unwrap_or_default() {
                    *by_kind.entry(a.kind.as_str().to_string()).or_default() += 1;
                }
                for (kind, n) in by_kind {
                    o.observe(n, &[KeyValue::new("kind", kind)]);
                }
            })
            .build();
        let f = fleet.clone();
        let _ = meter
            .i64_observable_gauge("tunnelfleet_oma_endpoint_up")
            .with_description("OMA endpoint health: 1 up, 0 down, -1 not yet checked")
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                let Some(w) = fleet.watch.get() else { return };
                for v in w.view() {
                    let up = match v.state.as_str() {
                        "up" => 1,
                        "down" => 0,
                        _ => -1,
                    };
                    o.observe(
                        up,
                        &[
                            KeyValue::new("group", v.group.clone()),
                            KeyValue::new("endpoint", v.endpoint.clone()),
                            KeyValue::new("active", v.active),
                        ],
                    );
                }
            })
            .build();
        let f = fleet.clone();
        let _ = meter
            .u64_observable_gauge("tunnelfleet_oma_endpoint_agents")
            .with_description("Agents whose tunnel is on each OMA endpoint")
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                let Some(w) = fleet.watch.get() else { return };
                for v in w.view() {
                    o.observe(
                        v.agents.len() as u64,
                        &[
                            KeyValue::new("group", v.group.clone()),
                            KeyValue::new("endpoint", v.endpoint.clone()),
                        ],
                    );
                }
            })
            .build();
        let f = fleet.clone();
        let _ = meter
            .u64_observable_counter("tunnelfleet_hook_deliveries")
            .with_description(
                "Alert deliveries accepted by each hook since the coordinator started",
            )
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                let Some(w) = fleet.watch.get() else { return };
                for s in w.outbox.stats() {
                    o.observe(s.delivered, &[KeyValue::new("hook", s.name)]);
                }
            })
            .build();
        let f = fleet.clone();
        let _ = meter
            .u64_observable_counter("tunnelfleet_hook_delivery_failures")
            .with_description(
                "Failed alert delivery attempts per hook since the coordinator started",
            )
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                let Some(w) = fleet.watch.get() else { return };
                for s in w.outbox.stats() {
                    o.observe(s.failed_attempts, &[KeyValue::new("hook", s.name)]);
                }
            })
            .build();
        let f = fleet;
        let _ = meter
            .u64_observable_gauge("tunnelfleet_hook_pending")
            .with_description("Alert deliveries waiting in each hook's durable outbox")
            .with_callback(move |o| {
                let Some(fleet) = f.upgrade() else { return };
                let Some(w) = fleet.watch.get() else { return };
                for s in w.outbox.stats() {
                    o.observe(s.pending as u64, &[KeyValue::new("hook", s.name)]);
                }
            })
            .build();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, MetricsError> {
        self.exporter
            .render()
            .map_err(|e| MetricsError(e.to_string()))
    }
}

/// Counts of agents by state.
fn agent_states(fleet: &Fleet) -> Vec<(&'static str, u64)> {
    let revoked: std::collections::BTreeSet<String> = fleet
        .store
        .revocations()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.agent)
        .collect();
    let mut counts: BTreeMap<&'static str, u64> = [
        ("online", 0),
        ("silent", 0),
        ("disconnected", 0),
        ("revoked", 0),
    ]
    .into();
    for rec in fleet.store.agents().unwrap_or_default() {
        let state = if revoked.contains(&rec.id) {
            "revoked"
        } else {
            match fleet.links.get(&rec.id) {
                Some(l) if l.connected && l.online => "online",
                Some(l) if l.connected => "silent",
                _ => "disconnected",
            }
        };
        *counts.entry(state).or_default() += 1;
    }
    counts.into_iter().collect()
}

/// Tunnels by (active endpoint, up|down) from the connected agents' last heartbeats.
fn tunnels(fleet: &Fleet) -> BTreeMap<(String, &'static str), u64> {
    let mut out = BTreeMap::new();
    for hb in fleet.links.heartbeats() {
        for p in &hb.profiles {
            let state = if p.state == TunnelState::Up {
                "up"
            } else {
                "down"
            };
            *out.entry((p.active_endpoint.clone(), state)).or_default() += 1;
        }
    }
    out
}
