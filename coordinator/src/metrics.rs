//! Prometheus metrics of the coordinator, built with OpenTelemetry: the registry and the
//! instruments counted where things happen. The gauges read at scrape time are in
//! [`crate::gauges`].
//!
//! Fleet state (agents, tunnels per OMA endpoint, firing alerts, heartbeat age, hook outbox) is
//! read at scrape time by observable instruments, so a scrape always shows the state as it is
//! and nothing is kept twice; events (failovers, alerts fired, push latency) are counted where
//! they happen. Each coordinator owns its registry, so several can run in one process (tests).
//! `/metrics` is served on its own listener without authentication, read-only, because giving
//! Prometheus the admin token would give it the fleet.

use opentelemetry::metrics::{Counter, Histogram};
use tunnelfleet_runtime::metrics::Exporter;

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
    /// Alerts not raised because their agent had `MAX_ALERTS_PER_AGENT` firing, by kind.
    pub alerts_held: Counter<u64>,
    /// SSH certificate requests, by result (`issued`, `refused`).
    pub ssh_certs: Counter<u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Why metrics could not be set up or rendered.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct MetricsError(#[from] tunnelfleet_runtime::metrics::ExportError);

impl Metrics {
    /// Instruments on a fresh registry.
    pub fn new() -> Result<Metrics, MetricsError> {
        let exporter = Exporter::new()?;
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
            ssh_certs: meter
                .u64_counter("tunnelfleet_ssh_cert_requests")
                .with_description("Agents' SSH certificate requests, by result (issued, refused)")
                .build(),
            alerts_held: meter
                .u64_counter("tunnelfleet_alerts_held")
                .with_description(
                    "Alerts not raised because their agent already had the most alerts firing one agent may have",
                )
                .build(),
            exporter,
        })
    }

    /// A meter whose instruments land in this registry (the gauges in [`crate::gauges`]).
    pub fn meter(&self) -> opentelemetry::metrics::Meter {
        self.exporter.meter("tunnelfleet-coordinator")
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Result<String, MetricsError> {
        Ok(self.exporter.render()?)
    }
}
