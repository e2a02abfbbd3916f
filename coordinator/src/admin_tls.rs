//! The admin API over TLS (`admin_tls = true`): the coordinator's own certificate from the
//! fleet PKI (`coordinator.pem`, for the names given to `pki init`). The listener itself, with
//! its handshake timeout and connection caps, is `tunnelfleet_runtime::serve`.

use std::path::Path;
use std::sync::Arc;

use tunnelfleet_runtime::pem;

use crate::tls::TlsError;

/// The acceptor for the admin listener, from the PKI in `pki_dir`.
pub fn acceptor(pki_dir: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let mut chain = pem::certs(&pki_dir.join(crate::pki::SERVER_CERT))?;
    chain.extend(pem::certs(&pki_dir.join(crate::pki::CA_CERT))?);
    let key = pem::key(&pki_dir.join(crate::pki::SERVER_KEY))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(pem::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
