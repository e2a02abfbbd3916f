//! Reading the control link's frames off a QUIC stream, for both ends: bytes go into one
//! [`FrameDecoder`] (which enforces the frame limit before buffering) and whole messages come
//! out. Reads take QUIC's own received chunks (no read buffer per stream: a coordinator holds
//! one reader per linked agent, and a fixed 64 KiB each was most of what a link cost it).

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
            match recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.dec.push(&chunk.bytes),
                None => return Ok(None),
            }
        }
    }
}
