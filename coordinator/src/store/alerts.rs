//! Alerts from firing to resolution: each state is written with its deliveries by the outbox
//! (`outbox`), unless a silence (`silences`) holds it. The rules that raise and resolve alerts
//! live in `crate::monitor`, delivery in `crate::hooks`.
use serde::{Deserialize, Serialize};
use tunnelfleet_runtime::clock::now_unix_ms;

use super::silences::Silence;
use super::{Store, StoreError, decode, decode_all, json, u64_of};

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// An OMA endpoint failed its checks: one incident for the fleet, naming the agents on it.
    OmaDown,
    /// An OMA endpoint's sshd answers, but most agents' tunnels through it fail (health checks,
    /// or agents that had to leave it): one incident, and the group fails over.
    OmaUnhealthy,
    /// A tunnel's health check keeps failing on one agent while its OMA is healthy.
    TunnelHealth,
    /// An agent stopped sending heartbeats.
    AgentOffline,
    /// An OMA refuses an agent's key.
    SshAuth,
    /// A forward cannot bind its port (or the server refuses it).
    PortConflict,
    /// An agent process keeps restarting.
    AgentRestarting,
    /// An agent's SSH certificate has less than a quarter of its life left: not renewed.
    SshCertExpiring,
    /// A staged rollout halted: which agents failed and why (raised by the rollout driver, not
    /// the rules; resolved by `rollout resume` or `rollout abort`).
    RolloutHalted,
}

impl AlertKind {
    /// Whether an alert of this kind is about one agent (its first affected agent), so that it
    /// counts against that agent's cap.
    pub fn about_one_agent(self) -> bool {
        !matches!(
            self,
            AlertKind::OmaDown | AlertKind::OmaUnhealthy | AlertKind::RolloutHalted
        )
    }

    /// Whether the alert rules (`monitor`) raise and resolve it.
    pub fn from_rules(self) -> bool {
        self != AlertKind::RolloutHalted
    }

    /// The name used in keys, hooks and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::OmaDown => "oma_down",
            AlertKind::OmaUnhealthy => "oma_unhealthy",
            AlertKind::TunnelHealth => "tunnel_health",
            AlertKind::AgentOffline => "agent_offline",
            AlertKind::SshAuth => "ssh_auth",
            AlertKind::PortConflict => "port_conflict",
            AlertKind::AgentRestarting => "agent_restarting",
            AlertKind::SshCertExpiring => "ssh_cert_expiring",
            AlertKind::RolloutHalted => "rollout_halted",
        }
    }

    /// How bad: OMA and auth problems take tunnels down for many or for good.
    pub fn severity(self) -> &'static str {
        match self {
            AlertKind::OmaDown
            | AlertKind::OmaUnhealthy
            | AlertKind::SshAuth
            | AlertKind::TunnelHealth => "critical",
            _ => "warning",
        }
    }
}

/// Firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    /// The condition holds.
    Firing,
    /// The condition cleared.
    Resolved,
}

impl AlertStatus {
    /// `firing` or `resolved`, as hooks and idempotency keys spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// One alert, from firing to resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Id (assigned by the store).
    pub id: u64,
    /// What kind of alert.
    pub kind: AlertKind,
    /// What it is about: an endpoint, `agent`, `agent/profile` or `agent/profile/forward`.
    pub subject: String,
    /// One line for people.
    pub summary: String,
    /// Agents affected (the OMA-down incident lists every agent on the endpoint).
    pub affected_agents: Vec<String>,
    /// Firing or resolved.
    pub status: AlertStatus,
    /// When it fired (Unix ms).
    pub fired_unix_ms: u64,
    /// When it resolved (Unix ms).
    pub resolved_unix_ms: Option<u64>,
    /// Who acknowledged it.
    pub acked_by: Option<String>,
    /// When (Unix ms).
    pub acked_unix_ms: Option<u64>,
    /// A silence matched when it fired: recorded, not delivered.
    pub silenced: bool,
}

