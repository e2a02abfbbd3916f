//! Who may use the admin API (named admin tokens, stored by the hash of their secret, each with
//! a role) and what they did with it (the audit log).
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode, decode_all, json, u64_of};

/// What a token may do. Ordered: each role may do what the ones before it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read everything (the fleet page, `agents`, `oma status`, `alerts list`, …).
    Viewer,
    /// Run the fleet: drain, failover and failback, restart tunnels, ack and silence alerts,
    /// run, resume and abort rollouts.
    Operator,
    /// Change it: profiles, assignments, OMA groups, join tokens, revocations, admin tokens.
    Admin,
}

impl Role {
    /// Its name as the CLI and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of them.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?}: viewer, operator or admin")]
pub struct UnknownRole(String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(UnknownRole(s.to_string())),
        }
    }
}

/// A named admin token as stored (its secret is not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminToken {
    /// Its name: who holds it ("alice", "grafana", "ci-deploy").
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Created (Unix ms).
    pub created_unix_ms: u64,
    /// The token that created it.
    pub created_by: String,
}

/// One change made through the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Sequence number.
    pub seq: u64,
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// The token's name (`admin_token_file` for the file's token).
    pub token: String,
    /// Its role.
    pub role: Role,
    /// What was asked, in short: the method, the path and the body's first bytes.
    pub request: String,
    /// The answer's status code.
    pub status: u16,
    /// `ok`, or the error the caller was given.
    pub result: String,
}

/// How long the audit log keeps an entry: a year and a month, for yearly reviews.
pub const AUDIT_RETENTION: std::time::Duration = std::time::Duration::from_secs(400 * 24 * 3600);

/// Old entries dropped per new one, at most.
const PRUNE_PER_ENTRY: usize = 8;

impl Store {
    /// Stores a new admin token under the SHA-256 of its secret, refusing a name already
    /// taken (the name's claim and the token in one transaction).
    pub async fn put_admin_token(&self, hash: &str, t: &AdminToken) -> Result<(), StoreError> {
        self.db
            .transaction([&self.admin_tokens, &self.admin_names], |[tt, names]| {
                if names.get(t.name.as_bytes())?.is_some() {
                    return Err(StoreError::AdminTokenExists(t.name.clone()).into());
                }
                names.insert(t.name.as_bytes(), hash.as_bytes())?;
                tt.insert(hash.as_bytes(), json(t))?;
                Ok(())
            })
            .await?;
        self.log_event(&format!(
            "admin token {} created with role {} by {}",
            t.name, t.role, t.created_by
        ))
        .await
    }

    /// The admin token whose secret hashes to `hash`, if any.
    pub fn admin_token(&self, hash: &str) -> Result<Option<AdminToken>, StoreError> {
        self.admin_tokens
            .get(hash.as_bytes())?
            .map(|v| decode(&v, "admin_tokens", &hash[..hash.len().min(12)]))
            .transpose()
    }

    /// Every admin token, by name.
    pub fn admin_tokens(&self) -> Result<Vec<AdminToken>, StoreError> {
        let mut v: Vec<AdminToken> = decode_all(&self.admin_tokens, "admin_tokens")?;
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Revokes (deletes) the admin token named `name`: it is refused from the next request on.
    pub async fn delete_admin_token(&self, name: &str) -> Result<AdminToken, StoreError> {
        let t = self
            .db
            .transaction([&self.admin_tokens, &self.admin_names], |[tt, names]| {
                let Some(hash) = names.remove(name.as_bytes())? else {
                    return Err(StoreError::NoAdminToken(name.to_string()).into());
                };
                tt.remove(hash)
            })
            .await?;
        let t: AdminToken = match t {
            Some(v) => decode(&v, "admin_tokens", name)?,
            None => return Err(StoreError::NoAdminToken(name.to_string())),
        };
        self.log_event(&format!("admin token {name} revoked"))
            .await?;
        Ok(t)
    }

    /// Appends an entry to the audit log, durable before return. Entries older than
    /// [`AUDIT_RETENTION`] go, a few per new one.
    pub async fn audit(&self, mut entry: AuditEntry) -> Result<AuditEntry, StoreError> {
        entry.seq = self.db.generate_id().await?;
        self.audit_log
            .insert(entry.seq.to_be_bytes(), json(&entry))?;
        let cutoff = entry
            .at_unix_ms
            .saturating_sub(AUDIT_RETENTION.as_millis() as u64);
        for _ in 0..PRUNE_PER_ENTRY {
            let Some((k, v)) = self.audit_log.first()? else {
                break;
            };
            let old =
                serde_json::from_slice::<AuditEntry>(&v).map_or(true, |e| e.at_unix_ms < cutoff);
            if !old {
                break;
            }
            self.audit_log.remove(k)?;
        }
        self.durable().await?;
        Ok(entry)
    }

    /// Audit entries at or after `since_unix_ms`, oldest first, at most the last `limit`.
    pub fn audit_entries(
        &self,
        since_unix_ms: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let mut v = Vec::new();
        for r in self.audit_log.iter().rev() {
            let (k, val) = r?;
            let e: AuditEntry = decode(&val, "audit_log", &u64_of(&k).to_string())?;
            if e.at_unix_ms < since_unix_ms || v.len() >= limit {
                break;
            }
            v.push(e);
        }
        v.reverse();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    fn token(name: &str, role: Role) -> AdminToken {
        AdminToken {
            name: name.into(),
            role,
            created_unix_ms: 1,
            created_by: "admin_token_file".into(),
        }
    }

    #[tokio::test]
    async fn a_name_is_taken_once_and_a_revoked_token_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_admin_token("h1", &token("alice", Role::Operator))
            .await
            .unwrap();
        let e = s
            .put_admin_token("h2", &token("alice", Role::Admin))
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::AdminTokenExists(_)), "{e}");
        assert_eq!(s.admin_token("h1").unwrap().unwrap().role, Role::Operator);
        assert!(s.admin_token("h2").unwrap().is_none());
        s.delete_admin_token("alice").await.unwrap();
        assert!(s.admin_token("h1").unwrap().is_none());
        assert!(matches!(
            s.delete_admin_token("alice").await.unwrap_err(),
            StoreError::NoAdminToken(_)
        ));
    }

    #[tokio::test]
    async fn the_audit_log_reads_back_since_a_time_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for i in 0..5u64 {
            s.audit(AuditEntry {
                seq: 0,
                at_unix_ms: 1000 + i,
                token: "alice".into(),
                role: Role::Operator,
                request: format!("POST /v1/x/{i}"),
                status: 200,
                result: "ok".into(),
            })
            .await
            .unwrap();
        }
        let got: Vec<String> = s
            .audit_entries(1002, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.request)
            .collect();
        assert_eq!(got, ["POST /v1/x/2", "POST /v1/x/3", "POST /v1/x/4"]);
        let last: Vec<String> = s
            .audit_entries(0, 2)
            .unwrap()
            .into_iter()
            .map(|e| e.request)
            .collect();
        assert_eq!(last, ["POST /v1/x/3", "POST /v1/x/4"]);
        // A year and more later, the old entries go as new ones come.
        let later = 1000 + AUDIT_RETENTION.as_millis() as u64 + 10;
        s.audit(AuditEntry {
            seq: 0,
            at_unix_ms: later,
            token: "bob".into(),
            role: Role::Admin,
            request: "DELETE /v1/x".into(),
            status: 404,
            result: "no x".into(),
        })
        .await
        .unwrap();
        let kept: Vec<String> = s
            .audit_entries(0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.token)
            .collect();
        assert_eq!(kept, ["bob"]);
    }
}
