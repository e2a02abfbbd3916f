//! Key and secret files with OpenSSH's permission rule: refused when group or others may read
//! them ("UNPROTECTED PRIVATE KEY FILE"), with the `chmod` that fixes it. A secret anyone on the
//! host can copy is not a secret. Used for SSH identities, the agent's TLS key, join tokens, the
//! admin token, hook secrets and SMTP passwords alike; and the one way key, certificate and
//! state files are written: whole or not at all.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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

/// Writes `bytes` to `path` whole: a temporary file beside it created with `mode` (so a key is
/// never readable by others, not even for a moment), fsynced, renamed over `path`, and the
/// directory fsynced. A crash leaves the old file or the new one, never half of one. Creates
/// the directory if missing.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
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

    #[test]
    fn an_atomic_write_replaces_the_file_whole_with_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub").join("key");
        write_atomic(&f, b"one", 0o600).unwrap();
        write_atomic(&f, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        check_permissions(&f).unwrap();
        assert_eq!(
            std::fs::read_dir(f.parent().unwrap()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
