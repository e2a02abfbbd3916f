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

/// The admin API at one or several addresses with `token`: plain HTTP to `host:port` (or
/// `http://host:port`), TLS to `https://host:port` with the fleet CA given by
/// [`ApiClient::with_ca`]. With several coordinators (`a:4480,b:4480`), a request goes to the
/// first one that takes the connection; a request that was sent is sent again only to the
/// next one, when the first answered 421 (it did nothing: another coordinator does that).
#[derive(Clone)]
pub struct ApiClient {
    targets: Vec<Target>,
    token: String,
}

/// One coordinator's admin API.
#[derive(Clone)]
struct Target {
    addr: String,
    https: bool,
    tls: Option<Tls>,
}

/// How an `https://` API is reached.
#[derive(Clone)]
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: rustls::pki_types::ServerName<'static>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl ApiClient {
    /// A client; `addrs` is `host:port`, `http://host:port` or `https://host:port`, or several
    /// of them separated by commas.
    pub fn new(addrs: &str, token: &str) -> Self {
        let targets = addrs
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| Target {
                addr: a
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_string(),
                https: a.starts_with("https://"),
                tls: None,
            })
            .collect();
        ApiClient {
            targets,
            token: token.trim().to_string(),
        }
    }

    /// Trusts the CA certificates in `ca` (the fleet CA, `pki_dir/ca.pem`) for `https://`
    /// APIs; each coordinator's certificate must name the host of its address.
    pub fn with_ca(mut self, ca: &std::path::Path) -> Result<Self, ApiError> {
        use rustls::pki_types::ServerName;
        use tunnelfleet_runtime::pem;
        let bad = |addr: &str, reason: String| ApiError::Unreachable {
            addr: addr.to_string(),
            reason,
        };
        let first = self.addr().to_string();
        let roots = pem::roots(ca).map_err(|e| bad(&first, format!("CA file {e}")))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(pem::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&first, e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        for t in &mut self.targets {
            let host = tunnelfleet_protocol::addr::split_host_port(&t.addr, None)
                .map_err(|e| bad(&t.addr, e.to_string()))?
                .0;
            let name = ServerName::try_from(host).map_err(|e| bad(&t.addr, e.to_string()))?;
            t.tls = Some(Tls {
                connector: connector.clone(),
                name,
            });
        }
        Ok(self)
    }

    /// `host:port` of the (first) API.
    pub fn addr(&self) -> &str {
        self.targets.first().map(|t| t.addr.as_str()).unwrap_or("")
    }

    /// GET `path`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call::<(), T>("GET", path, None).await
    }

    /// A connection to the first coordinator from `start` on that takes one, and its index.
    async fn connect(&self, start: usize) -> Result<(Sender, usize), ApiError> {
        let mut failures = Vec::new();
        for (i, t) in self.targets.iter().enumerate().skip(start) {
            match t.connect().await {
                Ok(sender) => return Ok((sender, i)),
                Err(reason) => failures.push((t.addr.as_str(), reason.to_string())),
            }
        }
        Err(match failures.as_slice() {
            [] => ApiError::Unreachable {
                addr: String::new(),
                reason: "no coordinator address given (--coordinator)".into(),
            },
            [(addr, reason)] => ApiError::Unreachable {
                addr: addr.to_string(),
                reason: reason.clone(),
            },
            many => ApiError::Unreachable {
                addr: many.iter().map(|(a, _)| *a).collect::<Vec<_>>().join(", "),
                reason: many
                    .iter()
                    .map(|(a, r)| format!("{a}: {r}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        })
    }

    /// A request with an optional JSON body. A coordinator that answers 421 did nothing and
    /// names another that does it (the leader, the one the agent is linked to): the request
    /// goes on to the next address given, and that answer is the one shown if none does.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ApiError> {
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ApiError::Unreachable {
                addr: self.addr().to_string(),
                reason: e.to_string(),
            })?,
            None => Vec::new(),
        };
        let mut start = 0;
        let mut misdirected = None;
        loop {
            let (mut sender, i) = match self.connect(start).await {
                Ok(c) => c,
                Err(e) => return Err(misdirected.unwrap_or(e)),
            };
            let addr = self.targets[i].addr.as_str();
            let unreachable = |reason: String| ApiError::Unreachable {
                addr: addr.to_string(),
                reason,
            };
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, addr)
                .header(
                    hyper::header::AUTHORIZATION,
                    format!("Bearer {}", self.token),
                )
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(bytes.clone())))
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
                let e = ApiError::Status {
                    status: status.as_u16(),
                    message,
                };
                if status == hyper::StatusCode::MISDIRECTED_REQUEST && i + 1 < self.targets.len() {
                    misdirected = Some(e);
                    start = i + 1;
                    continue;
                }
                return Err(e);
            }
            return serde_json::from_slice(&body).map_err(|e| ApiError::Status {
                status: status.as_u16(),
                message: format!("unreadable answer: {e}"),
            });
        }
    }
}

/// Why one coordinator's admin API took no connection.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    /// No TCP connection.
    #[error("{0}")]
    Tcp(std::io::Error),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The HTTP/1.1 handshake failed.
    #[error("{0}")]
    Http(hyper::Error),
    /// `https://` without the CA to check it.
    #[error("an https:// coordinator needs the fleet CA: --ca-file or $TUNNELFLEET_CA_FILE")]
    NoCa,
}

impl Target {
    /// An HTTP/1.1 connection to this API (TCP, TLS when `https://`), nothing sent yet.
    async fn connect(&self) -> Result<Sender, ConnectError> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(ConnectError::Tcp)?;
        match (self.https, &self.tls) {
            (false, _) => handshake(stream).await.map_err(ConnectError::Http),
            (true, Some(tls)) => {
                let stream = tls
                    .connector
                    .connect(tls.name.clone(), stream)
                    .await
                    .map_err(ConnectError::Tls)?;
                handshake(stream).await.map_err(ConnectError::Http)
            }
            (true, None) => Err(ConnectError::NoCa),
        }
    }
}

/// An HTTP/1.1 connection over `stream`, driven by its own task (ended with the sender).
async fn handshake<S>(stream: S) -> Result<Sender, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}
