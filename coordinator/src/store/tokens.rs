//! Join tokens (stored by the hash of their secret, spent once, durably) and revocations.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tunnelfleet_runtime::clock::now_unix_ms;

use super::{AgentRecord, Store, StoreError, decode, decode_all, json};

/// A join token as stored (the secret itself is not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Short public id (the first 12 hex digits of the secret's SHA-256), for listing and
    /// deleting.
    pub id: String,
    /// Labels the enrolled agent gets.
    pub labels: BTreeMap<String, String>,
    /// The one agent id it may enroll, if restricted.
    pub agent: Option<String>,
    /// Created (Unix ms).
    pub created_unix_ms: u64,
    /// Expires (Unix ms).
    pub expires_unix_ms: u64,
    /// The agent that spent it.
    pub used_by: Option<String>,
    /// When it was spent (Unix ms).
    pub used_unix_ms: Option<u64>,
}

/// A revoked agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Agent id.
    pub agent: String,
    /// Revoked (Unix ms).
    pub at_unix_ms: u64,
    /// Operator's reason.
    pub reason: String,
}

impl Store {
    /// Stores a new join token under the SHA-256 of its secret (the secret is never stored).
    pub async fn put_token(&self, hash: &str, t: &JoinToken) -> Result<(), StoreError> {
        self.tokens.insert(hash.as_bytes(), json(t))?;
        self.log_event(&format!(
            "join token {} created (labels {:?}, agent {:?})",
            t.id, t.labels, t.agent
        ))
        .await
    }

    /// Every join token, used and expired ones included.
    pub fn tokens(&self) -> Result<Vec<JoinToken>, StoreError> {
        let mut v: Vec<JoinToken> = decode_all(&self.tokens, "tokens")?;
        v.sort_by_key(|t| t.created_unix_ms);
        Ok(v)
    }

    /// Deletes a join token by its id.
    pub async fn delete_token(&self, id: &str) -> Result<(), StoreError> {
        let key = self
            .tokens
            .iter()
            .find_map(|r| {
                let (k, v) = r.ok()?;
                let t: JoinToken = serde_json::from_slice(&v).ok()?;
                (t.id == id).then_some(k)
            })
            .ok_or_else(|| StoreError::NoToken(id.to_string()))?;
        self.tokens.remove(key)?;
        self.log_event(&format!("join token {id} deleted")).await
    }

    /// Spends the token whose secret hashes to `hash` for `agent_id`, at `now_unix_ms`: it must
    /// exist, be unused and unexpired, and name this agent if it names one; a revoked agent is
    /// refused (told only to a caller holding a valid token); an agent the coordinator already
    /// knows — enrolled before, or `issued_offline` by `pki issue-agent` — may only be enrolled
    /// again by a token that names it. The token, the claim on the id and the token's labels
    /// are written in one transaction (two tokens racing for one new id: one wins), durable
    /// before this returns: a token is never good twice, even across kill -9.
    pub async fn spend_token(
        &self,
        hash: &str,
        agent_id: &str,
        now_unix_ms: u64,
        issued_offline: bool,
    ) -> Result<JoinToken, StoreError> {
        let refused = |r: String| Err(StoreError::TokenRefused(r).into());
        let result = self.db.transaction([&self.tokens, &self.agents, &self.revoked], |[tt, at, rt]| {
            let Some(v) = tt.get(hash.as_bytes())? else {
                return refused("unknown join token".into());
            };
            let mut t: JoinToken = match serde_json::from_slice(&v) {
                Ok(t) => t,
                Err(e) => return refused(format!("join token record unreadable: {e}")),
            };
            if let Some(by) = &t.used_by {
                return refused(format!(
                    "join token {} was already used (by agent {by:?})",
                    t.id
                ));
            }
            if now_unix_ms >= t.expires_unix_ms {
                return refused(format!(
                    "join token {} expired {} ago",
                    t.id,
                    humantime::format_duration(std::time::Duration::from_secs(
                        (now_unix_ms - t.expires_unix_ms) / 1000
                    ))
                ));
            }
            if let Some(a) = t.agent.as_deref().filter(|a| *a != agent_id) {
                return refused(format!(
                    "join token {} is for agent {a:?}, not {agent_id:?}",
                    t.id
                ));
            }
            if let Some(r) = rt.get(agent_id.as_bytes())? {
                let reason = serde_json::from_slice::<Revocation>(&r)
                    .map(|r| r.reason)
                    .unwrap_or_default();
                return refused(format!("agent {agent_id:?} is revoked: {reason}"));
            }
            let record = at.get(agent_id.as_bytes())?;
            if t.agent.is_none() && (record.is_some() || issued_offline) {
                return refused(format!(
                    "agent {agent_id:?} is already enrolled; re-enrolling it needs a token made for it (tunnelfleet token create --agent {agent_id})"
                ));
            }
            t.used_by = Some(agent_id.to_string());
            t.used_unix_ms = Some(now_unix_ms);
            tt.insert(hash.as_bytes(), json(&t))?;
            // The agent's record carries the token's labels from now on (and only them).
            let mut rec: AgentRecord = record
                .and_then(|v| serde_json::from_slice(&v).ok())
                .unwrap_or_default();
            rec.id = agent_id.to_string();
            rec.enrolled = true;
            rec.enrolled_labels = t.labels.clone();
            at.insert(agent_id.as_bytes(), json(&rec))?;
            Ok(t)
        }).await;
        let t = result?;
        self.log_event(&format!(
            "agent {agent_id} enrolled with join token {}",
            t.id
        ))
        .await?;
        Ok(t)
    }

    /// Revokes an agent: it is refused from now on, whatever certificate it holds.
    pub async fn revoke(&self, agent_id: &str, reason: &str) -> Result<Revocation, StoreError> {
        let r = Revocation {
            agent: agent_id.to_string(),
            at_unix_ms: now_unix_ms(),
            reason: reason.to_string(),
        };
        self.revoked.insert(agent_id.as_bytes(), json(&r))?;
        self.log_event(&format!("agent {agent_id} revoked: {reason}"))
            .await?;
        Ok(r)
    }

    /// Lifts a revocation; returns whether there was one.
    pub async fn unrevoke(&self, agent_id: &str) -> Result<bool, StoreError> {
        let had = self.revoked.remove(agent_id.as_bytes())?.is_some();
        if had {
            self.log_event(&format!("agent {agent_id} no longer revoked"))
                .await?;
        }
        Ok(had)
    }

    /// The revocation of an agent, if any.
    pub fn revocation(&self, agent_id: &str) -> Result<Option<Revocation>, StoreError> {
        self.revoked
            .get(agent_id.as_bytes())?
            .map(|v| decode(&v, "revoked", agent_id))
            .transpose()
    }

    /// Every revoked agent.
    pub fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        decode_all(&self.revoked, "revoked")
    }

    /// The ids of the revoked agents.
    pub fn revoked_agents(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        Ok(self.revocations()?.into_iter().map(|r| r.agent).collect())
    }
}
