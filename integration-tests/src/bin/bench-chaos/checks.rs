//! What is checked: fault kinds, the webhook's deliveries, percentiles.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Blackhole,
    Freeze,
    ApiDown,
    Partition,
    CoordinatorKill,
    EtcdKill,
}

impl Kind {
    pub(crate) const ALL: [Kind; 6] = [
        Kind::Blackhole,
        Kind::Freeze,
        Kind::ApiDown,
        Kind::Partition,
        Kind::CoordinatorKill,
        Kind::EtcdKill,
    ];
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Blackhole => "blackhole",
            Kind::Freeze => "freeze",
            Kind::ApiDown => "api_down",
            Kind::Partition => "partition",
            Kind::CoordinatorKill => "coordinator_kill",
            Kind::EtcdKill => "etcd_kill",
        }
    }
    /// OMA faults an operator must hear about.
    pub(crate) fn must_alert(self) -> bool {
        matches!(self, Kind::Blackhole | Kind::Freeze | Kind::ApiDown)
    }
}

/// One webhook delivery, as the checks need it.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) id: u64,
    pub(crate) kind: String,
    pub(crate) subject: String,
    pub(crate) summary: String,
    pub(crate) firing: bool,
    pub(crate) at: u64,
}

pub(crate) fn deliveries(sink: &WebhookSink) -> Vec<Delivery> {
    sink.delivered()
        .into_iter()
        .map(|r| {
            let j = r.json();
            Delivery {
                id: j["alert"]["id"].as_u64().unwrap_or(0),
                kind: j["alert"]["kind"].as_str().unwrap_or_default().to_string(),
                subject: j["alert"]["subject"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                summary: j["alert"]["summary"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                firing: j["status"] == "firing",
                at: r.received_unix_ms,
            }
        })
        .collect()
}

pub(crate) fn p99(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64) * 0.99).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// One fault as it happened.
#[derive(Debug)]
pub(crate) struct Fault {
    pub(crate) kind: Kind,
    pub(crate) target: String,
    /// The OMA endpoint it hit (OMA faults), for the alert checks.
    pub(crate) endpoint: Option<String>,
    /// Appliances on that OMA when it struck.
    pub(crate) affected: Vec<usize>,
    pub(crate) start_ms: u64,
    pub(crate) healed_ms: u64,
}

/// Acknowledged writes missing: each profile's last acknowledged port must be what it holds
/// now, or a later one.
pub(crate) fn lost_writes(acked: &[(u32, u16)], now_held: &BTreeMap<String, u16>) -> usize {
    let mut last: BTreeMap<u32, u16> = BTreeMap::new();
    for (n, port) in acked {
        last.insert(*n, *port);
    }
    last.iter()
        .filter(|(n, port)| {
            now_held
                .get(&format!("chaos-w{n}"))
                .is_none_or(|held| held < *port)
        })
        .count()
}

/// OMA faults with agents on the OMA and no alert naming it, and second alerts of one kind and
/// subject within one fault (from its start to 30 s after its heal, or the next fault's start).
pub(crate) fn alerts_per_fault(faults: &[Fault], all: &[Delivery]) -> (u32, u32) {
    let mut without_alert = 0u32;
    let mut duplicates = 0u32;
    for (i, f) in faults.iter().enumerate() {
        // From the fault to 30 s after its heal, or to the next fault if that comes first: the
        // next one's alert about the same OMA is its own incident, not a second of this one.
        let until = faults
            .get(i + 1)
            .map_or(u64::MAX, |next| next.start_ms)
            .min(f.healed_ms + 30_000);
        let window = |d: &Delivery| d.firing && d.at >= f.start_ms && d.at < until;
        if let Some(ep) = &f.endpoint
            && f.kind.must_alert()
            && !f.affected.is_empty()
        {
            let named = all
                .iter()
                .filter(|d| window(d))
                .any(|d| d.subject == *ep || d.summary.contains(ep.as_str()));
            if !named {
                without_alert += 1;
                eprintln!("  no alert for {} {} ({ep})", f.kind.name(), f.target);
            }
        }
        let mut seen: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
        for d in all.iter().filter(|d| window(d)) {
            seen.entry((d.kind.clone(), d.subject.clone()))
                .or_default()
                .insert(d.id);
        }
        for ((kind, subject), ids) in seen {
            if ids.len() > 1 {
                duplicates += ids.len() as u32 - 1;
                eprintln!(
                    "  {} alerts {kind} {subject} within {} {}",
                    ids.len(),
                    f.kind.name(),
                    f.target
                );
            }
        }
    }
    (without_alert, duplicates)
}

/// The group's active endpoint, as a living coordinator says.
pub(crate) async fn active(apis: &[ApiClient], group: &str) -> Option<String> {
    for api in apis {
        let Ok(v) = api.get::<Vec<serde_json::Value>>("/v1/oma").await else {
            continue;
        };
        return v
            .iter()
            .find(|e| e["group"] == group && e["active"] == true)
            .and_then(|e| e["endpoint"].as_str())
            .map(str::to_string);
    }
    None
}

/// Agents linked to coordinator `c`, as it says (0 when it does not answer).
pub(crate) async fn links(c: &BenchCoordinator) -> usize {
    c.api
        .get::<tunnelfleet_coordinator::admin::coordinators::CoordinatorsView>("/v1/coordinators")
        .await
        .ok()
        .and_then(|v| v.agents.get(&v.this).copied())
        .unwrap_or(0)
}

pub(crate) fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS").ok()
}

pub(crate) fn now_ms() -> u64 {
    tunnelfleet_runtime::clock::now_unix_ms()
}
