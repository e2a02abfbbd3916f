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
    use tunnelfleet_runtime::pem;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        pem::add_roots(&mut roots, path).map_err(|e| CaError::Pem(e.reason))?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(pem::provider())
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
    // The start of the error body, for the outbox's last error: a bounded read (a receiver
    // answering with an endless body costs nothing), within two seconds.
    let mut kept = Vec::new();
    let mut body = resp.into_body();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while kept.len() < ERROR_BODY_KEPT {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        let room = ERROR_BODY_KEPT - kept.len();
                        kept.extend_from_slice(&d[..d.len().min(room)]);
                    }
                }
                _ => break,
            }
        }
    })
    .await;
    let body: String = String::from_utf8_lossy(&kept).chars().take(200).collect();
    Err(DeliveryError::Status { status, body })
}

/// Bytes of an error answer's body read for the message.
const ERROR_BODY_KEPT: usize = 1024;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    /// A receiver refusing with an endless body: the attempt ends with its status and the
    /// start of its body, read only so far.
    #[tokio::test]
    async fn an_endless_error_body_is_read_only_so_far() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n",
                        )
                        .await;
                    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "busy ".repeat(13_107) + "b");
                    while s.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        let e = post(
            &client(None).unwrap(),
            Post {
                url: format!("http://127.0.0.1:{port}/hook").parse().unwrap(),
                body: b"{}".to_vec(),
                secret: None,
                idempotency_key: "k",
                timeout: Duration::from_secs(5),
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("HTTP 503") && e.contains("busy busy"), "{e}");
    }
}
