//! The fleet's SSH user CA: who may log in to the OMAs.
//!
//! An ed25519 OpenSSH key in the PKI directory (`ssh_user_ca`, 0600: never printed, never
//! sent; `ssh_user_ca.pub` is what every OMA's sshd trusts as `TrustedUserCAKeys`). It
//! certifies the agents' own SSH keys (made on the appliance; the private half never leaves
//! it): key id and principal the agent id, a serial of its own, valid from a few minutes ago
//! (clocks drift) for the configured time, and `permit-port-forwarding` as its only extension
//! (no pty, agent or X11 forwarding, no user rc). Which ports a certificate opens is said by
//! the OMA's principals file, not the certificate (OpenSSH certificates carry no port limits).
//! [`SshCa::certify`] is the rule, without IO; the link asks it and records what it issued.
//!
//! The fleet's SSH host CA is the same kind of key beside it (`ssh_host_ca`, `ssh_host_ca.pub`):
//! it certifies OMAs' ed25519 host keys for their endpoint names ([`SshCa::certify_host`],
//! asked by an operator through the admin API), and every enrolled agent learns its public key
//! in the control link's welcome, so a profile with `fleet_host_ca` trusts an OMA it has never
//! seen without trusting on first use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh_key::certificate::{Builder, CertType};
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};

use tunnelfleet_protocol::limits::MAX_SSH_KEY_LINE;

/// The user CA's private key, in the PKI directory.
pub const SSH_CA_KEY: &str = "ssh_user_ca";
/// Its public key: the OMAs' `TrustedUserCAKeys`.
pub const SSH_CA_PUB: &str = "ssh_user_ca.pub";
/// The host CA's private key, in the PKI directory.
pub const SSH_HOST_CA_KEY: &str = "ssh_host_ca";
/// Its public key: what agents trust OMA host certificates by.
pub const SSH_HOST_CA_PUB: &str = "ssh_host_ca.pub";

/// Which of the fleet's two SSH CAs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaKind {
    /// Certifies agents' keys: who may log in to the OMAs.
    User,
    /// Certifies OMAs' host keys: which servers agents may trust.
    Host,
}

impl CaKind {
    /// The private key's file name.
    pub fn key_file(self) -> &'static str {
        match self {
            CaKind::User => SSH_CA_KEY,
            CaKind::Host => SSH_HOST_CA_KEY,
        }
    }

    /// The public key's file name.
    pub fn pub_file(self) -> &'static str {
        match self {
            CaKind::User => SSH_CA_PUB,
            CaKind::Host => SSH_HOST_CA_PUB,
        }
    }

    fn comment(self) -> &'static str {
        match self {
            CaKind::User => "tunnelfleet SSH user CA",
            CaKind::Host => "tunnelfleet SSH host CA",
        }
    }
}

/// How long a host certificate is valid by default (`oma host-cert --validity`).
pub const DEFAULT_HOST_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest host certificate the CA signs.
pub const MAX_HOST_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Names one host certificate may carry.
pub const MAX_HOST_PRINCIPALS: usize = 16;

/// How long a certificate is valid by default: an agent renews at half-life, so one whose
/// coordinator is away for three days still logs in.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);

/// An agent asks again at most this often; a request sooner is refused (and counted).
pub const MIN_REQUEST_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a request at `now_ms` comes too soon after the certificate issued at `last_ms`.
pub fn too_soon(last_ms: Option<u64>, now_ms: u64) -> bool {
    last_ms
        .is_some_and(|last| now_ms.saturating_sub(last) < MIN_REQUEST_INTERVAL.as_millis() as u64)
}

/// How far before `now` a certificate starts, for OMAs whose clock is a little behind: at
/// most this, and a tenth of a short validity (so that the half-life an agent renews at stays
/// in the future).
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// The shortest validity a coordinator takes: its half-life, less the backdate, is well past
/// [`MIN_REQUEST_INTERVAL`], so a renewal is never refused as too soon.
pub const MIN_VALIDITY: Duration = Duration::from_secs(40);

