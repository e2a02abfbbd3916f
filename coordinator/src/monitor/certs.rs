//! The agents' SSH certificates: `ssh_cert_expiring` when one has less than a quarter of its
//! life left. An agent asks for its next certificate at half-life, so by then renewal has failed
//! for a quarter of the validity (1.75 days of the default 7): the agent is cut off from every
//! coordinator, or refused. The alert says when the certificate runs out; past that, the OMAs
//! refuse the agent's next login. It resolves when a new certificate is issued, and a revoked
//! agent raises none.
//!
//! An agent's first certificate starts its onboarding: each OMA learns its principal line at
//! its next `oma sync` (a 10 s timer), so its first logins may be refused, and its tunnels down,
//! for that long and its reconnect backoff. For [`ONBOARDING_GRACE`] the profiles that log in
//! with the certificate count toward no `ssh_auth` or `tunnel_health` alert (a static key's
//! do: nothing about it waits for a sync).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use tunnelfleet_protocol::{Heartbeat, limits::MAX_PROFILES};

use super::{Action, Monitor};
use crate::store::{AlertKind, alert_key};

/// How long after its first certificate an agent's refused logins and failing tunnels are not
/// counted: the OMAs' sync period (10 s) and a reconnect backoff after a refusal.
pub const ONBOARDING_GRACE: Duration = Duration::from_secs(45);

/// One agent's latest certificate as the rule sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertView {
    /// The agent.
    pub agent: String,
    /// The certificate's serial.
    pub serial: u64,
    /// Valid from (Unix seconds).
    pub valid_after: u64,
    /// Valid until (Unix seconds).
    pub valid_before: u64,
    /// The agent is revoked (its certificate is meant to run out).
    pub revoked: bool,
}

/// A certificate valid from `valid_after` to `valid_before` has less than a quarter of its life
/// left at `now_unix_s` (or none).
pub fn cert_expiring(valid_after: u64, valid_before: u64, now_unix_s: u64) -> bool {
    let life = valid_before.saturating_sub(valid_after);
    let left = valid_before.saturating_sub(now_unix_s);
    left.saturating_mul(4) < life
}

/// An onboarding agent: until when, the profiles that log in with its certificate, and every
/// profile name already looked up (those and the ones it reported since).
#[derive(Debug)]
pub(super) struct Onboarding {
    until: Instant,
    certified: BTreeSet<String>,
    looked_up: BTreeSet<String>,
}

impl Monitor {
    /// `agent` got its first SSH certificate at `now`; `profiles` are those it logs in with
    /// it (no `identity_file`): only their refusals wait for the OMAs' sync.
    pub fn onboarding(&mut self, agent: &str, profiles: BTreeSet<String>, now: Instant) {
        self.onboarding.insert(
            agent.to_string(),
            Onboarding {
                until: now + ONBOARDING_GRACE,
                looked_up: profiles.clone(),
                certified: profiles,
            },
        );
    }

    /// Whether `agent` is onboarding at `now` and reports a profile not looked up yet (one
    /// assigned after its first certificate): the caller looks up which of its profiles log in
    /// with the certificate and tells [`Monitor::onboarding_profiles`]. Once per new name.
    pub fn onboarding_lookup(&self, agent: &str, hb: &Heartbeat, now: Instant) -> bool {
        self.onboarding.get(agent).is_some_and(|o| {
            now < o.until && hb.profiles.iter().any(|p| !o.looked_up.contains(&p.name))
        })
    }

    /// `agent`'s profiles that log in with its certificate are now `profiles`, looked up
    /// after the heartbeat `hb`.
    pub fn onboarding_profiles(&mut self, agent: &str, profiles: BTreeSet<String>, hb: &Heartbeat) {
        if let Some(o) = self.onboarding.get_mut(agent) {
            o.looked_up.extend(profiles.iter().cloned());
            o.looked_up.extend(
                hb.profiles
                    .iter()
                    .take(MAX_PROFILES)
                    .map(|p| p.name.clone()),
            );
            o.certified = profiles;
        }
    }

    /// Whether `agent`'s `profile` is onboarding at `now` (forgotten once it is over).
    pub(super) fn is_onboarding(&mut self, agent: &str, profile: &str, now: Instant) -> bool {
        match self.onboarding.get(agent) {
            Some(o) if now < o.until => o.certified.contains(profile),
            Some(_) => {
                self.onboarding.remove(agent);
                false
            }
            None => false,
        }
    }

