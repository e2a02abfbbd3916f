//! Certificates and keys from PEM files, and the one crypto provider (ring) every TLS
//! configuration in tunnelfleet is built with: the control link at both ends, the admin API
//! and its CLI, hook clients, OTLP export.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A PEM file that could not be read, parsed, or used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct PemError {
    /// The file.
    pub path: PathBuf,
    /// The file system's, the PEM parser's or rustls' reason.
    pub reason: String,
}

impl PemError {
    fn new(path: &Path, reason: impl std::fmt::Display) -> PemError {
        PemError {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// The ring crypto provider (the workspace uses ring for rustls and russh alike).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM file; a file without one is an error.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| PemError::new(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::new(path, e))?;
    if certs.is_empty() {
        return Err(PemError::new(path, "no certificate in file"));
    }
    Ok(certs)
}

/// Adds every certificate of the PEM file at `path` to `roots`.
pub fn add_roots(roots: &mut rustls::RootCertStore, path: &Path) -> Result<(), PemError> {
    for c in certs(path)? {
        roots.add(c).map_err(|e| PemError::new(path, e))?;
    }
    Ok(())
}

/// A root store holding exactly the certificates of the PEM file at `path`.
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    add_roots(&mut roots, path)?;
    Ok(roots)
}

/// The private key of a PEM file (its permissions are the caller's check: see `secret`).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PemError::new(path, e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.
    use super::*;

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = certs(&empty).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = key(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
