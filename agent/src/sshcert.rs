//! An enrolled agent's own SSH identity: an ed25519 key made on the appliance
//! (`STATE_DIR/ssh/id_ed25519`, 0600; the private half never leaves it) and the OpenSSH user
//! certificate the coordinator's SSH CA issued for it (`id_ed25519-cert.pub` beside it).
//!
//! Sessions of profiles without an `identity_file` log in with it, reading the certificate at
//! each login: a renewal reaches the next login and leaves open sessions alone. The control
//! link asks for a certificate when there is none or the one held is past half its life
//! ([`SshCredential::wants_renewal`]); what comes back is taken only if it certifies this key,
//! for this agent, as a user.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, LineEnding};
use russh::keys::{Algorithm, PrivateKey};

/// The key's file name under the SSH state directory.
pub const KEY_FILE: &str = "id_ed25519";
/// The certificate's file name beside it.
pub const CERT_FILE: &str = "id_ed25519-cert.pub";
/// The fleet's SSH host CA as the agent learned it from its coordinator, a known_hosts file
/// beside them (`@cert-authority * …`): what profiles with `fleet_host_ca` trust.
pub const HOST_CA_FILE: &str = "known_hosts";

/// Why the SSH identity cannot be made, read, or a certificate taken.
#[derive(Debug, thiserror::Error)]
pub enum SshCredentialError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The key file is loose or not a key this agent made.
    #[error("{0}")]
    Key(#[from] crate::identity::IdentityError),
    /// A certificate that is not for this key, this agent, or a user.
    #[error("SSH certificate refused: {0}")]
    Certificate(String),
}

/// The key and its current certificate. `Debug` shows fingerprints only.
pub struct SshCredential {
    key: Arc<PrivateKey>,
    agent_id: String,
    cert_path: PathBuf,
    cert: Mutex<Option<Certificate>>,
}

impl std::fmt::Debug for SshCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCredential")
            .field("agent_id", &self.agent_id)
            .field("key", &self.fingerprint())
            .field("valid_before", &self.valid_before())
            .finish_non_exhaustive()
    }
}