/// The backdate of a certificate valid for `validity`.
pub fn backdate(validity: Duration) -> Duration {
    BACKDATE.min(validity / 10)
}

/// Why the CA could not be made, read, or would not certify a key.
#[derive(Debug, thiserror::Error)]
pub enum SshCaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The CA key file is readable by others, or not an OpenSSH ed25519 key.
    #[error("{path}: {reason}")]
    BadCaKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `create` would replace an existing CA.
    #[error(
        "{0} already holds an SSH CA; refusing to replace it (every OMA trusts it and every agent's certificate depends on it)"
    )]
    Exists(PathBuf),
    /// The agent's key line is not one this CA certifies.
    #[error("{0}")]
    Refused(String),
    /// Signing failed.
    #[error("signing the certificate: {0}")]
    Sign(String),
}

/// The SSH user CA, loaded. `Debug` shows the public key's fingerprint only.
pub struct SshCa {
    key: PrivateKey,
}

impl std::fmt::Debug for SshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// What one certificate is for.
#[derive(Debug, Clone)]
pub struct CertRequest<'a> {
    /// The agent, from its TLS certificate (never from what it says).
    pub agent_id: &'a str,
    /// Its public key line as it sent it.
    pub public_key: &'a str,
    /// The serial (unique: the store hands it out).
    pub serial: u64,
    /// Now, Unix seconds.
    pub now_unix: u64,
    /// How long it is valid from now.
    pub validity: Duration,
}

/// A certificate issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, one OpenSSH line.
    pub certificate: String,
    /// The certified key's fingerprint (`SHA256:…`).
    pub key_fingerprint: String,
    /// The certified key, one OpenSSH line (what a revocation lists).
    pub public_key: String,
    /// Valid from (Unix seconds).
    pub valid_after: u64,
    /// Valid until (Unix seconds).
    pub valid_before: u64,
}

