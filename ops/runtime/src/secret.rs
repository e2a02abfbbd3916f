//! Key and secret files with OpenSSH's permission rule: refused when group or others may read
//! them ("UNPROTECTED PRIVATE KEY FILE"), with the `chmod` that fixes it. A secret anyone on the
//! host can copy is not a secret. Used for SSH identities, the agent's TLS key, join tokens, the
//! admin token, hook secrets and SMTP passwords alike.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// Could not read its metadata.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// Group or others may read it.
    #[error(
        "{}: permissions {mode:04o} are too open; a private key must not be accessible by group or others (chmod 600 {})",
        path.display(),
        path.display()
    )]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

/// Checks the file's mode the way OpenSSH does.
pub fn check_permissions(path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn group_or_world_readable_is_refused_with_the_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = check_permissions(&f).unwrap_err().to_string();
        assert!(e.contains("0640") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_permissions(&f).unwrap();
        assert!(check_permissions(&dir.path().join("missing")).is_err());
    }
}
