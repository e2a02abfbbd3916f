//! The coordinator's gauges, read at scrape time: agents by state, tunnels per OMA endpoint,
//! tunnels diverged from their group, heartbeat ages, SSH certificates' time left, firing alerts, endpoint health and agents
//! per endpoint, hook deliveries; whether this coordinator leads, how many are up, and etcd's
//! requests, errors and latency.
//! A scrape shows the state as it is; nothing is kept twice.

use std::collections::BTreeMap;
use std::sync::Weak;

use opentelemetry::KeyValue;
use tunnelfleet_protocol::TunnelState;

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::watch::WatchHandle;

/// Registers the instruments that read the fleet and the watcher at scrape time. The fleet is
/// held weakly: the gauges do not keep a stopped coordinator's state alive.
pub fn observe(
    metrics: &Metrics,
    fleet: Weak<Fleet>,
    watch: WatchHandle,
    standing: tokio::sync::watch::Receiver<crate::store::Standing>,
) {
    let meter = metrics.meter();
    let _ = meter
        .u64_observable_gauge("tunnelfleet_coordinator_leader")
        .with_description("1 while this coordinator leads the fleet (decides OMA moves, alerts, deliveries, rollouts), else 0")
        .with_callback(move |o| o.observe(u64::from(standing.borrow().leads()), &[]))
        .build();
    let f = fleet.clone();
    let _ = meter
        .u64_observable_gauge("tunnelfleet_coordinators")
        .with_description("Coordinators up on the shared store (as this one sees them)")
        .with_callback(move |o| {
            let Some(fleet) = f.upgrade() else { return };
            o.observe(
                fleet.store.coordinators().map_or(0, |c| c.len() as u64),
                &[],
            );
        })
        .build();
    let f = fleet.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_etcd_requests")
        .with_description("Requests to etcd (etcd store only)")
        .with_callback(move |o| {
            if let Some((n, _, _)) = f.upgrade().and_then(|f| f.store.etcd_stats()) {
                o.observe(n, &[]);
            }
        })
        .build();
    let f = fleet.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_etcd_request_errors")
        .with_description("Requests to etcd that failed or got no answer in time")
        .with_callback(move |o| {
            if let Some((_, e, _)) = f.upgrade().and_then(|f| f.store.etcd_stats()) {
                o.observe(e, &[]);
            }
        })
        .build();
    let f = fleet.clone();
    let _ = meter
        .f64_observable_counter("tunnelfleet_etcd_request_duration")
        .with_description("Time spent in etcd requests (rate over tunnelfleet_etcd_requests_total: the mean latency)")
        .with_unit("s")
        .with_callback(move |o| {
            if let Some((_, _, secs)) = f.upgrade().and_then(|f| f.store.etcd_stats()) {
                o.observe(secs, &[]);
            }
        })
        .build();
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
        .u64_observable_gauge("tunnelfleet_tunnels_diverged")
        .with_description("Tunnels up on another endpoint of their OMA group than its active one (moved on their own, or a move refused), by group")
        .with_callback(move |o| {
            let Some(fleet) = f.upgrade() else { return };
            for (group, n) in diverged(&fleet) {
                o.observe(n, &[KeyValue::new("group", group)]);
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
        .f64_observable_gauge("tunnelfleet_agent_ssh_cert_expiry")
        .with_description("Seconds until each agent's latest SSH certificate runs out (negative: expired); revoked agents left out. Renewed at half-life: below a quarter of its validity, ssh_cert_expiring fires")
        .with_unit("s")
        .with_callback(move |o| {
            let Some(fleet) = f.upgrade() else { return };
            let revoked = fleet.store.revoked_agents().unwrap_or_default();
            let now = tunnelfleet_runtime::clock::now_unix_ms() as f64 / 1000.0;
            for c in fleet.store.ssh_certs().unwrap_or_default() {
                if !revoked.contains(&c.agent_id) {
                    o.observe(
                        c.valid_before as f64 - now,
                        &[KeyValue::new("agent", c.agent_id)],
                    );
                }
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
    let w = watch.clone();
    let _ = meter
        .i64_observable_gauge("tunnelfleet_oma_endpoint_up")
        .with_description("OMA endpoint health: 1 up, 0 down, -1 not yet checked")
        .with_callback(move |o| {
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
    let w = watch.clone();
    let _ = meter
        .u64_observable_gauge("tunnelfleet_oma_endpoint_agents")
        .with_description("Agents whose tunnel is on each OMA endpoint")
        .with_callback(move |o| {
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
    let w = watch.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_hook_deliveries")
        .with_description("Alert deliveries accepted by each hook since the coordinator started")
        .with_callback(move |o| {
            for s in w.outbox.stats() {
                o.observe(s.delivered, &[KeyValue::new("hook", s.name)]);
            }
        })
        .build();
    let w = watch.clone();
    let _ = meter
        .u64_observable_counter("tunnelfleet_hook_delivery_failures")
        .with_description("Failed alert delivery attempts per hook since the coordinator started")
        .with_callback(move |o| {
            for s in w.outbox.stats() {
                o.observe(s.failed_attempts, &[KeyValue::new("hook", s.name)]);
            }
        })
        .build();
    let w = watch.clone();
    let _ = meter
        .u64_observable_gauge("tunnelfleet_hook_pending")
        .with_description("Alert deliveries waiting in each hook's durable outbox")
        .with_callback(move |o| {
            for s in w.outbox.stats() {
                o.observe(s.pending as u64, &[KeyValue::new("hook", s.name)]);
            }
        })
        .build();
}

/// Counts of agents by state.
fn agent_states(fleet: &Fleet) -> Vec<(&'static str, u64)> {
    let revoked = fleet.store.revoked_agents().unwrap_or_default();
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
/// Per group (every group, zero included): tunnels up elsewhere than its active endpoint.
fn diverged(fleet: &Fleet) -> BTreeMap<String, u64> {
    let groups = fleet.store.groups().unwrap_or_default();
    let mut out: BTreeMap<String, u64> = groups.iter().map(|g| (g.name.clone(), 0)).collect();
    for hb in fleet.links.heartbeats() {
        for p in hb.profiles.iter().filter(|p| p.state == TunnelState::Up) {
            let at = crate::monitor::placement(&groups, p);
            if let (false, Some(g)) = (at.follows, at.group) {
                *out.entry(g).or_default() += 1;
            }
        }
    }
    out
}

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
