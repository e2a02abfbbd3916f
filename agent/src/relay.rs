//! Moving bytes between a TCP connection and an SSH channel, and counting them.
//!
//! Every forwarded connection ends here. The copy uses large buffers (the default 8 KiB costs
//! throughput against OpenSSH) and counts each direction into the forward's counters, which is
//! what `tunnels status` shows as bytes each way.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Copy buffer per direction: two SSH packets' worth. Larger (256 KiB) bought no measurable
/// throughput and cost RSS per connection (BENCHMARKS.md).
pub const RELAY_BUFFER: usize = 64 * 1024;

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
}

/// Counts a connection as open for as long as it lives.
pub struct OpenGuard(Arc<ForwardCounters>);

impl OpenGuard {
    /// Marks one more open connection.
    pub fn new(c: &Arc<ForwardCounters>) -> Self {
        c.open.fetch_add(1, Ordering::Relaxed);
        c.total.fetch_add(1, Ordering::Relaxed);
        OpenGuard(c.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Relays `local` <-> `tunnel` until both directions finish; counts into `counters`.
pub async fn relay<L, T>(local: L, mut tunnel: T, counters: &Arc<ForwardCounters>) -> io::Result<()>
where
    L: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut local = Counted {
        inner: local,
        counters: counters.clone(),
    };
    tokio::io::copy_bidirectional_with_sizes(&mut local, &mut tunnel, RELAY_BUFFER, RELAY_BUFFER)
        .await
        .map(|_| ())
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
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