impl SshCa {
    /// Makes a new CA of `kind` in `dir` (which exists): the key 0600, the public key 0644.
    /// Refuses to replace one. Returns the public key line.
    pub fn create(dir: &Path, kind: CaKind) -> Result<String, SshCaError> {
        let path = dir.join(kind.key_file());
        if path.exists() {
            return Err(SshCaError::Exists(path));
        }
        let key = tunnelfleet_runtime::sshkey::generate_ed25519(kind.comment())
            .map_err(|e| SshCaError::Sign(e.to_string()))?;
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| SshCaError::Sign(e.to_string()))?;
        let public = key
            .public_key()
            .to_openssh()
            .map_err(|e| SshCaError::Sign(e.to_string()))?;
        let io = |path: PathBuf| move |source| SshCaError::Io { path, source };
        tunnelfleet_runtime::secret::write_atomic(&path, private.as_bytes(), 0o600)
            .map_err(io(path.clone()))?;
        let pub_path = dir.join(kind.pub_file());
        tunnelfleet_runtime::secret::write_atomic(
            &pub_path,
            format!("{public}\n").as_bytes(),
            0o644,
        )
        .map_err(io(pub_path))?;
        Ok(public)
    }

    /// The CA of `kind` in `dir`, or `None` when there is none (certificates are then
    /// refused). A key file readable by others is refused.
    pub fn load(dir: &Path, kind: CaKind) -> Result<Option<SshCa>, SshCaError> {
        let path = dir.join(kind.key_file());
        if !path.exists() {
            return Ok(None);
        }
        tunnelfleet_runtime::secret::check_permissions(&path).map_err(|e| {
            SshCaError::BadCaKey {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        let text = std::fs::read_to_string(&path).map_err(|source| SshCaError::Io {
            path: path.clone(),
            source,
        })?;
        let key = PrivateKey::from_openssh(&text).map_err(|e| SshCaError::BadCaKey {
            path: path.clone(),
            reason: format!("not an OpenSSH private key: {e}"),
        })?;
        if key.algorithm() != Algorithm::Ed25519 || key.is_encrypted() {
            return Err(SshCaError::BadCaKey {
                path,
                reason: "the SSH CA key must be an unencrypted ed25519 key".into(),
            });
        }
        Ok(Some(SshCa { key }))
    }

    /// The public key line OMAs trust.
    pub fn public_line(&self) -> String {
        tunnelfleet_runtime::sshkey::public_line(self.key.public_key())
    }

    /// The CA's fingerprint (`SHA256:…`).
    pub fn fingerprint(&self) -> String {
        tunnelfleet_runtime::sshkey::fingerprint(self.key.public_key())
    }

    /// Certifies an agent's key: only an ed25519 key, one principal (the agent id), the key id
    /// the agent id, `permit-port-forwarding` only.
    pub fn certify(&self, req: &CertRequest<'_>) -> Result<Issued, SshCaError> {
        let key = self.signable(req.public_key, "")?;
        let valid_after = req
            .now_unix
            .saturating_sub(backdate(req.validity).as_secs());
        let valid_before = req.now_unix.saturating_add(req.validity.as_secs());
        self.sign(&key, valid_after, valid_before, |b| {
            b.serial(req.serial)?
                .key_id(req.agent_id)?
                .cert_type(CertType::User)?
                .valid_principal(req.agent_id)?
                .extension("permit-port-forwarding", "")?
                .comment(req.agent_id)?;
            Ok(())
        })
    }

    /// `line` as a key this CA signs: an ed25519 public key, not its own (`what` names the
    /// kind of key in a refusal).
    fn signable(&self, line: &str, what: &str) -> Result<PublicKey, SshCaError> {
        let key = tunnelfleet_runtime::sshkey::ed25519_line(line, MAX_SSH_KEY_LINE, what)
            .map_err(|e| SshCaError::Refused(e.to_string()))?;
        if key.key_data() == self.key.public_key().key_data() {
            return Err(SshCaError::Refused("that is the CA's own key".into()));
        }
        Ok(key)
    }

    /// Signs `key` for `valid_after..valid_before`, with what `fill` puts in (serial, key id,
    /// type, principals, extensions).
    fn sign(
        &self,
        key: &PublicKey,
        valid_after: u64,
        valid_before: u64,
        fill: impl FnOnce(&mut Builder) -> Result<(), ssh_key::Error>,
    ) -> Result<Issued, SshCaError> {
        let sign_err = |e: ssh_key::Error| SshCaError::Sign(e.to_string());
        let mut nonce = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| SshCaError::Sign("no system randomness".into()))?;
        let mut b = Builder::new(nonce, key.key_data().clone(), valid_after, valid_before)
            .map_err(sign_err)?;
        fill(&mut b).map_err(sign_err)?;
        let cert = b.sign(&self.key).map_err(sign_err)?;
        Ok(Issued {
            certificate: cert.to_openssh().map_err(sign_err)?,
            key_fingerprint: tunnelfleet_runtime::sshkey::fingerprint(key),
            public_key: PublicKey::new(key.key_data().clone(), "")
                .to_openssh()
                .map_err(sign_err)?,
            valid_after,
            valid_before,
        })
    }
}

/// What one host certificate is for.
#[derive(Debug, Clone)]
pub struct HostCertRequest<'a> {
    /// The OMA's host public key line (`/etc/ssh/ssh_host_ed25519_key.pub`).
    pub public_key: &'a str,
    /// The names agents reach it by (the host part of its endpoints).
    pub principals: &'a [String],
    /// The serial (unique: the store hands it out).
    pub serial: u64,
    /// Now, Unix seconds.
    pub now_unix: u64,
    /// How long it is valid from now.
    pub validity: Duration,
}