impl Alert {
    /// A new firing alert (the store gives it its id when it is fired).
    pub fn firing(
        kind: AlertKind,
        subject: String,
        summary: String,
        affected: Vec<String>,
    ) -> Self {
        Alert {
            id: 0,
            kind,
            subject,
            summary,
            affected_agents: affected,
            status: AlertStatus::Firing,
            fired_unix_ms: now_unix_ms(),
            resolved_unix_ms: None,
            acked_by: None,
            acked_unix_ms: None,
            silenced: false,
        }
    }

    /// `kind:subject`: one firing alert per key at a time.
    pub fn key(&self) -> String {
        alert_key(self.kind, &self.subject)
    }

    /// The idempotency key of this alert in its current state, in the store `store_id`: a
    /// receiver that sees it twice (at-least-once delivery) can drop the second.
    pub fn idempotency_key(&self, store_id: &str) -> String {
        format!(
            "tunnelfleet-{store_id}-alert-{}-{}",
            self.id,
            self.status.as_str()
        )
    }
}

/// `kind:subject`.
pub fn alert_key(kind: AlertKind, subject: &str) -> String {
    format!("{}:{subject}", kind.as_str())
}

impl Store {
    /// Alerts, newest first; only firing ones (read through their index) unless `all`.
    pub fn alerts(&self, all: bool) -> Result<Vec<Alert>, StoreError> {
        let mut v: Vec<Alert> = if all {
            decode_all(&self.alerts, "alerts")?
        } else {
            let mut v = Vec::new();
            for k in self.firing.keys()? {
                if let Some(a) = self.alerts.get(&k)? {
                    let a: Alert = decode(&a, "alerts", &u64_of(&k).to_string())?;
                    if a.status == AlertStatus::Firing {
                        v.push(a);
                    }
                }
            }
            v
        };
        v.reverse();
        Ok(v)
    }

    /// Builds the index of firing alerts of a store written before it existed.
    pub(super) fn index_firing(&self) -> Result<(), StoreError> {
        if self.meta.get(super::META_FIRING_INDEXED)?.is_some() {
            return Ok(());
        }
        for a in decode_all::<Alert>(&self.alerts, "alerts")? {
            if a.status == AlertStatus::Firing {
                self.firing.insert(a.id.to_be_bytes(), &[][..])?;
            }
        }
        self.meta.insert(super::META_FIRING_INDEXED, &[1u8][..])?;
        self.db.flush()?;
        Ok(())
    }

    /// One alert.
    pub fn alert(&self, id: u64) -> Result<Option<Alert>, StoreError> {
        self.alerts
            .get(id.to_be_bytes())?
            .map(|v| decode(&v, "alerts", &id.to_string()))
            .transpose()
    }

