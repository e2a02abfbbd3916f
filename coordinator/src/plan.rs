//! `tunnelfleet profiles diff`: what applying a profiles file would change, before anything is
//! applied — which profiles are new or changed, which fields, which forwards come and go, whether
//! sessions restart, and which agents are affected.
//!
//! Pure: it compares the proposed specs with the stored ones and the assignments, with no IO,
//! so the plan is exactly what `profiles apply` then does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tunnelfleet_protocol::ProfileSpec;

use crate::store::Assignment;

/// What happens to one profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanAction {
    /// New profile.
    Create,
    /// Stored profile with differences.
    Change,
    /// Identical to what is stored.
    Unchanged,
}

/// The plan for one profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfilePlan {
    /// Profile name.
    pub name: String,
    /// Create, change or nothing.
    pub action: PlanAction,
    /// Changed settings other than forwards, as `key: old -> new`.
    pub changes: Vec<String>,
    /// Forwards added.
    pub forwards_added: Vec<String>,
    /// Forwards removed.
    pub forwards_removed: Vec<String>,
    /// Whether the SSH session is re-established (a setting of the session changed): every
    /// forward of the profile reconnects. Otherwise unchanged forwards keep their connections.
    pub session_restarts: bool,
    /// Agents assigned this profile now (they receive the change).
    pub agents: Vec<String>,
}

/// The plan for a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The fleet version the plan was made against.
    pub version: u64,
    /// One entry per profile of the file.
    pub profiles: Vec<ProfilePlan>,
    /// Every agent that would receive a change.
    pub agents_affected: Vec<String>,
}

impl Plan {
    /// Whether applying would change anything.
    pub fn has_changes(&self) -> bool {
        self.profiles
            .iter()
            .any(|p| p.action != PlanAction::Unchanged)
    }
}

/// Settings that only describe: changing them restarts nothing.
const COSMETIC: &[&str] = &["description"];

/// Plans `proposed` against the stored profiles, assignments and known agents (id, labels).
pub fn plan(
    version: u64,
    stored: &[ProfileSpec],
    assignments: &[Assignment],
    agents: &[(String, BTreeMap<String, String>)],
    proposed: &[ProfileSpec],
) -> Plan {
    let stored: BTreeMap<&str, &ProfileSpec> =
        stored.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut affected = std::collections::BTreeSet::new();
    let mut profiles = Vec::new();
    for new in proposed {
        let assigned: Vec<String> = agents
            .iter()
            .filter(|(id, labels)| {
                assignments
                    .iter()
                    .any(|a| a.profile == new.name && a.selector.matches(id, labels))
            })
            .map(|(id, _)| id.clone())
            .collect();
        let p = match stored.get(new.name.as_str()) {
            None => ProfilePlan {
                name: new.name.clone(),
                action: PlanAction::Create,
                changes: Vec::new(),
                forwards_added: new.forwards.clone(),
                forwards_removed: Vec::new(),
                session_restarts: false,
                agents: assigned,
            },
            Some(old) => {
                let (changes, session_restarts) = field_changes(old, new);
                let forwards_added: Vec<String> = new
                    .forwards
                    .iter()
                    .filter(|f| !old.forwards.contains(f))
                    .cloned()
                    .collect();
                let forwards_removed: Vec<String> = old
                    .forwards
                    .iter()
                    .filter(|f| !new.forwards.contains(f))
                    .cloned()
                    .collect();
                let changed = !changes.is_empty()
                    || !forwards_added.is_empty()
                    || !forwards_removed.is_empty();
                ProfilePlan {
                    name: new.name.clone(),
                    action: if changed {
                        PlanAction::Change
                    } else {
                        PlanAction::Unchanged
                    },
                    changes,
                    forwards_added,
                    forwards_removed,
                    session_restarts,
                    agents: assigned,
                }
            }
        };
        if p.action != PlanAction::Unchanged {
            affected.extend(p.agents.iter().cloned());
        }
        profiles.push(p);
    }
    Plan {
        version,
        profiles,
        agents_affected: affected.into_iter().collect(),
    }
}

/// `key: old -> new` for every top-level setting but forwards; and whether one of them is a
/// session setting.
fn field_changes(old: &ProfileSpec, new: &ProfileSpec) -> (Vec<String>, bool) {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return (vec!["(unreadable profile)".into()], true);
    };
    let mut out = Vec::new();
    let mut restart = false;
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        if k == "forwards" || k == "name" {
            continue;
        }
        let (va, vb) = (a.get(k), b.get(k));
        if va != vb {
            let show = |v: Option<&serde_json::Value>| {
                v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
            };
            out.push(format!("{k}: {} -> {}", show(va), show(vb)));
            if !COSMETIC.contains(&k.as_str()) {
                restart = true;
            }
        }
    }
    (out, restart)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Selector;

    fn spec(name: &str, forwards: &[&str]) -> ProfileSpec {
        serde_json::from_value(serde_json::json!({
            "name": name, "endpoints": ["oma-a:443"], "user": "vma",
            "identity_file": "/etc/tunnelfleet/id", "known_hosts": "/etc/tunnelfleet/known_hosts",
            "forwards": forwards,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_forward_change_names_the_forwards_and_the_agents_and_keeps_the_session() {
        let stored = vec![spec(
            "oma",
            &["L 8082:localhost:8082", "R 9081:localhost:8081"],
        )];
        let assignments = vec![Assignment {
            profile: "oma".into(),
            selector: Selector::Labels([("site".to_string(), "dc1".to_string())].into()),
        }];
        let agents = vec![
            (
                "vma-1".to_string(),
                [("site".to_string(), "dc1".to_string())].into(),
            ),
            (
                "vma-2".to_string(),
                [("site".to_string(), "dc2".to_string())].into(),
            ),
        ];
        let mut changed = spec("oma", &["L 8082:localhost:8082", "L 10809:localhost:10809"]);
        changed.description = "now with NBD".into();
        let p = plan(
            7,
            &stored,
            &assignments,
            &agents,
            &[changed, spec("new", &["D 1080"])],
        );
        assert!(p.has_changes());
        assert_eq!(p.version, 7);
        let oma = &p.profiles[0];
        assert_eq!(oma.action, PlanAction::Change);
        assert_eq!(oma.forwards_added, vec!["L 10809:localhost:10809"]);
        assert_eq!(oma.forwards_removed, vec!["R 9081:localhost:8081"]);
        assert_eq!(oma.changes, vec!["description: \"\" -> \"now with NBD\""]);
        assert!(
            !oma.session_restarts,
            "a description does not restart the session"
        );
        assert_eq!(oma.agents, vec!["vma-1"]);
        assert_eq!(p.profiles[1].action, PlanAction::Create);
        assert!(p.profiles[1].agents.is_empty());
        assert_eq!(p.agents_affected, vec!["vma-1"]);

        // A session setting restarts the session; the same file again changes nothing.
        let mut moved = spec("oma", &["L 8082:localhost:8082", "R 9081:localhost:8081"]);
        moved.endpoints = vec!["oma-b:443".into()];
        let p = plan(7, &stored, &assignments, &agents, &[moved]);
        assert!(p.profiles[0].session_restarts);
        assert!(p.profiles[0].changes[0].starts_with("endpoints:"));
        let p = plan(7, &stored, &assignments, &agents, &stored);
        assert!(!p.has_changes());
        assert!(p.agents_affected.is_empty());
    }
}
