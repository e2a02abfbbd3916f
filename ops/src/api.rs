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

/// The admin API at `addr` with `token`.
#[derive(Clone)]
pub struct ApiClient {
    addr: String,
    token: String,
}

impl ApiClient {
    /// A client; `addr` is `host:port` (an `http://` prefix is accepted).
    pub fn new(addr: &str, token: &str) -> Self {
        ApiClient {
            addr: addr
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            token: token.trim().to_string(),
        }
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
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let driver = tokio::spawn(conn);
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
        driver.abort();
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