impl SshCredential {
    /// Opens the identity in `dir` (made 0700 when missing), making the key on first use. A
    /// certificate found beside it is kept when it certifies this key for `agent_id`.
    pub fn open(dir: &Path, agent_id: &str) -> Result<SshCredential, SshCredentialError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SshCredentialError::Io { path, source }
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let key_path = dir.join(KEY_FILE);
        if !key_path.exists() {
            let key = tunnelfleet_runtime::sshkey::generate_ed25519(agent_id)
                .and_then(|k| Ok(k.to_openssh(LineEnding::LF)?.to_string()))
                .map_err(|e| SshCredentialError::Io {
                    path: key_path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            tunnelfleet_runtime::secret::write_atomic(&key_path, key.as_bytes(), 0o600)
                .map_err(io(&key_path))?;
            tracing::info!(key = %key_path.display(), "made this agent's SSH key");
        }
        let key = crate::identity::load_identity(&key_path)?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(SshCredentialError::Certificate(format!(
                "{}: not an ed25519 key; remove it and the agent makes a new one",
                key_path.display()
            )));
        }
        let cred = SshCredential {
            key: Arc::new(key),
            agent_id: agent_id.to_string(),
            cert_path: dir.join(CERT_FILE),
            cert: Mutex::new(None),
        };
        if let Ok(text) = std::fs::read_to_string(&cred.cert_path) {
            match cred.check(&text) {
                Ok(cert) => *cred.slot() = Some(cert),
                Err(e) => {
                    tracing::warn!(cert = %cred.cert_path.display(), "ignoring the stored SSH certificate: {e}")
                }
            }
        }
        Ok(cred)
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Certificate>> {
        self.cert.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The private key, for logging in.
    pub fn key(&self) -> Arc<PrivateKey> {
        self.key.clone()
    }

    /// The public key line the coordinator certifies.
    pub fn public_line(&self) -> String {
        tunnelfleet_runtime::sshkey::public_line(self.key.public_key())
    }

    /// The key's fingerprint (`SHA256:…`).
    pub fn fingerprint(&self) -> String {
        tunnelfleet_runtime::sshkey::fingerprint(self.key.public_key())
    }

    /// The fleet's SSH host CA file ([`HOST_CA_FILE`]).
    pub fn host_ca_path(&self) -> PathBuf {
        self.cert_path.with_file_name(HOST_CA_FILE)
    }

    /// Keeps the fleet's SSH host CA the coordinator named in its welcome: an ed25519 public
    /// key line, written as `@cert-authority *` into [`HOST_CA_FILE`] (atomically, only when
    /// it changed). Returns whether it changed.
    pub fn take_host_ca(&self, line: &str) -> Result<bool, SshCredentialError> {
        let key = tunnelfleet_runtime::sshkey::ed25519_line(
            line,
            tunnelfleet_protocol::limits::MAX_SSH_KEY_LINE,
            "",
        )
        .map_err(|why| SshCredentialError::Certificate(format!("SSH host CA: {why}")))?;
        let text = format!(
            "# the fleet's SSH host CA, from the coordinator; rewritten when it changes\n@cert-authority * {} tunnelfleet-host-ca\n",
            tunnelfleet_runtime::sshkey::public_line(&russh::keys::PublicKey::new(
                key.key_data().clone(),
                ""
            ))
        );
        let path = self.host_ca_path();
        if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
            return Ok(false);
        }
        tunnelfleet_runtime::secret::write_atomic(&path, text.as_bytes(), 0o644).map_err(
            |source| SshCredentialError::Io {
                path: path.clone(),
                source,
            },
        )?;
        Ok(true)
    }

    /// The certificate held now, if any.
    pub fn certificate(&self) -> Option<Certificate> {
        self.slot().clone()
    }

    /// When the certificate held runs out (Unix seconds).
    pub fn valid_before(&self) -> Option<u64> {
        self.slot().as_ref().map(Certificate::valid_before)
    }

    /// Whether to ask for a certificate at `now_unix`: none held, or past half its life.
    pub fn wants_renewal(&self, now_unix: u64) -> bool {
        match &*self.slot() {
            None => true,
            Some(c) => renewal_due(c.valid_after(), c.valid_before(), now_unix),
        }
    }

    /// Takes a certificate the coordinator issued: stored beside the key (atomically) and used
    /// from the next login on, when it certifies this key, for this agent, as a user.
    pub fn accept(&self, line: &str) -> Result<(), SshCredentialError> {
        let cert = self.check(line)?;
        let text = format!("{}\n", line.trim());
        tunnelfleet_runtime::secret::write_atomic(&self.cert_path, text.as_bytes(), 0o644)
            .map_err(|source| SshCredentialError::Io {
                path: self.cert_path.clone(),
                source,
            })?;
        tracing::info!(
            serial = cert.serial(),
            valid_before = cert.valid_before(),
            "SSH certificate renewed"
        );
        *self.slot() = Some(cert);
        Ok(())
    }

    /// The certificate in `line`, if it is one this agent may use.
    fn check(&self, line: &str) -> Result<Certificate, SshCredentialError> {
        let bad = |why: String| SshCredentialError::Certificate(why);
        let cert =
            Certificate::from_openssh(line.trim()).map_err(|e| bad(format!("unreadable: {e}")))?;
        if cert.public_key() != self.key.public_key().key_data() {
            return Err(bad("it certifies another key".into()));
        }
        if cert.cert_type() != CertType::User {
            return Err(bad("not a user certificate".into()));
        }
        if cert.key_id() != self.agent_id || cert.valid_principals() != [self.agent_id.clone()] {
            return Err(bad(format!(
                "it is for {:?} (principals {:?}), not agent {:?}",
                cert.key_id(),
                cert.valid_principals(),
                self.agent_id
            )));
        }
        Ok(cert)
    }
}

/// Whether a certificate valid from `after` to `before` is due for renewal at `now`: at half
/// its life, so that a coordinator away for that long still finds the agent able to log in.
pub fn renewal_due(after: u64, before: u64, now: u64) -> bool {
    let half = after.saturating_add(before.saturating_sub(after) / 2);
    now >= half
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use russh::keys::ssh_key::certificate::Builder;
    use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};

