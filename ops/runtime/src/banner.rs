//! The SSH identification line, read the way both the coordinator's OMA probes and
//! `tunnelfleet net check` read it: SSH servers speak first (RFC 4253 §4.2) with one line of at
//! most 255 bytes. Reading it proves more than a TCP connect: a stopped sshd whose kernel still
//! completes the handshake never sends it.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest identification line RFC 4253 allows, CR LF included.
pub const MAX_BANNER: usize = 255;

/// Reads the server's first line, without its line end; empty when the server closed before
/// sending anything. Bound it with a timeout: a silent server never returns.
pub async fn read_banner<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut line = Vec::with_capacity(MAX_BANNER);
    let mut byte = [0u8; 1];
    // One byte at a time: nothing after the line end is consumed (it belongs to the protocol).
    while line.len() < MAX_BANNER {
        if s.read(&mut byte).await? == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.

    use super::*;

    #[tokio::test]
    async fn the_first_line_only_and_empty_on_a_silent_close() {
        let mut s: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 Debian\r\nrest";
        assert_eq!(
            read_banner(&mut s).await.unwrap(),
            "SSH-2.0-OpenSSH_9.2p1 Debian"
        );
        assert_eq!(s, b"rest");
        let mut empty: &[u8] = b"";
        assert_eq!(read_banner(&mut empty).await.unwrap(), "");
        let long = vec![b'x'; 1000];
        assert_eq!(
            read_banner(&mut long.as_slice()).await.unwrap().len(),
            MAX_BANNER
        );
    }
}
