//! The consecutive-failure rule of the agent-side checks (SSH auth, port conflicts): `threshold`
//! failed checks in a row raise the alert once, any pass resets the count and resolves it.

use super::{Action, Monitor};
use crate::store::{AlertKind, alert_key};

impl Monitor {
    /// Counts one check of an agent-side key; returns Fire/Resolve as the count crosses.
    pub(super) fn agent_check(
        &mut self,
        kind: AlertKind,
        subject: String,
        failed: u32,
        hold: bool,
        summary: impl FnOnce(u32) -> String,
        agent: &str,
    ) -> Option<Action> {
        let key = alert_key(kind, &subject);
        if failed == 0 {
            self.streaks.remove(&key);
            return self
                .firing
                .remove(&key)
                .then_some(Action::Resolve { kind, subject });
        }
        let streak = self.streaks.entry(key.clone()).or_default();
        let n = streak.record(failed);
        if streak.reached(self.rules.threshold) && !hold && !self.firing.contains(&key) {
            self.firing.insert(key);
            return Some(Action::Fire {
                kind,
                subject,
                summary: summary(n),
                affected: vec![agent.to_string()],
            });
        }
        None
    }
}
