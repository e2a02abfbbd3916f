//! The control link's UDP socket, with buffers sized for thousands of agents.
//!
//! Every agent's QUIC traffic arrives on one socket. Linux's default receive buffer (208 KiB)
//! holds about 150 full datagrams; a push to 10,000 agents brings 10,000 acknowledgements back
//! within milliseconds, the kernel drops what does not fit, and each dropped packet costs its
//! agent a QUIC loss-detection timeout (found by bench-fleet: 440,000 `RcvbufErrors`, and a push
//! p99 of seconds). So the socket asks for `udp_buffer` bytes each way and says so when the
//! kernel's cap (`net.core.rmem_max` / `wmem_max`) grants less.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// What the coordinator asks for by default: room for about 3,000 full datagrams.
pub const DEFAULT_BUFFER: usize = 4 << 20;

/// The least `udp_buffer` accepted: below Linux's own default is a typo, not a tuning.
pub const MIN_BUFFER: usize = 64 << 10;

/// A bound UDP socket and the buffer sizes the kernel granted.
#[derive(Debug)]
pub struct Bound {
    /// The socket, ready for `quinn::Endpoint::new`.
    pub socket: std::net::UdpSocket,
    /// Receive buffer granted, bytes (as usable: Linux reports twice the set value).
    pub recv_buffer: usize,
    /// Send buffer granted, bytes.
    pub send_buffer: usize,
}

/// Binds `addr` with receive and send buffers of `buffer` bytes (or what the kernel allows).
pub fn bind(addr: SocketAddr, buffer: usize) -> std::io::Result<Bound> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // As quinn's own constructor: [::] serves IPv4 agents too where the host allows it.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: an unprivileged process gets at most the kernel's cap, checked below.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.bind(&addr.into())?;
    let granted = |n: usize| if cfg!(target_os = "linux") { n / 2 } else { n };
    Ok(Bound {
        recv_buffer: granted(socket.recv_buffer_size()?),
        send_buffer: granted(socket.send_buffer_size()?),
        socket: socket.into(),
    })
}

/// A quinn endpoint on a socket from [`bind`], with the runtime quinn would pick itself.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[test]
    fn asks_for_the_buffer_and_reports_what_was_granted() {
        // Small enough for any kernel cap: granted in full.
        let b = bind("127.0.0.1:0".parse().unwrap(), 64 << 10).unwrap();
        assert_eq!(b.recv_buffer, 64 << 10);
        assert_eq!(b.send_buffer, 64 << 10);
        assert_ne!(b.socket.local_addr().unwrap().port(), 0);
        // Far beyond any default cap: less is granted, and reported as such.
        let b = bind("127.0.0.1:0".parse().unwrap(), 1 << 30).unwrap();
        assert!(b.recv_buffer < 1 << 30, "{}", b.recv_buffer);
    }
}