    fn ca() -> PrivateKey {
        PrivateKey::new(
            KeypairData::Ed25519(Ed25519Keypair::from_seed(&[9; 32])),
            "ca",
        )
        .unwrap()
    }

    fn cert_for(key: &PrivateKey, id: &str, kind: CertType, after: u64, before: u64) -> String {
        let mut b =
            Builder::new([1; 32], key.public_key().key_data().clone(), after, before).unwrap();
        b.serial(5).unwrap();
        b.key_id(id).unwrap();
        b.cert_type(kind).unwrap();
        b.valid_principal(id).unwrap();
        b.sign(&ca()).unwrap().to_openssh().unwrap()
    }

    #[test]
    fn renewal_is_due_at_half_life() {
        assert!(!renewal_due(1000, 3000, 1999));
        assert!(renewal_due(1000, 3000, 2000));
        assert!(renewal_due(1000, 3000, 5000));
        assert!(renewal_due(1000, 1000, 1000));
    }

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = dir.path().join("ssh");
        let first = SshCredential::open(&ssh, "vma-1").unwrap();
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&ssh.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&ssh), 0o700);
        let again = SshCredential::open(&ssh, "vma-1").unwrap();
        assert_eq!(first.public_line(), again.public_line());
        assert!(first.public_line().starts_with("ssh-ed25519 "));
        assert!(first.wants_renewal(0));
        // A key made loose by hand is refused, as any identity file is.
        std::fs::set_permissions(
            ssh.join(KEY_FILE),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        assert!(SshCredential::open(&ssh, "vma-1").is_err());
    }

    #[test]
    fn only_a_user_certificate_of_this_key_for_this_agent_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let cred = SshCredential::open(dir.path(), "vma-1").unwrap();
        let other = PrivateKey::new(
            KeypairData::Ed25519(Ed25519Keypair::from_seed(&[3; 32])),
            "x",
        )
        .unwrap();
        for bad in [
            cert_for(&other, "vma-1", CertType::User, 0, 100),
            cert_for(&cred.key, "vma-2", CertType::User, 0, 100),
            cert_for(&cred.key, "vma-1", CertType::Host, 0, 100),
            "ssh-ed25519-cert-v01@openssh.com AAAA".to_string(),
        ] {
            assert!(cred.accept(&bad).is_err(), "{bad}");
            assert!(cred.certificate().is_none());
            assert!(!dir.path().join(CERT_FILE).exists());
        }
        let good = cert_for(&cred.key, "vma-1", CertType::User, 1000, 3000);
        cred.accept(&good).unwrap();
        assert_eq!(cred.valid_before(), Some(3000));
        assert!(!cred.wants_renewal(1500));
        assert!(cred.wants_renewal(2000));
        // Kept across a restart.
        let reopened = SshCredential::open(dir.path(), "vma-1").unwrap();
        assert_eq!(reopened.valid_before(), Some(3000));
        // A stored certificate for another agent id is not used.
        let renamed = SshCredential::open(dir.path(), "vma-9").unwrap();
        assert_eq!(renamed.valid_before(), None);
    }

    #[test]
    fn the_fleet_host_ca_is_kept_as_a_cert_authority_line_and_only_an_ed25519_key() {
        let dir = tempfile::tempdir().unwrap();
        let cred = SshCredential::open(dir.path(), "vma-1").unwrap();
        let line = ca().public_key().to_openssh().unwrap();
        assert!(cred.take_host_ca(&line).unwrap(), "written the first time");
        assert!(!cred.take_host_ca(&line).unwrap(), "unchanged the second");
        let text = std::fs::read_to_string(cred.host_ca_path()).unwrap();
        let b64 = line.split_whitespace().nth(1).unwrap();
        assert!(
            text.contains(&format!(
                "@cert-authority * ssh-ed25519 {b64} tunnelfleet-host-ca\n"
            )),
            "{text}"
        );
        for bad in ["garbage", &format!("ssh-ed25519 {}", "A".repeat(5000))] {
            assert!(cred.take_host_ca(bad).is_err(), "{bad}");
        }
        assert_eq!(std::fs::read_to_string(cred.host_ca_path()).unwrap(), text);
    }
}
