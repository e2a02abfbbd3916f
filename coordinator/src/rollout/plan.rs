//! Which agents are canaries, and which go in which wave.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::store::Stage;

/// How many canaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Canary {
    /// This many agents.
    Count(u32),
    /// This share of the affected agents, rounded up (at least one).
    Percent(u32),
}

/// A `--canary` that is neither `N` nor `N%`.
#[derive(Debug, thiserror::Error)]
#[error("canary {0:?}: a number of agents (5) or a share of them (2%, 1 to 100)")]
pub struct CanaryError(String);

impl std::str::FromStr for Canary {
    type Err = CanaryError;
    fn from_str(s: &str) -> Result<Canary, CanaryError> {
        let bad = || CanaryError(s.to_string());
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<u32>() {
                Ok(p @ 1..=100) => Ok(Canary::Percent(p)),
                _ => Err(bad()),
            },
            None => match s.trim().parse::<u32>() {
                Ok(n @ 1..) => Ok(Canary::Count(n)),
                _ => Err(bad()),
            },
        }
    }
}

/// The label that names an agent's site: canaries are spread over sites.
pub const SITE_LABEL: &str = "site";

/// The stages of a rollout over `affected` agents (id -> labels): the canaries, chosen among
/// the `connected` ones, one site after another (round robin over the `site` label, ids in
/// order within a site), then the rest in `waves` waves of near-equal size, interleaved over
/// sites the same way. Empty waves are left out; with no affected agent there is no stage.
pub fn plan_stages(
    affected: &BTreeMap<String, BTreeMap<String, String>>,
    connected: &BTreeSet<String>,
    canary: Canary,
    waves: u32,
) -> Vec<Stage> {
    let wanted = match canary {
        Canary::Count(n) => n as usize,
        Canary::Percent(p) => (affected.len() * p as usize).div_ceil(100).max(1),
    };
    let live: BTreeMap<String, BTreeMap<String, String>> = affected
        .iter()
        .filter(|(id, _)| connected.contains(*id))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let canaries: Vec<String> = by_site(&live).into_iter().take(wanted).collect();
    let chosen: BTreeSet<&String> = canaries.iter().collect();
    let rest: BTreeMap<String, BTreeMap<String, String>> = affected
        .iter()
        .filter(|(id, _)| !chosen.contains(id))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let rest = by_site(&rest);
    let mut stages = Vec::new();
    if !canaries.is_empty() {
        stages.push(Stage {
            name: "canary".into(),
            agents: canaries,
            started_unix_ms: None,
            passed_unix_ms: None,
            offline: vec![],
        });
    }
    let waves = (waves.max(1) as usize).min(rest.len().max(1));
    let size = rest.len().div_ceil(waves);
    for (i, chunk) in rest.chunks(size.max(1)).enumerate() {
        stages.push(Stage {
            name: format!("wave {}", i + 1),
            agents: chunk.to_vec(),
            started_unix_ms: None,
            passed_unix_ms: None,
            offline: vec![],
        });
    }
    stages
}

/// Agents one site after another: the first of each site, then the second of each, …
fn by_site(agents: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<String> {
    let mut sites: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for (id, labels) in agents {
        let site = labels.get(SITE_LABEL).map(String::as_str).unwrap_or("");
        sites.entry(site).or_default().push(id);
    }
    let longest = sites.values().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(agents.len());
    for i in 0..longest {
        for ids in sites.values() {
            if let Some(id) = ids.get(i) {
                out.push((*id).clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    fn fleet(n: usize, sites: usize) -> BTreeMap<String, BTreeMap<String, String>> {
        (0..n)
            .map(|i| {
                (
                    format!("vma-{i:03}"),
                    BTreeMap::from([(SITE_LABEL.to_string(), format!("dc{}", i % sites))]),
                )
            })
            .collect()
    }

    #[test]
    fn canaries_are_spread_over_sites_and_chosen_among_the_connected() {
        let agents = fleet(30, 3);
        let mut connected: BTreeSet<String> = agents.keys().cloned().collect();
        connected.remove("vma-000");
        let stages = plan_stages(&agents, &connected, Canary::Count(3), 3);
        let canary = &stages[0].agents;
        assert_eq!(canary.len(), 3);
        let sites: BTreeSet<&String> = canary.iter().map(|a| &agents[a][SITE_LABEL]).collect();
        assert_eq!(sites.len(), 3, "{canary:?}");
        assert!(!canary.contains(&"vma-000".to_string()));
        // Every affected agent is in exactly one stage; the offline one in a wave.
        let all: Vec<&String> = stages.iter().flat_map(|s| &s.agents).collect();
        assert_eq!(all.len(), 30);
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 30);
        assert_eq!(
            stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["canary", "wave 1", "wave 2", "wave 3"]
        );
        assert_eq!(stages[1].agents.len(), 9);
    }

    #[test]
    fn a_share_rounds_up_and_small_fleets_get_fewer_waves() {
        let agents = fleet(120, 1);
        let all: BTreeSet<String> = agents.keys().cloned().collect();
        let stages = plan_stages(&agents, &all, Canary::Percent(2), 3);
        assert_eq!(stages[0].agents.len(), 3);
        let two = fleet(2, 1);
        let stages = plan_stages(&two, &two.keys().cloned().collect(), Canary::Count(5), 3);
        assert_eq!(stages.len(), 1, "{stages:?}");
        assert!(plan_stages(&BTreeMap::new(), &BTreeSet::new(), Canary::Count(5), 3).is_empty());
    }

    #[test]
    fn canary_flags_parse_or_say_what_they_want() {
        assert_eq!("5".parse::<Canary>().unwrap(), Canary::Count(5));
        assert_eq!("2%".parse::<Canary>().unwrap(), Canary::Percent(2));
        for bad in ["0", "0%", "101%", "x", "-1", ""] {
            let e = bad.parse::<Canary>().unwrap_err().to_string();
            assert!(e.contains("a number of agents"), "{bad}: {e}");
        }
    }
}
