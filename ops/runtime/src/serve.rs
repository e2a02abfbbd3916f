//! Serving an HTTP router on a TCP listener with bounds, for every listener the daemons open
//! (the coordinator's admin API and `/metrics`, the agent's `/metrics`): connections at once
//! overall and from one address, a TLS handshake, the request head, and the whole request
//! each have a limit, so a flood of idle or half-open connections costs a bounded number of
//! descriptors and goes away by itself. A connection over the per-address cap is closed as soon
//! as it is accepted; over the overall cap, new connections wait in the kernel's backlog.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How much one listener serves at once, and how long each step may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one IP address.
    pub per_address: usize,
    /// Time a client has to finish its TLS handshake.
    pub handshake: Duration,
    /// Time a client has to send a request's head, and how long a kept-alive connection may
    /// sit idle before the next one.
    pub head: Duration,
    /// Time from a request's head to its whole response (body read and handler included).
    pub request: Duration,
}

impl Limits {
    /// The admin API: a few operators and scripts. Its slowest request waits for an agent's
    /// answer (the coordinator's command timeout is 60 s).
    pub const ADMIN: Limits = Limits {
        max_connections: 256,
        per_address: 64,
        handshake: Duration::from_secs(10),
        head: Duration::from_secs(10),
        request: Duration::from_secs(90),
    };

    /// A `/metrics` endpoint: a handful of scrapers.
    pub const METRICS: Limits = Limits {
        max_connections: 64,
        per_address: 16,
        handshake: Duration::from_secs(10),
        head: Duration::from_secs(10),
        request: Duration::from_secs(30),
    };
}

/// Connections open per address; a [`Held`] gives its place back when dropped.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

struct Held(Arc<PerAddress>, IpAddr);

impl PerAddress {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<Held> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Held(self.clone(), ip))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) within `limits` until `shutdown`.
/// `name` says which listener in logs.
pub async fn serve(
    name: &'static str,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_address = Arc::new(PerAddress::default());
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => return,
            s = slots.clone().acquire_owned() => s,
        };
        let Ok(slot) = slot else { return };
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: keep serving.
                    tracing::warn!("{name}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(held) = per_address.take(remote.ip(), limits.per_address) else {
            tracing::debug!(%remote, "{name}: {} connections from this address already; closed", limits.per_address);
            continue;
        };
        let (tls, app, shutdown) = (tls.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _held = (slot, held);
            match tls {
                None => connection(tcp, app, limits, shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection(stream, app, limits, shutdown).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, "{name}: TLS handshake failed: {e}")
                        }
                        Err(_) => tracing::debug!(
                            %remote,
                            "{name}: no TLS handshake within {:?}",
                            limits.handshake
                        ),
                    }
                }
            }
        });
    }
}

/// One HTTP/1.1 connection: the head within `limits.head` (idle keep-alive included), each
/// request within `limits.request`.
async fn connection<S>(stream: S, app: axum::Router, limits: Limits, shutdown: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        async move {
            let call = tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new));
            Ok::<_, Infallible>(match tokio::time::timeout(limits.request, call).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(never)) => match never {},
                Err(_) => too_slow(limits.request),
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.head)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

fn too_slow(limit: Duration) -> axum::response::Response {
    let mut resp = axum::response::Response::new(axum::body::Body::from(format!(
        "the request took longer than {}s\n",
        limit.as_secs()
    )));
    *resp.status_mut() = axum::http::StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "late"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve("test", listener, None, app, limits, stop.clone()));
        (addr, stop)
    }

    const SMALL: Limits = Limits {
        max_connections: 8,
        per_address: 3,
        handshake: Duration::from_secs(10),
        head: Duration::from_secs(10),
        request: Duration::from_secs(30),
    };

    /// Reads until the server closes; what it sent.
    async fn until_closed(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn over_the_per_address_cap_is_closed_at_once_and_others_still_served() {
        let (addr, _stop) = server(SMALL).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // The fourth from this address is closed without a byte (not after the head limit).
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let sent = tokio::time::timeout(SMALL.head / 2, until_closed(&mut fourth))
            .await
            .expect("the fourth connection from one address was kept");
        assert_eq!(sent, "");
        // Another address is served (the whole 127/8 is loopback on Linux).
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut other = other.connect(addr).await.unwrap();
        other
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut other).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // A place given back is taken again.
        drop(idle.pop());
        let mut again = None;
        for _ in 0..200 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let a = until_closed(&mut s).await;
            if !a.is_empty() {
                again = Some(a);
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(again.unwrap().starts_with("HTTP/1.1 200"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_head_limit() {
        let (addr, _stop) = server(SMALL).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let closed = tokio::spawn(async move { until_closed(&mut silent).await });
        tokio::time::sleep(SMALL.head - Duration::from_secs(1)).await;
        assert!(!closed.is_finished(), "closed before the head limit");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sent = tokio::time::timeout(Duration::from_secs(1), closed)
            .await
            .expect("still open after the head limit")
            .unwrap();
        assert!(!sent.starts_with("HTTP/1.1 200"), "{sent}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_is_closed_when_idle_and_a_slow_request_answered() {
        let (addr, _stop) = server(SMALL).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Kept alive, then idle past the head limit: closed.
        tokio::time::sleep(SMALL.head + Duration::from_secs(1)).await;
        let sent = tokio::time::timeout(Duration::from_secs(1), until_closed(&mut s))
            .await
            .expect("an idle kept-alive connection was kept past the head limit");
        assert_eq!(sent, "");

        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut slow).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("longer than 30s"), "{answer}");
    }
}
