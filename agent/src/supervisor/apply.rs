//! A pushed profile set applied as a diff: pushed profiles that are gone are stopped, identical
//! ones are left running untouched (their connections stay open), changed ones are replaced
//! make-before-break, new ones started. Local profiles are never touched; a pushed profile with
//! a local profile's name is refused. The acknowledgement lists one result per forward, after
//! the listeners settled, so a port conflict is reported in it.

use std::collections::BTreeMap;
use std::sync::Arc;

use tunnelfleet_protocol::{Applied, ForwardResult, ProfileSet, ProfileSpec};

use super::{Later, Origin, Slot, Supervisor};
use crate::profile::{self, Gate};
use crate::status::{ForwardState, ProfileShared};

/// How long `apply` waits for new listeners to bind before reporting.
const APPLY_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

impl Supervisor {
    /// Applies `set` and waits for the result (tests; the agent's loop uses
    /// [`Supervisor::begin_apply`]).
    pub async fn apply(&mut self, set: &ProfileSet) -> Applied {
        self.begin_apply(set).await
    }

    /// Applies a pushed profile set as a diff: pushed profiles that are gone are stopped,
    /// identical ones are left running untouched (their connections stay open), changed ones
    /// are replaced, new ones started. Local profiles are never touched; a pushed profile with a
    /// local profile's name is refused. Returns one result per forward, after the listeners
    /// have settled, so a port conflict is reported in the acknowledgement.
    /// Makes the changes now (gone profiles stop accepting, replaced ones free their ports,
    /// new ones start once those are free); the returned work waits for the stops and for the
    /// new listeners to settle, and yields the acknowledgement.
    pub fn begin_apply(&mut self, set: &ProfileSet) -> Later<Applied> {
        let span = tracing::info_span!(
            "apply_profiles",
            version = set.version,
            profiles = set.profiles.len()
        );
        let _in = span.clone().entered();
        let mut results = Vec::new();
        let wanted: BTreeMap<&str, &ProfileSpec> =
            set.profiles.iter().map(|p| (p.name.as_str(), p)).collect();
        let gone: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.origin == Origin::Pushed && !wanted.contains_key(s.cfg.name.as_str()))
            .map(|s| s.cfg.name.clone())
            .collect();
        // Every profile this set starts waits for these: a new profile may take a port a gone
        // one held.
        let mut released: Vec<Gate> = Vec::new();
        for name in gone {
            if let Some(mut slot) = self.slots.remove(&name) {
                if let Some(h) = slot.running.take() {
                    released.push(Gate::after(h.begin_stop()));
                }
                released.extend(slot.released.take());
            }
            tracing::info!(profile = %name, version = set.version, "pushed profile removed");
        }
        let mut started = Vec::new();
        for (name, spec) in wanted {
            let fail = |detail: String| ForwardResult {
                profile: name.to_string(),
                forward: "*".into(),
                ok: false,
                detail,
            };
            if let Err(e) = spec.validate_runnable() {
                results.push(fail(e.within(&format!("profile.{name}")).to_string()));
                continue;
            }
            let cfg = ProfileSpec {
                // Resolved by the coordinator into `endpoints`: the agent runs endpoints only.
                group: None,
                // A pushed profile runs: the coordinator decides by assigning it.
                autostart: true,
                ..(*spec).clone()
            };
            match self.slots.get(name) {
                Some(s) if s.origin == Origin::Local => {
                    results.push(fail(format!(
                        "a local profile named {name:?} exists; the local one stays"
                    )));
                    continue;
                }
                Some(s) if *s.cfg == cfg => {
                    for f in &cfg.forwards {
                        results.push(ForwardResult {
                            profile: name.to_string(),
                            forward: f.clone(),
                            ok: true,
                            detail: "unchanged".into(),
                        });
                    }
                    continue;
                }
                _ => {}
            }
            if let Some(slot) = self.slots.get_mut(name)
                && only_endpoints_differ(&slot.cfg, &cfg)
            {
                // The group moved: the running profile follows make-before-break on its own
                // session (counters, health and open connections stay); nothing restarts.
                let to = cfg.endpoints.first().cloned().unwrap_or_default();
                match &slot.running {
                    Some(h) => h.retarget(cfg.endpoints.clone()),
                    None => slot.shared.lock().endpoints = cfg.endpoints.clone(),
                }
                slot.cfg = Arc::new(cfg.clone());
                tracing::info!(profile = %name, version = set.version, %to, "pushed endpoints applied: following the group");
                for f in &cfg.forwards {
                    results.push(ForwardResult {
                        profile: name.to_string(),
                        forward: f.clone(),
                        ok: true,
                        detail: format!("unchanged; following the group to {to}"),
                    });
                }
                continue;
            }
            let login = match super::login(&cfg, self.ssh.as_ref()) {
                Ok(i) => i,
                Err(e) => {
                    results.push(fail(e.to_string()));
                    continue;
                }
            };
            let (replaced, predecessor) = match self.slots.remove(name) {
                Some(mut old) => {
                    // Make before break: the old session stops accepting (ports freed) but
                    // keeps its open connections while the new one starts.
                    let freed = old
                        .running
                        .take()
                        .map(|h| Gate::after(h.begin_replace(profile::REPLACE_DRAIN)))
                        .or(old.released.take());
                    (true, freed)
                }
                None => (false, None),
            };
            self.slots.insert(
                name.to_string(),
                Slot {
                    origin: Origin::Pushed,
                    shared: profile::new_shared(&cfg),
                    cfg: Arc::new(cfg),
                    login,
                    running: None,
                    released: predecessor,
                },
            );
            tracing::info!(profile = %name, version = set.version, replaced, "pushed profile applied");
            started.push((name.to_string(), replaced));
        }
        // Each new profile waits for its own predecessor and for every profile this set
        // removed, then binds.
        let mut watch: Vec<(String, bool, Arc<ProfileSpec>, Arc<ProfileShared>)> = Vec::new();
        for (name, replaced) in started {
            let Some(slot) = self.slots.get_mut(&name) else {
                continue;
            };
            let mut gates = released.clone();
            gates.extend(slot.released.take());
            slot.released = match gates.len() {
                0 => None,
                1 => gates.pop(),
                _ => Some(Gate::after(async move {
                    for g in &gates {
                        g.wait().await;
                    }
                })),
            };
            let _ = self.start(&name);
            // After the start: a run gets fresh shared state.
            if let Some(slot) = self.slots.get(&name) {
                watch.push((name, replaced, slot.cfg.clone(), slot.shared.clone()));
            }
        }
        let version = set.version;
        Box::pin(tracing::Instrument::instrument(
            async move {
                // The acknowledgement comes once removed profiles released their ports.
                for g in &released {
                    g.wait().await;
                }
                // Let the new listeners bind (or fail to) before reporting.
                let deadline = tokio::time::Instant::now() + APPLY_SETTLE;
                for (name, replaced, cfg, shared) in watch {
                    let snap = loop {
                        let snap = shared.snapshot();
                        let settled = snap
                            .forwards
                            .iter()
                            .all(|f| f.state != ForwardState::Stopped);
                        if settled || tokio::time::Instant::now() >= deadline {
                            break snap;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    };
                    for (spec, f) in cfg.forwards.iter().zip(&snap.forwards) {
                        let verb = if replaced { "replaced" } else { "started" };
                        let (ok, detail) = match f.state {
                            ForwardState::Retrying => (false, f.detail.clone().unwrap_or_default()),
                            ForwardState::Stopped => (false, "did not start".to_string()),
                            s => (true, format!("{verb}, {s:?}").to_lowercase()),
                        };
                        results.push(ForwardResult {
                            profile: name.clone(),
                            forward: spec.clone(),
                            ok,
                            detail,
                        });
                    }
                }
                Applied {
                    version,
                    ok: results.iter().all(|r| r.ok),
                    results,
                }
            },
            span,
        ))
    }
}

/// True when `new` is `old` with other endpoints (or the same ones in another order).
fn only_endpoints_differ(old: &ProfileSpec, new: &ProfileSpec) -> bool {
    old.endpoints != new.endpoints
        && ProfileSpec {
            endpoints: new.endpoints.clone(),
            ..old.clone()
        } == *new
}
