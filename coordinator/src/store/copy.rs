//! Moving a fleet's state from one store to another (`tunnelfleet-coordinator migrate`):
//! every record of every family, byte for byte, so versions, history, ids and the store's
//! identity (which alert idempotency keys carry) stay what they were.

use super::{Store, StoreError, Tree, u64_of};

/// Records moved, per family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// Family name and how many records.
    pub families: Vec<(&'static str, usize)>,
}

/// Why a migration did not start.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The destination holds a fleet already.
    #[error(
        "the destination already holds a fleet state ({what}): migrate into an empty store (another etcd prefix)"
    )]
    NotEmpty {
        /// What was found there.
        what: String,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Records written before each commit.
const BATCH: usize = 1000;

impl Store {
    /// The families a migration moves (not the coordinators' own registrations and lead, which
    /// belong to the running coordinators).
    fn families(&self) -> [(&'static str, &Tree); 19] {
        [
            ("meta", &self.meta),
            ("profiles", &self.profiles),
            ("assignments", &self.assignments),
            ("agents", &self.agents),
            ("events", &self.events),
            ("groups", &self.groups),
            ("alerts", &self.alerts),
            ("outbox", &self.outbox),
            ("outbox_by_hook", &self.outbox_by_hook),
            ("firing", &self.firing),
            ("silences", &self.silences),
            ("tokens", &self.tokens),
            ("revoked", &self.revoked),
            ("ssh_certs", &self.ssh_certs),
            ("history", &self.history),
            ("admin_tokens", &self.admin_tokens),
            ("rollouts", &self.rollouts),
            ("admin_names", &self.admin_names),
            ("audit_log", &self.audit_log),
        ]
    }

    /// Copies every record of this store into `to`, which must hold no fleet yet; durable
    /// there before return. Ids handed out by `to` from then on are above every id copied.
    pub async fn copy_into(&self, to: &Store) -> Result<Copied, CopyError> {
        let found: Vec<String> = [
            ("profiles", to.profiles.len()),
            ("agents", to.agents.len()),
            ("events", to.events.len()),
            ("alerts", to.alerts.len()),
            ("tokens", to.tokens.len()),
            ("groups", to.groups.len()),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(f, n)| format!("{n} {f}"))
        .collect();
        if !found.is_empty() || to.fleet_version()? > 0 {
            return Err(CopyError::NotEmpty {
                what: if found.is_empty() {
                    format!("fleet version {}", to.fleet_version()?)
                } else {
                    found.join(", ")
                },
            });
        }
        let mut families = Vec::new();
        let mut max_id = 0u64;
        let theirs = to.families();
        for (i, (name, from)) in self.families().into_iter().enumerate() {
            let dest = theirs[i].1;
            let mut n = 0;
            for entry in from.iter() {
                let (k, v) = entry?;
                if matches!(
                    name,
                    "events" | "alerts" | "outbox" | "silences" | "audit_log"
                ) {
                    max_id = max_id.max(u64_of(&k));
                }
                dest.insert(&k, &v)?;
                n += 1;
                if n % BATCH == 0 {
                    to.durable().await?;
                }
            }
            to.durable().await?;
            families.push((name, n));
        }
        to.db.reserve_ids(max_id.saturating_add(1)).await?;
        Ok(Copied { families })
    }
}