impl SshCa {
    /// Certifies an OMA's host key: only an ed25519 key, for the given names (key id: the
    /// first), valid from a few minutes ago for `validity` (at most [`MAX_HOST_VALIDITY`]),
    /// no extensions.
    pub fn certify_host(&self, req: &HostCertRequest<'_>) -> Result<Issued, SshCaError> {
        let refused = |why: String| Err(SshCaError::Refused(why));
        let key = self.signable(req.public_key, "host ")?;
        let Some(first) = req.principals.first() else {
            return refused("no host name to certify it for".into());
        };
        if req.principals.len() > MAX_HOST_PRINCIPALS {
            return refused(format!(
                "{} names; at most {MAX_HOST_PRINCIPALS}",
                req.principals.len()
            ));
        }
        if req.validity.is_zero() || req.validity > MAX_HOST_VALIDITY {
            return refused(format!(
                "validity {:?}: more than 0 and at most {:?}",
                req.validity, MAX_HOST_VALIDITY
            ));
        }
        let valid_after = req.now_unix.saturating_sub(BACKDATE.as_secs());
        let valid_before = req.now_unix.saturating_add(req.validity.as_secs());
        self.sign(&key, valid_after, valid_before, |b| {
            b.serial(req.serial)?
                .key_id(first.as_str())?
                .cert_type(CertType::Host)?;
            for p in req.principals {
                b.valid_principal(p.as_str())?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;
    use ssh_key::private::{Ed25519Keypair, KeypairData};
    use ssh_key::{Certificate, HashAlg};

    fn agent_key() -> PrivateKey {
        PrivateKey::new(
            KeypairData::Ed25519(Ed25519Keypair::from_seed(&[7; 32])),
            "vma",
        )
        .unwrap()
    }

    fn request(public_key: &str) -> CertRequest<'_> {
        CertRequest {
            agent_id: "vma-233",
            public_key,
            serial: 42,
            now_unix: 1_800_000_000,
            validity: DEFAULT_VALIDITY,
        }
    }

    #[test]
    fn a_certificate_names_the_agent_once_and_permits_forwarding_only() {
        let dir = tempfile::tempdir().unwrap();
        let line = SshCa::create(dir.path(), CaKind::User).unwrap();
        let ca = SshCa::load(dir.path(), CaKind::User).unwrap().unwrap();
        assert_eq!(ca.public_line(), line);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(SSH_CA_KEY))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        let key = agent_key();
        let public = key.public_key().to_openssh().unwrap();
        let issued = ca.certify(&request(&public)).unwrap();
        let cert = Certificate::from_openssh(&issued.certificate).unwrap();
        assert_eq!(cert.key_id(), "vma-233");
        assert_eq!(cert.valid_principals(), ["vma-233".to_string()]);
        assert_eq!(cert.serial(), 42);
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(
            cert.extensions().keys().collect::<Vec<_>>(),
            ["permit-port-forwarding"]
        );
        assert!(cert.critical_options().is_empty());
        assert_eq!(cert.valid_after(), 1_800_000_000 - BACKDATE.as_secs());
        assert_eq!(
            cert.valid_before(),
            1_800_000_000 + DEFAULT_VALIDITY.as_secs()
        );
        assert_eq!(cert.public_key(), key.public_key().key_data());
        // Signed by this CA, and valid in its window.
        let fp = ca.key.public_key().fingerprint(HashAlg::Sha256);
        cert.validate_at(1_800_000_000, [&fp]).unwrap();
        assert_eq!(issued.valid_before, cert.valid_before());
        assert_eq!(
            issued.key_fingerprint,
            key.fingerprint(HashAlg::Sha256).to_string()
        );
    }

    #[test]
    fn keys_it_does_not_certify_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        SshCa::create(dir.path(), CaKind::User).unwrap();
        let ca = SshCa::load(dir.path(), CaKind::User).unwrap().unwrap();
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg= x";
        let long = format!("ssh-ed25519 {}", "A".repeat(MAX_SSH_KEY_LINE));
        let own = ca.public_line();
        for bad in [
            "",
            "ssh-ed25519 notbase64",
            ecdsa,
            long.as_str(),
            own.as_str(),
        ] {
            let err = ca.certify(&request(bad)).unwrap_err();
            assert!(matches!(err, SshCaError::Refused(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn an_existing_ca_is_never_replaced_and_a_loose_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = SshCa::create(dir.path(), CaKind::User).unwrap();
        assert!(matches!(
            SshCa::create(dir.path(), CaKind::User),
            Err(SshCaError::Exists(_))
        ));
        assert_eq!(
            SshCa::load(dir.path(), CaKind::User)
                .unwrap()
                .unwrap()
                .public_line(),
            first
        );
        std::fs::set_permissions(
            dir.path().join(SSH_CA_KEY),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            SshCa::load(dir.path(), CaKind::User),
            Err(SshCaError::BadCaKey { .. })
        ));
        assert!(
            SshCa::load(&dir.path().join("none"), CaKind::User)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_short_validity_is_backdated_little_so_its_half_life_is_ahead() {
        assert_eq!(backdate(DEFAULT_VALIDITY), BACKDATE);
        assert_eq!(backdate(Duration::from_secs(40)), Duration::from_secs(4));
        let v = MIN_VALIDITY;
        let (after, before) = (1000 - backdate(v).as_secs(), 1000 + v.as_secs());
        assert!(after + (before - after) / 2 > 1000 + MIN_REQUEST_INTERVAL.as_secs());
    }

    #[test]
    fn a_second_request_within_the_interval_is_too_soon() {
        let gap = MIN_REQUEST_INTERVAL.as_millis() as u64;
        assert!(!too_soon(None, 5));
        assert!(too_soon(Some(1_000), 1_000));
        assert!(too_soon(Some(1_000), 1_000 + gap - 1));
        assert!(!too_soon(Some(1_000), 1_000 + gap));
        // A clock that went back is not a reason to issue.
        assert!(too_soon(Some(5_000), 1_000));
    }

    #[test]
    fn debug_shows_no_key() {
        let dir = tempfile::tempdir().unwrap();
        SshCa::create(dir.path(), CaKind::User).unwrap();
        let ca = SshCa::load(dir.path(), CaKind::User).unwrap().unwrap();
        let text = std::fs::read_to_string(dir.path().join(SSH_CA_KEY)).unwrap();
        let secret_line = text.lines().nth(1).unwrap();
        let shown = format!("{ca:?}");
        assert!(
            shown.contains("SHA256:") && !shown.contains(secret_line),
            "{shown}"
        );
    }

    #[test]
    fn a_host_key_is_certified_for_its_names_as_a_host_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        SshCa::create(dir.path(), CaKind::Host).unwrap();
        let ca = SshCa::load(dir.path(), CaKind::Host).unwrap().unwrap();
        assert!(
            SshCa::load(dir.path(), CaKind::User).unwrap().is_none(),
            "two CAs, two files"
        );
        let host = agent_key().public_key().to_openssh().unwrap();
        let names = vec!["oma-a.dc1".to_string()];
        let req = |public_key: &str, principals: &[String], validity: Duration| {
            ca.certify_host(&HostCertRequest {
                public_key,
                principals,
                serial: 9,
                now_unix: 1_800_000_000,
                validity,
            })
        };
        let issued = req(&host, &names, DEFAULT_HOST_VALIDITY).unwrap();
        let cert = Certificate::from_openssh(&issued.certificate).unwrap();
        assert_eq!(cert.cert_type(), CertType::Host);
        assert_eq!(cert.valid_principals(), names.as_slice());
        assert_eq!(cert.serial(), 9);
        assert!(cert.extensions().is_empty() && cert.critical_options().is_empty());
        assert_eq!(
            cert.signature_key()
                .fingerprint(HashAlg::Sha256)
                .to_string(),
            ca.fingerprint()
        );
        assert_eq!(
            issued.valid_before - 1_800_000_000,
            DEFAULT_HOST_VALIDITY.as_secs()
        );
        // No name, too long or no validity, an ECDSA key, the CA's own key: refused.
        assert!(req(&host, &[], DEFAULT_HOST_VALIDITY).is_err());
        assert!(req(&host, &names, MAX_HOST_VALIDITY + Duration::from_secs(1)).is_err());
        assert!(req(&host, &names, Duration::ZERO).is_err());
        let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg= x";
        assert!(matches!(
            req(ecdsa, &names, DEFAULT_HOST_VALIDITY),
            Err(SshCaError::Refused(_))
        ));
        assert!(req(&ca.public_line(), &names, DEFAULT_HOST_VALIDITY).is_err());
    }
}
