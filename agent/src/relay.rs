//! Moving bytes between a TCP connection and an SSH channel, and counting them.
//!
//! Every forwarded connection ends here. The copy uses large buffers (the default 8 KiB costs
//! throughput against OpenSSH) and counts each direction into the forward's counters, which is
//! what `tunnels status` shows as bytes each way.
//!
//! What comes from the tunnel is taken from the channel as soon as it arrives, whether or not
//! the local side is reading: russh hands every channel's data over from one session loop, which
//! waits when a channel's queue is full, so one connection whose local reader stalls would stop
//! every connection of the session, and during a key exchange (when the loop takes nothing
//! outbound either) the session itself, for good. A local side that leaves more than
//! [`INBOUND_BACKLOG`] unread has that one connection closed instead.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Copy buffer per direction: two SSH packets' worth. Larger (256 KiB) bought no measurable
/// throughput and cost RSS per connection (BENCHMARKS.md).
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Channel window: large enough that one stream is not throttled by round trips (16 MiB, the
/// same order as OpenSSH's 2 MiB × its adaptive growth).
pub const WINDOW_SIZE: u32 = 16 * 1024 * 1024;

/// The most bytes from the tunnel one connection holds for a local side that is not reading;
/// beyond, the connection is closed. The window the agent grants a channel.
pub const INBOUND_BACKLOG: usize = WINDOW_SIZE as usize;

/// Byte and connection counters of one forward.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    /// Bytes from the local side into the tunnel.
    pub bytes_out: AtomicU64,
    /// Bytes from the tunnel to the local side.
    pub bytes_in: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections since start.
    pub total: AtomicU64,
    /// Connections waiting for the server to open their channel (a hung server shows here).
    pub opening: AtomicU64,
}

impl ForwardCounters {
    /// Counts a connection as open (and once in the total) for as long as the guard lives.
    pub fn hold_open(self: &Arc<Self>) -> Held {
        self.total.fetch_add(1, Ordering::Relaxed);
        Held::new(self, |c| &c.open)
    }

    /// Counts a connection as waiting for its channel for as long as the guard lives.
    pub fn hold_opening(self: &Arc<Self>) -> Held {
        Held::new(self, |c| &c.opening)
    }
}

/// One unit of a forward's gauge (`open`, `opening`), given back when dropped.
pub struct Held {
    counters: Arc<ForwardCounters>,
    gauge: fn(&ForwardCounters) -> &AtomicU64,
}

impl Held {
    fn new(c: &Arc<ForwardCounters>, gauge: fn(&ForwardCounters) -> &AtomicU64) -> Self {
        gauge(c).fetch_add(1, Ordering::Relaxed);
        Held {
            counters: c.clone(),
            gauge,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        (self.gauge)(&self.counters).fetch_sub(1, Ordering::Relaxed);
    }
}

/// Relays `local` <-> `tunnel` until both directions finish; counts into `counters`.
pub async fn relay<L, T>(local: L, tunnel: T, counters: &Arc<ForwardCounters>) -> io::Result<()>
where
    L: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let local = Counted {
        inner: local,
        counters: counters.clone(),
    };
    let (mut local_r, mut local_w) = tokio::io::split(local);
    let (mut tunnel_r, mut tunnel_w) = tokio::io::split(tunnel);
    let outbound = async {
        let mut buf = vec![0u8; RELAY_BUFFER];
        loop {
            let n = local_r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            tunnel_w.write_all(&buf[..n]).await?;
        }
        tunnel_w.shutdown().await
    };
    // The tunnel is read by `take` whatever `give` is doing; `waiting` is what it holds.
    // Buffers go from `take` to `give` full and come back empty (at most `POOL` kept), so a
    // connection whose local side keeps up reuses the same few buffers.
    const POOL: usize = 2;
    let (full_tx, mut full_rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, usize)>();
    let (empty_tx, mut empty_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(POOL);
    let waiting = std::sync::atomic::AtomicUsize::new(0);
    let take = async {
        loop {
            let mut buf = empty_rx
                .try_recv()
                .unwrap_or_else(|_| vec![0u8; RELAY_BUFFER]);
            let n = tunnel_r.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let held = waiting.fetch_add(n, Ordering::Relaxed) + n;
            if held > INBOUND_BACKLOG {
                return Err(io::Error::other(format!(
                    "the local side left {held} bytes from the tunnel unread; connection closed so the rest of the session keeps moving"
                )));
            }
            if full_tx.send((buf, n)).is_err() {
                break;
            }
        }
        drop(full_tx);
        Ok(())
    };
    let give = async {
        while let Some((buf, n)) = full_rx.recv().await {
            local_w.write_all(&buf[..n]).await?;
            waiting.fetch_sub(n, Ordering::Relaxed);
            // A full pool drops the buffer.
            let _ = empty_tx.try_send(buf);
        }
        local_w.shutdown().await
    };
    tokio::try_join!(outbound, take, give).map(|_| ())
}

/// A local stream that counts what is read from it (out) and written to it (in).
struct Counted<S> {
    inner: S,
    counters: Arc<ForwardCounters>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            self.counters
                .bytes_in
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.
    use super::*;

    /// A local side that reads nothing does not stop the tunnel being read (the session's other
    /// channels depend on it): what arrives is held, up to the backlog, then that connection
    /// closes.
    #[tokio::test]
    async fn the_tunnel_is_read_while_the_local_side_is_not() {
        let (_local_app, local) = tokio::io::duplex(1024);
        let (tunnel, mut far) = tokio::io::duplex(64 * 1024);
        let counters = Arc::new(ForwardCounters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move { relay(local, tunnel, &c).await });
        let chunk = vec![7u8; 1 << 20];
        // Half the backlog goes through at once although the local side takes only 1 KiB.
        for _ in 0..INBOUND_BACKLOG / 2 / chunk.len() {
            tokio::time::timeout(std::time::Duration::from_secs(10), far.write_all(&chunk))
                .await
                .expect("the tunnel stopped being read while the local side was not reading")
                .unwrap();
        }
        // Beyond the backlog the connection is closed, with why.
        let mut sent = INBOUND_BACKLOG / 2;
        while far.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
            assert!(sent < 2 * INBOUND_BACKLOG, "held more than the backlog");
        }
        let err = task.await.unwrap().unwrap_err().to_string();
        assert!(err.contains("unread"), "{err}");
    }

    #[tokio::test]
    async fn counts_both_directions() {
        let (local_app, local) = tokio::io::duplex(1024);
        let (tunnel, mut far) = tokio::io::duplex(1024);
        let counters = Arc::new(ForwardCounters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move { relay(local, tunnel, &c).await });
        let (mut app_r, mut app_w) = tokio::io::split(local_app);
        app_w.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        far.read_exact(&mut buf).await.unwrap();
        far.write_all(b"worlds!").await.unwrap();
        let mut buf = [0u8; 7];
        app_r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"worlds!");
        drop(app_w);
        drop(app_r);
        drop(far);
        task.await.unwrap().ok();
        assert_eq!(counters.bytes_out.load(Ordering::Relaxed), 5);
        assert_eq!(counters.bytes_in.load(Ordering::Relaxed), 7);
    }
}
