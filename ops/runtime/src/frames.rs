//! Reading the control link's frames off a QUIC stream, for both ends: bytes go into one
//! [`FrameDecoder`] (which enforces the frame limit before buffering) and whole messages come
//! out. One read buffer per stream, reused: nothing is allocated per read.

use serde::de::DeserializeOwned;
use tunnelfleet_protocol::{DecodeError, FrameDecoder};

/// Bytes read per call; QUIC hands out at most this much of a stream at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Why no message could be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    /// The peer sent bytes that are not a valid frame; close that connection.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The stream or its connection failed.
    #[error("{0}")]
    Read(#[from] quinn::ReadError),
}

/// Whole messages from one stream.
pub struct FrameReader {
    dec: FrameDecoder,
    buf: Box<[u8]>,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::new()
    }
}

impl FrameReader {
    /// A reader with an empty decoder.
    pub fn new() -> FrameReader {
        FrameReader {
            dec: FrameDecoder::new(),
            buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream. Cancel-safe: bytes
    /// already read stay in the decoder for the next call.
    pub async fn next<M: DeserializeOwned>(
        &mut self,
        recv: &mut quinn::RecvStream,
    ) -> Result<Option<M>, FrameReadError> {
        loop {
            if let Some(m) = self.dec.next_message::<M>()? {
                return Ok(Some(m));
            }
            match recv.read(&mut self.buf).await? {
                Some(n) => self.dec.push(&self.buf[..n]),
                None => return Ok(None),
            }
        }
    }
}
