//! SSH private keys: algorithm and size, passphrase, permissions of the file and its directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use russh::keys::ssh_key::{self, Algorithm};

use super::{Finding, Severity};

/// Audits every private key in `dir` (files whose text holds a PEM/OpenSSH private key), and
/// the directory's own permissions.
pub fn audit_dir(dir: &Path) -> std::io::Result<Vec<Finding>> {
    let mut out = Vec::new();
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        out.push(Finding::new(
            "key.dir-writable",
            Severity::Medium,
            "key directory writable by group or others",
            format!("{} has mode {mode:04o}", dir.display()),
            format!("chmod 700 {}", dir.display()),
        ));
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_file() && looks_private(&path) {
            out.extend(audit_file(&path));
        }
    }
    Ok(out)
}

fn looks_private(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| b.len() < 64 * 1024 && String::from_utf8_lossy(&b).contains("PRIVATE KEY-----"))
        .unwrap_or(false)
}

/// Audits one private key file.
pub fn audit_file(path: &Path) -> Vec<Finding> {
    let shown = path.display().to_string();
    let mut out = Vec::new();
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                out.push(Finding::new(
                    "key.permissions",
                    Severity::High,
                    "private key readable by group or others",
                    format!("{shown} has mode {mode:04o} (OpenSSH and tunnelfleet refuse it)"),
                    format!("chmod 600 {shown}"),
                ));
            }
        }
        Err(e) => {
            out.push(Finding::new(
                "key.unreadable",
                Severity::Info,
                "key file cannot be read",
                format!("{shown}: {e}"),
                "run the audit as the key's owner or root",
            ));
            return out;
        }
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (algorithm, bits, encrypted) = match inspect(&text) {
        Ok(k) => k,
        Err(reason) => {
            out.push(Finding::new(
                "key.unparsable",
                Severity::Low,
                "private key could not be inspected",
                format!("{shown}: {reason}"),
                "convert it to the OpenSSH format: ssh-keygen -p -o -f FILE",
            ));
            return out;
        }
    };
    match (&algorithm, bits) {
        (Algorithm::Dsa, _) => out.push(Finding::new(
            "key.dsa",
            Severity::High,
            "DSA key (1024-bit, disabled by default since OpenSSH 7.0)",
            format!("{shown}: ssh-dss"),
            "replace it: ssh-keygen -t ed25519, then update authorized_keys and the profile",
        )),
        (Algorithm::Rsa { .. }, Some(b)) if b < 3072 => out.push(Finding::new(
            "key.rsa-short",
            if b < 2048 {
                Severity::High
            } else {
                Severity::Medium
            },
            format!("RSA key of {b} bits (under 3072)"),
            format!("{shown}: RSA {b} bits"),
            "replace it: ssh-keygen -t ed25519 (or -t rsa -b 4096)",
        )),
        _ => {}
    }
    if !encrypted {
        out.push(Finding::new(
            "key.no-passphrase",
            Severity::Info,
            "private key without a passphrase",
            format!("{shown}: {} key, not encrypted", algorithm_name(&algorithm, bits)),
            "expected for a service key (keep it 0600 and owned by the service user); for a person's key add one: ssh-keygen -p -f FILE",
        ));
    }
    out
}

/// Why a key file could not be inspected.
#[derive(Debug, thiserror::Error)]
enum InspectError {
    /// An OpenSSH key that does not parse.
    #[error(transparent)]
    OpenSsh(#[from] ssh_key::Error),
    /// A legacy PEM key behind a passphrase.
    #[error("encrypted legacy PEM key: its size cannot be read without the passphrase")]
    EncryptedPem,
    /// Not a key russh can read.
    #[error(transparent)]
    Other(#[from] russh::keys::Error),
}

/// (algorithm, RSA bits, encrypted) of a key file's text.
fn inspect(text: &str) -> Result<(Algorithm, Option<usize>, bool), InspectError> {
    if text.contains("BEGIN DSA PRIVATE KEY") {
        return Ok((Algorithm::Dsa, None, text.contains("ENCRYPTED")));
    }
    if text.contains("BEGIN OPENSSH PRIVATE KEY") {
        // The public half of an OpenSSH key is readable even when the private half is encrypted.
        let key = ssh_key::PrivateKey::from_openssh(text)?;
        let bits = key
            .public_key()
            .key_data()
            .rsa()
            .map(|r| mpint_bits(r.n().as_bytes()));
        return Ok((key.algorithm(), bits, key.is_encrypted()));
    }
    match russh::keys::decode_secret_key(text, None) {
        Ok(key) => {
            let bits = key
                .public_key()
                .key_data()
                .rsa()
                .map(|r| mpint_bits(r.n().as_bytes()));
            Ok((key.algorithm(), bits, false))
        }
        Err(russh::keys::Error::KeyIsEncrypted) => Err(InspectError::EncryptedPem),
        Err(e) => Err(e.into()),
    }
}

fn mpint_bits(bytes: &[u8]) -> usize {
    let bytes: Vec<u8> = bytes.iter().copied().skip_while(|&b| b == 0).collect();
    match bytes.first() {
        Some(&first) => bytes.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

fn algorithm_name(a: &Algorithm, bits: Option<usize>) -> String {
    match bits {
        Some(b) => format!("RSA {b}-bit"),
        None => a.as_str().to_string(),
    }
}