    /// The latest `n` resolved alerts, newest first (the fleet page's "recent"); reads at most
    /// a few times `n` records, never the whole history.
    pub fn recent_resolved(&self, n: usize) -> Result<Vec<Alert>, StoreError> {
        let mut out = Vec::new();
        for r in self.alerts.iter().rev().take(n.saturating_mul(8).max(64)) {
            let (k, v) = r?;
            let a: Alert = decode(&v, "alerts", &u64_of(&k).to_string())?;
            if a.status == AlertStatus::Resolved {
                out.push(a);
                if out.len() >= n {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Records a new firing alert (id assigned here) and queues one delivery per hook unless a
    /// silence matches; durable before return.
    pub async fn fire_alert(
        &self,
        mut alert: Alert,
        hooks: &[String],
    ) -> Result<Alert, StoreError> {
        alert.id = self.db.generate_id().await? + 1;
        alert.status = AlertStatus::Firing;
        alert.silenced = self.silenced(&alert.key(), now_unix_ms())?;
        self.write_alert(&alert, hooks).await?;
        Ok(alert)
    }

    /// Resolves a firing alert and queues its resolution to the hooks its firing went to.
    pub async fn resolve_alert(&self, id: u64, hooks: &[String]) -> Result<Alert, StoreError> {
        let mut alert = self.alert(id)?.ok_or(StoreError::NoAlert(id))?;
        alert.status = AlertStatus::Resolved;
        alert.resolved_unix_ms = Some(now_unix_ms());
        self.write_alert(&alert, hooks).await?;
        Ok(alert)
    }

    /// A firing alert that fired silenced, its silences now over: queued to `hooks` as firing
    /// (durable before return), so an incident that outlived its silence reaches someone. Its
    /// resolution is then delivered too.
    pub async fn release_silenced(&self, id: u64, hooks: &[String]) -> Result<Alert, StoreError> {
        let mut alert = self.alert(id)?.ok_or(StoreError::NoAlert(id))?;
        alert.silenced = false;
        self.write_alert(&alert, hooks).await?;
        Ok(alert)
    }

    /// Acknowledges an alert (someone is on it).
    pub async fn ack_alert(&self, id: u64, by: &str) -> Result<Alert, StoreError> {
        let mut alert = self.alert(id)?.ok_or(StoreError::NoAlert(id))?;
        alert.acked_by = Some(by.to_string());
        alert.acked_unix_ms = Some(now_unix_ms());
        self.alerts.insert(id.to_be_bytes(), json(&alert))?;
        self.durable().await?;
        Ok(alert)
    }

    /// Drops what no rule and no operator needs any more: alerts resolved more than 90 days
    /// (`ALERT_RETENTION`) ago, and silences that ended. Firing alerts are never touched, nor
    /// queued deliveries (each holds its own copy of its alert). Returns (alerts, silences)
    /// dropped.
    pub async fn prune_alerts(&self, now_unix_ms: u64) -> Result<(usize, usize), StoreError> {
        let cutoff = now_unix_ms.saturating_sub(ALERT_RETENTION.as_millis() as u64);
        let mut alerts = 0;
        for a in decode_all::<Alert>(&self.alerts, "alerts")? {
            if a.status == AlertStatus::Resolved && a.resolved_unix_ms.is_some_and(|r| r < cutoff) {
                self.alerts.remove(a.id.to_be_bytes())?;
                alerts += 1;
            }
        }
        let mut silences = 0;
        for s in decode_all::<Silence>(&self.silences, "silences")? {
            if s.until_unix_ms <= now_unix_ms {
                self.silences.remove(s.id.to_be_bytes())?;
                silences += 1;
            }
        }
        if alerts + silences > 0 {
            self.durable().await?;
        }
        Ok((alerts, silences))
    }
}

/// How long a resolved alert stays in `alerts list --all`.
pub(super) const ALERT_RETENTION: std::time::Duration =
    std::time::Duration::from_secs(90 * 24 * 3600);

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    /// An `oma_down` alert about `subject` (the store's tests of alerts and the outbox).
    pub(in crate::store) fn alert(subject: &str) -> Alert {
        Alert::firing(AlertKind::OmaDown, subject.into(), "down".into(), vec![])
    }

    /// Old resolved alerts and ended silences go; firing alerts, recent ones and running
    /// silences stay, and so do queued deliveries.
    #[tokio::test]
    async fn pruning_drops_old_resolved_alerts_and_ended_silences_only() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let day = 24 * 3600 * 1000u64;
        let old = s
            .fire_alert(alert("old:22"), &["ops".into()])
            .await
            .unwrap();
        s.resolve_alert(old.id, &["ops".into()]).await.unwrap();
        let firing = s.fire_alert(alert("firing:22"), &[]).await.unwrap();
        let recent = s.fire_alert(alert("recent:22"), &[]).await.unwrap();
        s.resolve_alert(recent.id, &[]).await.unwrap();
        let now = now_unix_ms();
        for (m, until) in [("ended:*", now - 1), ("running:*", now + day)] {
            s.add_silence(Silence {
                id: 0,
                matcher: m.into(),
                until_unix_ms: until,
                comment: String::new(),
            })
            .await
            .unwrap();
        }
        let queued = s.deliveries().unwrap().len();
        // Now: only the ended silence goes (both alerts were resolved just now).
        assert_eq!(s.prune_alerts(now).await.unwrap(), (0, 1));
        assert_eq!(s.silences(now).unwrap().len(), 1);
        let (alerts, _) = s.prune_alerts(now + 91 * day).await.unwrap();
        assert_eq!(alerts, 2, "both resolved alerts are past 90 days by then");
        let left: Vec<u64> = s.alerts(true).unwrap().iter().map(|a| a.id).collect();
        assert_eq!(left, vec![firing.id], "only the firing alert stays");
        assert_eq!(
            s.deliveries().unwrap().len(),
            queued,
            "queued deliveries untouched"
        );
    }
}