    /// Raises `ssh_cert_expiring` for each certificate in `certs` with less than a quarter of
    /// its life left, resolves it for the others.
    pub fn ssh_certs(&mut self, certs: &[CertView], now_unix_s: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        for c in certs {
            let key = alert_key(AlertKind::SshCertExpiring, &c.agent);
            if !c.revoked && cert_expiring(c.valid_after, c.valid_before, now_unix_s) {
                if self.firing.insert(key) {
                    actions.push(Action::Fire {
                        kind: AlertKind::SshCertExpiring,
                        subject: c.agent.clone(),
                        summary: summary(c, now_unix_s),
                        affected: vec![c.agent.clone()],
                    });
                }
            } else if self.firing.remove(&key) {
                actions.push(Action::Resolve {
                    kind: AlertKind::SshCertExpiring,
                    subject: c.agent.clone(),
                });
            }
        }
        actions
    }
}

fn summary(c: &CertView, now_unix_s: u64) -> String {
    let at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.valid_before),
    );
    let when = if c.valid_before > now_unix_s {
        format!(
            "expires at {at} (in {})",
            humantime::format_duration(std::time::Duration::from_secs(c.valid_before - now_unix_s))
        )
    } else {
        format!("expired at {at}")
    };
    format!(
        "agent {}'s SSH certificate (serial {}) {when} and was not renewed at half-life: the OMAs refuse its next login once it has run out",
        c.agent, c.serial
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn cert(agent: &str, valid_before: u64) -> CertView {
        CertView {
            agent: agent.into(),
            serial: 7,
            valid_after: valid_before - 8 * DAY,
            valid_before,
            revoked: false,
        }
    }

    fn kinds(actions: &[Action]) -> Vec<(&'static str, &str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Fire { subject, .. } => Some(("fire", subject.as_str())),
                Action::Resolve { kind, subject } if *kind == AlertKind::SshCertExpiring => {
                    Some(("resolve", subject.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_certificate_at_its_end_reads_expired() {
        let c = cert("vma-1", 10 * DAY);
        assert!(summary(&c, 10 * DAY - 60).contains("(in 1m)"));
        let s = summary(&c, 10 * DAY);
        assert!(s.contains("expired at 1970-01-11T00:00:00Z"), "{s}");
    }

    #[test]
    fn a_quarter_of_its_life_left_raises_it_once() {
        let mut m = Monitor::default();
        let start = 1_000 * DAY;
        let c = [cert("vma-1", start + 8 * DAY)];
        // At half-life, not renewed yet: quiet.
        assert!(m.ssh_certs(&c, start + 4 * DAY).is_empty());
        // Exactly a quarter left: not yet.
        assert!(m.ssh_certs(&c, start + 6 * DAY).is_empty());
        // Less than a quarter: fired, once.
        let fired = m.ssh_certs(&c, start + 6 * DAY + 1);
        assert_eq!(kinds(&fired), vec![("fire", "vma-1")]);
        let Action::Fire { summary, kind, .. } = &fired[0] else {
            unreachable!()
        };
        assert_eq!(*kind, AlertKind::SshCertExpiring);
        assert!(summary.contains("serial 7"), "{summary}");
        assert!(summary.contains("(in 1day 23h 59m 59s)"), "{summary}");
        assert!(m.ssh_certs(&c, start + 7 * DAY).is_empty());
        // Expired: still firing, not raised again.
        assert!(m.ssh_certs(&c, start + 9 * DAY).is_empty());
        assert!(m.is_firing(AlertKind::SshCertExpiring, "vma-1"));
    }

    #[test]
    fn a_renewal_or_a_revoke_resolves_it() {
        let mut m = Monitor::default();
        let now = 1_000 * DAY;
        let old = cert("vma-1", now + DAY);
        let other = cert("vma-2", now + DAY);
        assert_eq!(m.ssh_certs(&[old, other.clone()], now).len(), 2);
        let renewed = cert("vma-1", now + 7 * DAY);
        let revoked = CertView {
            revoked: true,
            ..other
        };
        assert_eq!(
            kinds(&m.ssh_certs(&[renewed, revoked.clone()], now)),
            vec![("resolve", "vma-1"), ("resolve", "vma-2")]
        );
        // A revoked agent's running out raises nothing.
        assert!(m.ssh_certs(&[revoked], now + 2 * DAY).is_empty());
    }

    #[test]
    fn an_expired_certificate_says_so() {
        let mut m = Monitor::default();
        let now = 1_000 * DAY;
        let fired = m.ssh_certs(&[cert("vma-1", now - 10)], now);
        let Action::Fire { summary, .. } = &fired[0] else {
            panic!("{fired:?}")
        };
        assert!(summary.contains("expired at"), "{summary}");
    }
}
