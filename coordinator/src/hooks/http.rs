//! The HTTPS client of the webhook, Slack and Alertmanager hooks (rustls with the web PKI
//! roots, and a hook's own `ca_file` for an internal receiver), and one POST with its deadline.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::error::DeliveryError;
use super::format::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign};

/// The client every HTTP hook shares.
pub type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client over the web PKI roots plus, with `extra_ca`, the CA certificates in that PEM file
/// (an internal Alertmanager's, a company proxy's), with the ring provider like every TLS in
/// tunnelfleet.
pub fn client(extra_ca: Option<&Path>) -> Result<Client, CaError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| CaError::Pem(e.to_string()))?;
        if certs.is_empty() {
            return Err(CaError::Pem("no certificate in it".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| CaError::Pem(e.to_string()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| CaError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(https),
    )
}

/// Why a hook's HTTPS client could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    /// `ca_file` is not a readable PEM certificate file.
    #[error("{0}")]
    Pem(String),
    /// The TLS configuration was refused.
    #[error("TLS: {0}")]
    Tls(String),
}

/// What one POST carries.
pub struct Post<'a> {
    /// The receiver's URL.
    pub url: hyper::Uri,
    /// The JSON body.
    pub body: Vec<u8>,
    /// Signs the body when set.
    pub secret: Option<&'a [u8]>,
    /// The delivery's idempotency key.
    pub idempotency_key: &'a str,
    /// Deadline of the whole request.
    pub timeout: Duration,
}

/// POSTs once; a 2xx answer is success, anything else says what came back.
pub async fn post(client: &Client, p: Post<'_>) -> Result<(), DeliveryError> {
    let mut req = hyper::Request::post(p.url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("tunnelfleet/", env!("CARGO_PKG_VERSION")),
        )
        .header(IDEMPOTENCY_HEADER, p.idempotency_key);
    if let Some(secret) = p.secret {
        req = req.header(
            SIGNATURE_HEADER,
            format!("sha256={}", sign(secret, &p.body)),
        );
    }
    let req = req
        .body(Full::new(Bytes::from(p.body)))
        .map_err(|e| DeliveryError::Transport(e.to_string()))?;
    let resp = tokio::time::timeout(p.timeout, client.request(req))
        .await
        .map_err(|_| DeliveryError::Timeout(p.timeout))?
        .map_err(|e| DeliveryError::Transport(format!("{e:?}")))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body: String = tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect())
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|b| {
            String::from_utf8_lossy(&b.to_bytes())
                .chars()
                .take(200)
                .collect()
        })
        .unwrap_or_default();
    Err(DeliveryError::Status { status, body })
}
