//! Small real services on loopback: echo, HTTP `/health`, SOCKS clients, SSH banners, and
//! owner-only secret files.

use std::path::Path;
use std::time::Duration;
use tunnelfleet_standins::services::HttpService;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP echo server on 127.0.0.1 (stops when the guard drops).
pub async fn echo_server() -> (u16, tokio_util::sync::DropGuard) {
    tunnelfleet_standins::services::echo_server()
        .await
        .expect("echo server")
}

/// The demo's HTTP `/health` service on 127.0.0.1 (any port), reused as OMA/VMA APIs in tests.
pub async fn http_service(name: &str) -> HttpService {
    HttpService::start(name, 0).await.expect("http service")
}

/// GET `http://127.0.0.1:port/path`; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not HTTP: {text:?}")))?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}

/// Sends `payload` through `port` and expects it echoed back.
pub async fn echo_roundtrip(port: u16, payload: &[u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("echo timeout"))??;
    if back != payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// SOCKS5 CONNECT through `port` to (`atyp`, `addr`, `target`); returns the stream and the
/// reply code (0 = success).
pub async fn socks_connect(
    port: u16,
    atyp: u8,
    addr: &[u8],
    target: u16,
) -> std::io::Result<(TcpStream, u8)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut greet = [0u8; 2];
    s.read_exact(&mut greet).await?;
    if greet != [5, 0] {
        return Err(std::io::Error::other(format!("SOCKS greeting {greet:?}")));
    }
    let mut req = vec![5, 1, 0, atyp];
    if atyp == 3 {
        req.push(addr.len() as u8);
    }
    req.extend(addr);
    req.extend(target.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    Ok((s, rep[1]))
}

/// Writes a file readable by its owner only.
pub fn write_secret(path: &Path, bytes: &[u8]) {
    tunnelfleet_runtime::secret::write_atomic(path, bytes, 0o600).expect("write secret");
}

/// Answers every connection on `listener` with an OpenSSH banner, as a live OMA answers the
/// coordinator's probes.
pub fn serve_ssh_banner(listener: tokio::net::TcpListener) {
    std::mem::forget(serve_ssh_banner_until_dropped(listener));
}

/// Like [`serve_ssh_banner`], until the guard is dropped (the port closes: the OMA is down).
pub fn serve_ssh_banner_until_dropped(
    listener: tokio::net::TcpListener,
) -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = s.cancelled() => return,
                a = listener.accept() => match a {
                    Ok((mut c, _)) => {
                        let _ = c.write_all(b"SSH-2.0-OpenSSH_9.2p1 test\r\n").await;
                    }
                    Err(_) => return,
                },
            }
        }
    });
    stop.drop_guard()
}

/// A TLS acceptor for a test receiver (an HTTPS webhook, an SMTP relay) with the certificate of
/// a PKI made by `pki::init` in `dir` (`coordinator.pem`/`.key`, for the names given there).
pub fn tls_acceptor(dir: &Path) -> std::io::Result<tokio_rustls::TlsAcceptor> {
    use tunnelfleet_runtime::pem;
    let certs = pem::certs(&dir.join("coordinator.pem")).map_err(std::io::Error::other)?;
    let key = pem::key(&dir.join("coordinator.key")).map_err(std::io::Error::other)?;
    let cfg = rustls::ServerConfig::builder_with_provider(pem::provider())
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg)))
}
