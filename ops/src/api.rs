//! A small client of the coordinator's admin API (HTTP/1.1, JSON, bearer token).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The coordinator could not be reached.
    #[error("coordinator admin API {addr}: {reason}")]
    Unreachable {
        /// host:port.
        addr: String,
        /// The connection error.
        reason: String,
    },
    /// The coordinator answered with an error.
    #[error("coordinator: {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
}

/// The admin API at `addr` with `token`: plain HTTP to `host:port` (or `http://host:port`),
/// TLS to `https://host:port` with the fleet CA given by [`ApiClient::with_ca`].
#[derive(Clone)]
pub struct ApiClient {
    addr: String,
    token: String,
    https: bool,
    tls: Option<Tls>,
}

/// How an `https://` API is reached.
#[derive(Clone)]
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

impl ApiClient {
    /// A client; `addr` is `host:port`, `http://host:port` or `https://host:port`.
    pub fn new(addr: &str, token: &str) -> Self {
        let https = addr.starts_with("https://");
        ApiClient {
            addr: addr
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_string(),
            token: token.trim().to_string(),
            https,
            tls: None,
        }
    }

    /// Trusts the CA certificates in `ca` (the fleet CA, `pki_dir/ca.pem`) for an `https://`
    /// API; the coordinator's certificate must name the host of the address.
    pub fn with_ca(mut self, ca: &std::path::Path) -> Result<Self, ApiError> {
        use rustls::pki_types::ServerName;
        use tunnelfleet_runtime::pem;
        let bad = |reason: String| ApiError::Unreachable {
            addr: self.addr.clone(),
            reason,
        };
        let roots = pem::roots(ca).map_err(|e| bad(format!("CA file {e}")))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(pem::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let host = tunnelfleet_protocol::addr::split_host_port(&self.addr, None)
            .map_err(|e| bad(e.to_string()))?
            .0;
        let name = ServerName::try_from(host).map_err(|e| bad(e.to_string()))?;
        self.tls = Some(Tls {
            connector: tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)),
            name,
        });
        Ok(self)
    }

    /// `host:port` of the API.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call::<(), T>("GET", path, None).await
    }

    /// A request with an optional JSON body.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let unreachable = |reason: String| ApiError::Unreachable {
            addr: self.addr.clone(),
            reason,
        };
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut sender = match (self.https, &self.tls) {
            (false, _) => handshake(stream).await,
            (true, Some(tls)) => {
                let stream = tls
                    .connector
                    .connect(tls.name.clone(), stream)
                    .await
                    .map_err(|e| unreachable(format!("TLS: {e}")))?;
                handshake(stream).await
            }
            (true, None) => {
                return Err(unreachable(
                    "an https:// coordinator needs the fleet CA: --ca-file or $TUNNELFLEET_CA_FILE"
                        .into(),
                ));
            }
        }
        .map_err(|e| unreachable(e.to_string()))?;
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| unreachable(e.to_string()))?,
            None => Vec::new(),
        };
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).to_string());
            return Err(ApiError::Status {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ApiError::Status {
            status: status.as_u16(),
            message: format!("unreadable answer: {e}"),
        })
    }
}

/// An HTTP/1.1 connection over `stream`, driven by its own task (ended with the sender).
async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
