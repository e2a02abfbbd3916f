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
