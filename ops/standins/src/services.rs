//! Small real services the OMA and VMA sides need in the demo and the tests: an HTTP API with a
//! `/health` endpoint and a TCP echo server standing in for NBD.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A tiny HTTP service: `/health` answers 200 with `"<name> ok"` (503 while `failing`),
/// `/bytes/N` answers N bytes, any other path 404. Stops when dropped.
pub struct HttpService {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Set to make `/health` answer 503.
    pub failing: Arc<AtomicBool>,
    /// Requests served.
    pub hits: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl HttpService {
    /// Starts it on 127.0.0.1:`port` (0 for any).
    pub async fn start(name: &str, port: u16) -> std::io::Result<HttpService> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let failing = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (f, h, s, name) = (
            failing.clone(),
            hits.clone(),
            stop.clone(),
            name.to_string(),
        );
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => continue },
                };
                let (f, h, name) = (f.clone(), h.clone(), name.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        h.fetch_add(1, Ordering::Relaxed);
                        let path = req.uri().path();
                        let (code, body) = if let Some(n) = path.strip_prefix("/bytes/") {
                            // A body of N bytes (at most 1 GiB), for bandwidth measurements.
                            match n.parse::<usize>() {
                                Ok(n) if n <= 1 << 30 => (200, Bytes::from(vec![b'x'; n])),
                                _ => (400, Bytes::from("bad size")),
                            }
                        } else if path != "/health" {
                            (404, Bytes::from("not found"))
                        } else if f.load(Ordering::Relaxed) {
                            (503, Bytes::from(format!("{name} unhealthy")))
                        } else {
                            (200, Bytes::from(format!("{name} ok")))
                        };
                        let mut resp = hyper::Response::new(Full::new(body));
                        *resp.status_mut() =
                            hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), svc)
                        .await;
                });
            }
        });
        Ok(HttpService {
            port,
            failing,
            hits,
            stop,
        })
    }
}

impl Drop for HttpService {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A TCP echo server on 127.0.0.1; stops when the returned token is cancelled or dropped.
pub async fn echo_server() -> std::io::Result<(u16, tokio_util::sync::DropGuard)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = s.cancelled() => return,
                r = listener.accept() => if let Ok((mut c, _)) = r {
                    tokio::spawn(async move {
                        let (mut r, mut w) = c.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                }
            }
        }
    });
    Ok((port, stop.drop_guard()))
}

/// One request a [`WebhookSink`] received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// What the sink answered.
    pub status: u16,
    /// When it arrived (Unix ms).
    pub received_unix_ms: u64,
}

impl Received {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// An HTTP receiver for alert hooks (the demo's sink and the tests' receiver): records every
/// POST, answers 200, or 503 while `failing`. Stops when dropped.
pub struct WebhookSink {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Set to refuse deliveries with 503.
    pub failing: Arc<AtomicBool>,
    received: Arc<std::sync::Mutex<Vec<Received>>>,
    stop: CancellationToken,
}

impl WebhookSink {
    /// Starts on 127.0.0.1:`port` (0 for any).
    pub async fn start(port: u16) -> std::io::Result<WebhookSink> {
        WebhookSink::start_with(port, None).await
    }

    /// Like [`WebhookSink::start`], speaking HTTPS with `tls` (a receiver with its own CA).
    pub async fn start_with(
        port: u16,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<WebhookSink> {
        use http_body_util::BodyExt;
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let failing = Arc::new(AtomicBool::new(false));
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (f, r, s) = (failing.clone(), received.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    _ = s.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
                };
                let (f, r, tls) = (f.clone(), r.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (f, r) = (f.clone(), r.clone());
                        async move {
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (k.as_str().to_string(), v.to_str().unwrap_or("").to_string())
                                })
                                .collect();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let status = if f.load(Ordering::Relaxed) { 503 } else { 200 };
                            let received_unix_ms = tunnelfleet_runtime::clock::now_unix_ms();
                            r.lock().unwrap_or_else(|p| p.into_inner()).push(Received {
                                headers,
                                body,
                                status,
                                received_unix_ms,
                            });
                            let mut resp = hyper::Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() =
                                hyper::StatusCode::from_u16(status).unwrap_or_default();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(conn), svc).await;
                        }
                        Some(tls) => {
                            if let Ok(conn) = tls.accept(conn).await {
                                let _ = http.serve_connection(TokioIo::new(conn), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Ok(WebhookSink {
            port,
            failing,
            received,
            stop,
        })
    }

    /// Every request so far (including refused ones).
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The requests it accepted (answered 200).
    pub fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.status == 200)
            .collect()
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
