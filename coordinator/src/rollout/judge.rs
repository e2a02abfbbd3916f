//! One agent of a stage, judged from what the coordinator knows of it.
use tunnelfleet_protocol::{ForwardState, Heartbeat, TunnelState};

/// What the coordinator knows of one agent of the stage in progress.
#[derive(Debug, Clone, Default)]
pub struct AgentView {
    /// Its control link is up.
    pub connected: bool,
    /// It has not missed three heartbeats.
    pub online: bool,
    /// It was connected at some point of this stage (in this coordinator's life).
    pub seen: bool,
    /// The latest push to it was the new version (not the one from before the rollout).
    pub pushed_new: bool,
    /// The latest push was acknowledged.
    pub acked: bool,
    /// Its stored apply result for the acknowledged push: ok, or the errors.
    pub apply: Option<Result<(), Vec<String>>>,
    /// Its latest heartbeat (as judged), if one came after the acknowledgement.
    pub heartbeat: Option<std::sync::Arc<Heartbeat>>,
    /// The same as the agent sent it: only to say why a profile is missing from the judged
    /// one (on an endpoint it was not given), never to pass it.
    pub reported: Option<std::sync::Arc<Heartbeat>>,
    /// The profiles it was given.
    pub profiles: Vec<String>,
}

/// The verdict on one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Applied, every session up, every forward bound, every health check passing.
    Good,
    /// Not there yet (being pushed, applying, connecting): why.
    NotYet(String),
    /// Failed: why. The stage halts.
    Failed(String),
}

