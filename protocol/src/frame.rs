//! Frames: a 4-byte big-endian length, then a bincode payload of at most [`MAX_FRAME_LEN`].
//!
//! The decoder is incremental: push whatever bytes arrived, take complete frames out. "Need
//! more bytes" is `Ok(None)`, not an error. A length over the maximum is an error the moment the
//! 4 length bytes arrive, before anything is buffered, so a peer cannot make us allocate.
//! Decoding a payload uses bincode with the same limit, so a length prefix *inside* the payload
//! (a vector claiming 2^60 elements) is refused too instead of aborting the process.

use bincode::config::{self, Configuration};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest payload accepted or produced (4 MiB: a full profile set for one agent is kilobytes).
pub const MAX_FRAME_LEN: u32 = 4 * 1024 * 1024;

/// Buffer a decoder keeps between frames: a large frame's buffer is given back once it has been
/// returned, so one big push does not stay with every link for its lifetime.
pub const KEPT_CAPACITY: usize = 16 * 1024;

/// The bincode configuration of every frame: standard (varint), big-endian-free, limited.
fn bincode_config()
-> Configuration<config::LittleEndian, config::Varint, config::Limit<{ MAX_FRAME_LEN as usize }>> {
    config::standard().with_limit::<{ MAX_FRAME_LEN as usize }>()
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The payload would exceed [`MAX_FRAME_LEN`].
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// bincode refused the value.
    #[error("encode: {0}")]
    Bincode(#[from] bincode::error::EncodeError),
}

/// Why bytes from a peer were refused. Any of these ends that connection.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    Oversize {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The payload is not a valid message (truncated, unknown variant, bad UTF-8, over limit).
    #[error("malformed message: {0}")]
    Malformed(#[from] bincode::error::DecodeError),
    /// The payload held a message and then more bytes.
    #[error("{extra} trailing bytes after the message")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// An earlier error poisoned this decoder; the connection must be closed.
    #[error("decoder already failed; close the connection")]
    Poisoned,
}

/// Encodes `msg` as one frame (length prefix included).
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, EncodeError> {
    let payload = bincode::serde::encode_to_vec(msg, bincode_config())?;
    if payload.len() > MAX_FRAME_LEN as usize {
        return Err(EncodeError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    // Safe cast: checked against MAX_FRAME_LEN (a u32) just above.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes one payload (without its length prefix); every byte must belong to the message.
pub fn decode<M: DeserializeOwned>(payload: &[u8]) -> Result<M, DecodeError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, bincode_config())?;
    if used != payload.len() {
        return Err(DecodeError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(msg)
}

/// Splits a byte stream into frame payloads.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    poisoned: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.poisoned {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next complete payload; `Ok(None)` when more bytes are needed.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        if self.poisoned {
            return Err(DecodeError::Poisoned);
        }
        let Some(len_bytes) = self.buf.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*len_bytes);
        if len > MAX_FRAME_LEN {
            self.poisoned = true;
            self.buf = Vec::new();
            return Err(DecodeError::Oversize {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let end = 4 + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let payload = self.buf[4..end].to_vec();
        self.buf.drain(..end);
        if self.buf.capacity() > KEPT_CAPACITY {
            self.buf.shrink_to(KEPT_CAPACITY);
        }
        Ok(Some(payload))
    }

    /// The next complete message; `Ok(None)` when more bytes are needed.
    pub fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, DecodeError> {
        match self.next_payload()? {
            None => Ok(None),
            Some(p) => match decode(&p) {
                Ok(m) => Ok(Some(m)),
                Err(e) => {
                    self.poisoned = true;
                    Err(e)
                }
            },
        }
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes of buffer it holds (at most [`KEPT_CAPACITY`], or what is buffered, after each
    /// frame returned).
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }
}
