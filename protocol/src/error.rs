//! Typed errors of the wire protocol: everything that can be wrong with a frame or a message.

use thiserror::Error;

/// A violation of the packet protocol, or an I/O failure underneath it.
///
/// Any of these poisons the stream it came from: the protocol never tries to resynchronise.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame header announced a payload larger than the configured maximum. Raised from the
    /// 4-byte header alone, before anything is allocated for the payload.
    #[error("frame of {len} bytes exceeds max_frame of {max} bytes")]
    FrameTooLarge {
        /// The length the header announced.
        len: u64,
        /// The configured maximum.
        max: usize,
    },
    /// A frame header announced a payload of zero bytes.
    #[error("zero-length frame")]
    EmptyFrame,
    /// The stream ended inside a frame header or payload.
    #[error("truncated frame: stream ended with {got} of {expected} bytes")]
    Truncated {
        /// Bytes the frame (header included) needed.
        expected: u64,
        /// Bytes that arrived before the stream ended.
        got: u64,
    },
    /// The payload is not a MessagePack map.
    #[error("payload is not a MessagePack map (first byte {first_byte:#04x})")]
    NotAMap {
        /// The payload's first byte.
        first_byte: u8,
    },
    /// The payload is not valid MessagePack or not a known message (unknown `t`, missing or
    /// mistyped field).
    #[error("malformed message: {reason}")]
    Malformed {
        /// What the decoder objected to.
        reason: String,
    },
    /// The payload holds more bytes after its one MessagePack value.
    #[error("{extra} trailing bytes after the message in a frame")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// A message could not be encoded (or its encoding exceeds max_frame).
    #[error("cannot encode message: {reason}")]
    Encode {
        /// Why encoding failed.
        reason: String,
    },
    /// Reading or writing the channel failed.
    #[error("channel I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// Whether this error came from the bytes on the wire (as opposed to local I/O).
    pub fn is_violation(&self) -> bool {
        !matches!(self, ProtocolError::Io(_))
    }
}
