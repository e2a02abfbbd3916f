//! What the SSH user CA issued: the latest certificate of each agent (its serial, key and
//! validity), kept for renewal's rate rule, `agents show`, and the revocation list OMAs sync.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode, decode_all, json};

/// One agent's latest SSH certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshCertRecord {
    /// The agent (the certificate's key id and principal).
    pub agent_id: String,
    /// Its serial.
    pub serial: u64,
    /// The certified key's fingerprint (`SHA256:…`).
    pub key_fingerprint: String,
    /// The certified key, one OpenSSH line.
    pub public_key: String,
    /// Valid from (Unix seconds).
    pub valid_after: u64,
    /// Valid until (Unix seconds).
    pub valid_before: u64,
    /// When it was issued (Unix ms).
    pub issued_unix_ms: u64,
}

impl Store {
    /// A serial no other certificate of this fleet has (nor will: ids only grow, and
    /// coordinators sharing etcd take them from one counter).
    pub async fn next_ssh_serial(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id().await? + 1)
    }

    /// Records an issued certificate as the agent's latest (durable before return).
    pub async fn record_ssh_cert(&self, rec: &SshCertRecord) -> Result<(), StoreError> {
        self.ssh_certs.insert(rec.agent_id.as_bytes(), json(rec))?;
        self.durable().await
    }

    /// An agent's latest certificate.
    pub fn ssh_cert(&self, agent_id: &str) -> Result<Option<SshCertRecord>, StoreError> {
        self.ssh_certs
            .get(agent_id.as_bytes())?
            .map(|v| decode(&v, "ssh_certs", agent_id))
            .transpose()
    }

    /// Every agent's latest certificate.
    pub fn ssh_certs(&self) -> Result<Vec<SshCertRecord>, StoreError> {
        decode_all(&self.ssh_certs, "ssh_certs")
    }
}
