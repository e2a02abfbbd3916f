//! Loading the client's private key, with OpenSSH's permission rule.
//!
//! OpenSSH refuses a private key that group or others can read ("UNPROTECTED PRIVATE KEY FILE")
//! because a key anyone on the appliance can copy is not an identity. We refuse the same way and
//! say the `chmod` that fixes it.

use std::path::Path;

use russh::keys::PrivateKey;
use tunnelfleet_runtime::secret::{SecretFileError, check_permissions};

/// Why the identity file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Could not read the file, or group or others may read it.
    #[error("identity file {0}")]
    Permissions(#[from] SecretFileError),
    /// A profile without an `identity_file` on an agent with no coordinator to certify its
    /// own key.
    #[error(
        "no identity_file, and no coordinator to certify this agent's own key: a standalone agent's profile names its key file"
    )]
    NoCoordinator,
    /// A profile trusting the fleet's SSH host CA on an agent with no coordinator to learn it
    /// from.
    #[error(
        "fleet_host_ca = true, and no coordinator to learn the fleet's SSH host CA from: a standalone agent's profile names known_hosts or host_key_fingerprints"
    )]
    NoFleetHostCa,
    /// Not a key we can use (or encrypted: a service cannot type a passphrase).
    #[error("identity file {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Reads and decodes an unencrypted OpenSSH/PEM private key after checking its permissions.
pub fn load_identity(path: &Path) -> Result<PrivateKey, IdentityError> {
    check_permissions(path)?;
    russh::keys::load_secret_key(path, None).map_err(|e| {
        let reason = match e {
            russh::keys::Error::KeyIsEncrypted => {
                "the key is encrypted with a passphrase; a service cannot type one: use a \
                 dedicated key without a passphrase, readable only by the agent's user"
                    .to_string()
            }
            other => format!("not a usable private key: {other}"),
        };
        IdentityError::Invalid {
            path: path.display().to_string(),
            reason,
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use russh::keys::Algorithm;

    #[test]
    fn refuses_group_readable_and_loads_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        let key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).unwrap();
        std::fs::write(
            &path,
            key.to_openssh(Default::default()).unwrap().as_bytes(),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_identity(&path).unwrap_err().to_string();
        assert!(e.contains("0640") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_identity(&path).unwrap().public_key(), key.public_key());
    }

    #[test]
    fn garbage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_identity(&path).unwrap_err().to_string();
        assert!(e.contains("not a usable private key"), "{e}");
    }
}
