//! What the coordinator remembers about each agent between connections.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode, decode_all, json};

/// What the coordinator remembers about an agent between connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Agent id.
    pub id: String,
    /// Labels from its last hello.
    pub labels: BTreeMap<String, String>,
    /// Last contact (Unix ms).
    pub last_seen_unix_ms: u64,
    /// The fleet version it last acknowledged.
    pub applied_version: Option<u64>,
    /// Whether that apply succeeded on every forward.
    pub applied_ok: bool,
    /// Per-forward failures of that apply.
    pub apply_errors: Vec<String>,
    /// Labels its join token gave it.
    #[serde(default)]
    pub enrolled_labels: BTreeMap<String, String>,
    /// Enrolled with a join token: only the token's labels count.
    #[serde(default)]
    pub enrolled: bool,
}

impl AgentRecord {
    /// The labels assignments match. An agent enrolled with a token has the token's labels and
    /// nothing else: what its hello declares on top is shown but selects nothing (a stolen
    /// appliance cannot talk itself into another site's profiles). An agent whose certificate
    /// the operator issued by hand (`pki issue-agent`) declares its labels in its own config.
    pub fn effective_labels(&self) -> BTreeMap<String, String> {
        if self.enrolled {
            return self.enrolled_labels.clone();
        }
        let mut labels = self.labels.clone();
        labels.extend(self.enrolled_labels.clone());
        labels
    }
}

/// An agent's labels.
pub type Labels = BTreeMap<String, String>;

impl Store {
    /// Every known agent's id and the labels assignments match against.
    pub fn agent_labels(&self) -> Result<Vec<(String, Labels)>, StoreError> {
        Ok(self
            .agents()?
            .into_iter()
            .map(|r| {
                let labels = r.effective_labels();
                (r.id, labels)
            })
            .collect())
    }

    /// Records an agent's contact (durable before return).
    pub async fn record_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.agents.insert(rec.id.as_bytes(), json(rec))?;
        self.durable().await
    }

    /// One agent's record.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.agents
            .get(id.as_bytes())?
            .map(|v| decode(&v, "agents", id))
            .transpose()
    }

    /// Every agent ever seen.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        decode_all(&self.agents, "agents")
    }
}
