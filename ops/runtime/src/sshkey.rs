//! ed25519 OpenSSH keys as both daemons make and show them: the coordinator's SSH user CA and
//! an agent's own SSH key. Made from the system's randomness (ring), written by the caller.

use ssh_key::private::{Ed25519Keypair, KeypairData};
use ssh_key::{HashAlg, PrivateKey, PublicKey};

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SshKeyError {
    /// The system gave no randomness.
    #[error("no system randomness for a new key")]
    Random,
    /// The key could not be encoded.
    #[error("encoding the key: {0}")]
    Encode(#[from] ssh_key::Error),
}

/// A new ed25519 key with `comment`.
pub fn generate_ed25519(comment: &str) -> Result<PrivateKey, SshKeyError> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| SshKeyError::Random)?;
    Ok(PrivateKey::new(
        KeypairData::Ed25519(Ed25519Keypair::from_seed(&seed)),
        comment,
    )?)
}

/// Why a line is not an ed25519 public key the fleet takes.
#[derive(Debug, thiserror::Error)]
pub enum KeyLineError {
    /// Longer than allowed.
    #[error("public key line of {len} bytes; at most {max}")]
    TooLong {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// Not an OpenSSH public key.
    #[error("not an OpenSSH public key line: {0}")]
    NotAKey(ssh_key::Error),
    /// Another algorithm.
    #[error("a {algorithm} {what}key; only ed25519 {what}keys are taken")]
    NotEd25519 {
        /// Its algorithm.
        algorithm: String,
        /// The kind of key (`""`, `"host "`).
        what: String,
    },
}

/// An ed25519 public key from one OpenSSH line of at most `max` bytes, or why it is not one
/// (`what` names the kind of key in that: `""`, `"host "`).
pub fn ed25519_line(line: &str, max: usize, what: &str) -> Result<PublicKey, KeyLineError> {
    if line.len() > max {
        return Err(KeyLineError::TooLong {
            len: line.len(),
            max,
        });
    }
    let key = PublicKey::from_openssh(line.trim()).map_err(KeyLineError::NotAKey)?;
    if key.algorithm() != ssh_key::Algorithm::Ed25519 {
        return Err(KeyLineError::NotEd25519 {
            algorithm: key.algorithm().to_string(),
            what: what.to_string(),
        });
    }
    Ok(key)
}

/// A public key as one OpenSSH line (`ssh-ed25519 AAAA… comment`).
pub fn public_line(key: &PublicKey) -> String {
    key.to_openssh()
        .unwrap_or_else(|e| format!("unencodable: {e}"))
}

/// A public key's fingerprint as `ssh-keygen -lf` prints it (`SHA256:…`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn keys_are_new_ed25519_and_shown_as_openssh_shows_them() {
        let a = generate_ed25519("a").unwrap();
        let b = generate_ed25519("b").unwrap();
        assert_ne!(a.public_key().key_data(), b.public_key().key_data());
        assert_eq!(a.algorithm(), ssh_key::Algorithm::Ed25519);
        let line = public_line(a.public_key());
        assert!(
            line.starts_with("ssh-ed25519 AAAA") && line.ends_with(" a"),
            "{line}"
        );
        let fp = fingerprint(a.public_key());
        assert!(fp.starts_with("SHA256:") && fp.len() == 50, "{fp}");
    }
}
