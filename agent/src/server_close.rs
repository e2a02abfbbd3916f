//! Holding a finished channel until the server closes it.
//!
//! russh forgets a channel only when the server's CLOSE finds it still open. A channel the
//! agent drops first sends our CLOSE and leaves russh's channel entry (its message queue, about
//! 18 kB) in the session when the server's CLOSE comes back, for as long as the session lives:
//! an `R` forward grew the agent 4 KB a connection through OpenSSH, and an `L` forward whose
//! local client hangs up first (a monitoring probe, every few seconds for weeks) the same. So a
//! connection whose relay has ended keeps its channel until the server's CLOSE, which OpenSSH
//! sends as soon as both sides sent EOF, or [`SERVER_CLOSE_WAIT`] at most.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use russh::ChannelId;
use tokio::sync::oneshot;

/// How long a finished connection's channel is held for the server's CLOSE.
pub const SERVER_CLOSE_WAIT: Duration = Duration::from_secs(10);

/// One session's channels waiting for the server's CLOSE; the session's handler reports each
/// CLOSE here ([`ServerCloses::closed`]).
#[derive(Clone, Default)]
pub struct ServerCloses(Arc<Mutex<HashMap<u32, oneshot::Sender<()>>>>);

/// One channel's wait for its server's CLOSE, from [`ServerCloses::expect`].
pub struct Expected {
    id: u32,
    closed: oneshot::Receiver<()>,
    of: ServerCloses,
}

impl ServerCloses {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, oneshot::Sender<()>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, the server's CLOSE of `id` is told to the returned wait.
    pub fn expect(&self, id: ChannelId) -> Expected {
        self.expect_number(id.into())
    }

    fn expect_number(&self, id: u32) -> Expected {
        let (tell, closed) = oneshot::channel();
        self.lock().insert(id, tell);
        Expected {
            id,
            closed,
            of: self.clone(),
        }
    }

    /// The server closed `id` (its CLOSE found the channel open: russh has let go of it).
    pub fn closed(&self, id: ChannelId) {
        self.closed_number(id.into());
    }

    fn closed_number(&self, id: u32) {
        if let Some(tell) = self.lock().remove(&id) {
            let _ = tell.send(());
        }
    }

    /// Channels waiting now.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }
}

impl Expected {
    /// Waits for the server's CLOSE, [`SERVER_CLOSE_WAIT`] at most (a server that never sends
    /// it costs the entry, not the connection's end).
    pub async fn wait(mut self) {
        let _ = tokio::time::timeout(SERVER_CLOSE_WAIT, &mut self.closed).await;
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.of.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // In tests a panic is the failure report.
    use super::*;

    /// A wait ends when the server's CLOSE is reported, and nothing is left registered.
    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_the_servers_close_and_leaves_nothing_behind() {
        let closes = ServerCloses::default();
        let expected = closes.expect_number(7);
        assert_eq!(closes.waiting(), 1);
        let started = tokio::time::Instant::now();
        let waiter = tokio::spawn(expected.wait());
        tokio::time::sleep(Duration::from_secs(2)).await;
        closes.closed_number(7);
        waiter.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(closes.waiting(), 0);
    }

    /// A server that never closes: the wait gives up after SERVER_CLOSE_WAIT, and forgets it;
    /// a close of another channel does not end it.
    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_closes_is_waited_for_a_bounded_time() {
        let closes = ServerCloses::default();
        let expected = closes.expect_number(1);
        closes.closed_number(2);
        let started = tokio::time::Instant::now();
        expected.wait().await;
        assert_eq!(started.elapsed(), SERVER_CLOSE_WAIT);
        assert_eq!(closes.waiting(), 0);
    }
}