/// Judges one agent of the stage in progress.
pub fn check(v: &AgentView) -> Check {
    use Check::{Failed, Good, NotYet};
    if !v.online {
        return if v.seen {
            Failed("went offline".into())
        } else {
            NotYet("not connected".into())
        };
    }
    // Its link is down but it is not offline yet: it is linking to another coordinator (its
    // own died, or it was handed over), which its tunnels never depend on.
    if !v.connected {
        return NotYet("relinking".into());
    }
    if !v.pushed_new {
        return NotYet("new version not pushed yet".into());
    }
    if !v.acked {
        return NotYet("applying".into());
    }
    match &v.apply {
        None => return NotYet("applying".into()),
        Some(Err(errors)) => {
            return Failed(format!("apply failed: {}", errors.join("; ")));
        }
        Some(Ok(())) => {}
    }
    let Some(hb) = &v.heartbeat else {
        return NotYet("no heartbeat since it applied".into());
    };
    for name in &v.profiles {
        let Some(p) = hb.profiles.iter().find(|p| &p.name == name) else {
            let raw = v
                .reported
                .as_ref()
                .and_then(|r| r.profiles.iter().find(|p| &p.name == name));
            return NotYet(match raw {
                Some(p) => format!(
                    "profile {name}: still on {}, not an endpoint it was given{}",
                    crate::fleet::clean_text(&p.active_endpoint, false, 100),
                    p.last_error
                        .as_deref()
                        .map(|e| format!(" ({})", crate::fleet::clean_text(e, false, 300)))
                        .unwrap_or_default()
                ),
                None => format!("profile {name} not reported yet"),
            });
        };
        if p.consecutive_failures > 0 {
            let why = p
                .health
                .iter()
                .rev()
                .find(|h| !h.ok)
                .map(|h| h.detail.clone())
                .unwrap_or_else(|| format!("{} failures in a row", p.consecutive_failures));
            return Failed(format!("profile {name}: health check failing: {why}"));
        }
        match p.state {
            TunnelState::Up => {}
            TunnelState::Backoff => {
                return Failed(format!(
                    "profile {name}: session to {} not up: {}",
                    p.active_endpoint,
                    p.last_error.as_deref().unwrap_or("it failed")
                ));
            }
            s => return NotYet(format!("profile {name}: session {s:?}").to_lowercase()),
        }
        for f in &p.forwards {
            match f.state {
                ForwardState::Active => {}
                ForwardState::Retrying => {
                    return Failed(format!(
                        "profile {name}: forward {}: {}",
                        f.spec,
                        f.detail.as_deref().unwrap_or("cannot bind")
                    ));
                }
                s => {
                    return NotYet(
                        format!("profile {name}: forward {} {s:?}", f.spec).to_lowercase(),
                    );
                }
            }
        }
    }
    Good
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use std::sync::Arc;

    use tunnelfleet_protocol::{ForwardReport, HealthSample, ProfileReport};

    use super::*;

    fn view(p: ProfileReport) -> AgentView {
        AgentView {
            connected: true,
            online: true,
            seen: true,
            pushed_new: true,
            acked: true,
            apply: Some(Ok(())),
            heartbeat: Some(Arc::new(Heartbeat {
                seq: 1,
                sent_unix_ms: 1,
                profiles: vec![p],
            })),
            reported: None,
            profiles: vec!["oma".into()],
        }
    }

    fn up() -> ProfileReport {
        let mut p = ProfileReport::new("oma", TunnelState::Up, "oma-a:22");
        p.forwards.push(ForwardReport {
            spec: "L 8082:localhost:8082".into(),
            state: ForwardState::Active,
            detail: None,
            bytes_out: 0,
            bytes_in: 0,
            connections_open: 0,
        });
        p
    }

    #[test]
    fn up_bound_and_healthy_is_good() {
        assert_eq!(check(&view(up())), Check::Good);
    }

    #[test]
    fn a_session_that_cannot_connect_fails_naming_the_endpoint_and_the_error() {
        let mut p = up();
        p.state = TunnelState::Backoff;
        p.last_error = Some("connection refused".into());
        let Check::Failed(why) = check(&view(p)) else {
            panic!()
        };
        assert!(
            why.contains("oma-a:22") && why.contains("connection refused"),
            "{why}"
        );
    }

    #[test]
    fn a_forward_that_cannot_bind_or_a_failing_health_check_fails() {
        let mut p = up();
        p.forwards[0].state = ForwardState::Retrying;
        p.forwards[0].detail = Some("address in use".into());
        assert!(matches!(check(&view(p)), Check::Failed(w) if w.contains("address in use")));
        let mut p = up();
        p.consecutive_failures = 1;
        p.health.push(HealthSample {
            at_unix_ms: 1,
            ok: false,
            latency_us: 0,
            detail: "HTTP 503".into(),
        });
        assert!(matches!(check(&view(p)), Check::Failed(w) if w.contains("HTTP 503")));
    }

    #[test]
    fn an_apply_error_fails_an_offline_agent_fails_once_seen_and_a_relink_waits() {
        let mut v = view(up());
        v.apply = Some(Err(vec!["oma L 8082: address in use".into()]));
        assert!(matches!(check(&v), Check::Failed(w) if w.contains("apply failed")));
        let mut v = view(up());
        v.online = false;
        assert_eq!(check(&v), Check::Failed("went offline".into()));
        v.seen = false;
        assert!(matches!(check(&v), Check::NotYet(_)));
        // A link down within the offline threshold is a relink, not a failure.
        let mut v = view(up());
        v.connected = false;
        assert_eq!(check(&v), Check::NotYet("relinking".into()));
        v.online = false;
        assert_eq!(check(&v), Check::Failed("went offline".into()));
    }

    #[test]
    fn connecting_unacknowledged_or_unreported_is_not_yet() {
        let mut p = up();
        p.state = TunnelState::Connecting;
        assert!(matches!(check(&view(p)), Check::NotYet(_)));
        let mut v = view(up());
        v.acked = false;
        assert!(matches!(check(&v), Check::NotYet(_)));
        let mut v = view(up());
        v.heartbeat = None;
        assert!(matches!(check(&v), Check::NotYet(_)));
        let mut v = view(up());
        v.profiles = vec!["other".into()];
        assert!(matches!(check(&v), Check::NotYet(_)));
    }

    /// A profile left out of the judged heartbeat (its endpoint was not one it was given) waits,
    /// and says where that profile itself is, not another profile of the agent.
    #[test]
    fn a_profile_on_an_endpoint_it_was_not_given_waits_naming_where_it_is() {
        let mut v = view(up());
        v.profiles = vec!["oma".into(), "nbd".into()];
        let mut elsewhere = ProfileReport::new("nbd", TunnelState::Up, "rogue:22");
        elsewhere.last_error = Some("moved by hand".into());
        v.reported = Some(Arc::new(Heartbeat {
            seq: 1,
            sent_unix_ms: 1,
            profiles: vec![up(), elsewhere],
        }));
        assert_eq!(
            check(&v),
            Check::NotYet(
                "profile nbd: still on rogue:22, not an endpoint it was given (moved by hand)"
                    .into()
            )
        );
    }
}
