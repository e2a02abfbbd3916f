//! The server side of SOCKS5 CONNECT (RFC 1928), for `D` forwards.
//!
//! Only what `ssh -D` offers: no authentication, CONNECT only, IPv4, IPv6 and domain targets.
//! The handshake is split from IO-free parsing so malformed greetings are unit-tested.

use std::net::{Ipv4Addr, Ipv6Addr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The CONNECT succeeded.
    Success = 0,
    /// General SOCKS server failure (tunnel down).
    GeneralFailure = 1,
    /// Host unreachable (the SSH server could not connect).
    HostUnreachable = 4,
    /// Command not supported.
    CommandNotSupported = 7,
    /// Address type not supported.
    AddressNotSupported = 8,
}

/// Why a SOCKS handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    /// Reading or writing the client failed.
    #[error("socks: {0}")]
    Io(#[from] std::io::Error),
    /// The client sent something that is not SOCKS5 CONNECT.
    #[error("socks: {0}")]
    Protocol(String),
}

/// How long a SOCKS client has to say where it goes: a client that connects and sends nothing
/// (or dribbles a byte a minute) does not hold a connection slot for ever.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// [`accept`] within [`HANDSHAKE_TIMEOUT`].
pub async fn accept_in_time<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<(String, u16), SocksError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(s))
        .await
        .map_err(|_| {
            SocksError::Protocol(format!(
                "no SOCKS request within {}",
                humantime::format_duration(HANDSHAKE_TIMEOUT)
            ))
        })?
}

/// Reads the greeting and CONNECT request; returns the target `(host, port)`.
/// On a protocol error the matching failure reply has already been sent.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<(String, u16), SocksError> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(SocksError::Protocol(format!(
            "version {} is not SOCKS5",
            head[0]
        )));
    }
    let mut methods = vec![0u8; head[1] as usize];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        return Err(SocksError::Protocol(
            "client offers no 'no authentication' method".into(),
        ));
    }
    s.write_all(&[5, 0]).await?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    if req[0] != 5 {
        return Err(SocksError::Protocol("bad request version".into()));
    }
    if req[1] != 1 {
        reply(s, Reply::CommandNotSupported).await?;
        return Err(SocksError::Protocol(format!(
            "command {} not supported (CONNECT only)",
            req[1]
        )));
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            s.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        4 => {
            let mut a = [0u8; 16];
            s.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; len[0] as usize];
            s.read_exact(&mut name).await?;
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() => n,
                _ => {
                    reply(s, Reply::AddressNotSupported).await?;
                    return Err(SocksError::Protocol("bad domain name".into()));
                }
            }
        }
        t => {
            reply(s, Reply::AddressNotSupported).await?;
            return Err(SocksError::Protocol(format!(
                "address type {t} not supported"
            )));
        }
    };
    let mut port = [0u8; 2];
    s.read_exact(&mut port).await?;
    Ok((host, u16::from_be_bytes(port)))
}

/// Sends a reply with an all-zero bound address (as OpenSSH does).
pub async fn reply<S: AsyncWrite + Unpin>(s: &mut S, code: Reply) -> std::io::Result<()> {
    s.write_all(&[5, code as u8, 0, 1, 0, 0, 0, 0, 0, 0]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(input: &[u8]) -> (Result<(String, u16), SocksError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(input).await.unwrap();
        client.shutdown().await.unwrap();
        let res = accept(&mut server).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (res, out)
    }

    #[tokio::test]
    async fn connect_forms() {
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 80]).await;
        assert_eq!(r.unwrap(), ("10.0.0.1".into(), 80));
        assert_eq!(out, vec![5, 0]);
        let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        v6.extend([0x1f, 0x90]);
        assert_eq!(run(&v6).await.0.unwrap(), ("::1".into(), 8080));
        let mut dn = vec![5, 1, 0, 5, 1, 0, 3, 9];
        dn.extend(b"localhost");
        dn.extend([0, 22]);
        assert_eq!(run(&dn).await.0.unwrap(), ("localhost".into(), 22));
    }

    #[tokio::test]
    async fn refusals() {
        let (r, _) = run(&[4, 1, 0]).await;
        assert!(r.unwrap_err().to_string().contains("not SOCKS5"));
        let (r, out) = run(&[5, 1, 2]).await;
        assert!(r.is_err());
        assert_eq!(out, vec![5, 0xff]);
        let (r, out) = run(&[5, 1, 0, 5, 2, 0, 1, 0, 0, 0, 0, 0, 0]).await;
        assert!(r.unwrap_err().to_string().contains("CONNECT only"));
        assert_eq!(out[2..4], [5, 7]);
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 9]).await;
        assert!(r.is_err());
        assert_eq!(out[3], 8);
        // Truncated: the client goes away mid-request.
        let (r, _) = run(&[5, 1, 0, 5, 1]).await;
        assert!(matches!(r, Err(SocksError::Io(_))));
    }

    /// A client that connects and says nothing is let go after the handshake timeout.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_let_go() {
        let (_client, mut server) = tokio::io::duplex(64);
        let e = accept_in_time(&mut server).await.unwrap_err().to_string();
        assert!(e.contains("no SOCKS request within 10s"), "{e}");
    }
}
