//! Framing: a 4-byte big-endian length `N`, then `N` bytes holding one MessagePack map.
//!
//! [`FrameCodec`] moves raw payloads, [`MessageCodec`] typed messages; both are tokio-util codecs
//! and both check a header against `max_frame` before reserving a byte for its payload. The free
//! functions [`encode`], [`decode`] and [`read_frame`] serve code without tokio (the worker SDK).

use std::io::{Cursor, Read};
use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

use crate::error::ProtocolError;

/// Size of the length prefix in bytes.
pub const HEADER_LEN: usize = 4;

/// Default largest payload: 8 MiB, tokio-util's own default.
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// Deepest nesting of arrays and maps a payload may hold, its message map counting as one.
///
/// Decoding recurses once per level (twice, through serde's buffering of tagged enums), so a
/// few hundred bytes of `[[[[...` would otherwise overflow a 2 MiB thread stack and abort the
/// process. Deeper payloads are [`ProtocolError::Malformed`].
pub const MAX_DEPTH: usize = 128;

/// Checks a frame header's announced length against `max_frame`.
pub fn check_len(len: u32, max_frame: usize) -> Result<usize, ProtocolError> {
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    if len as u64 > max_frame as u64 {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            max: max_frame,
        });
    }
    Ok(len as usize)
}

/// Encodes a message as one whole frame (header and payload).
pub fn encode<T: Serialize + ?Sized>(msg: &T, max_frame: usize) -> Result<Vec<u8>, ProtocolError> {
    let mut out = vec![0u8; HEADER_LEN];
    rmp_serde::encode::write_named(&mut out, msg).map_err(|e| ProtocolError::Encode {
        reason: e.to_string(),
    })?;
    let len = out.len() - HEADER_LEN;
    if len > max_frame || len > u32::MAX as usize {
        return Err(ProtocolError::Encode {
            reason: format!(
                "encoded message of {len} bytes exceeds max_frame of {max_frame} bytes"
            ),
        });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one message from a frame's payload (without its header).
///
/// The payload must hold exactly one MessagePack map; anything else is a typed violation.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtocolError> {
    let first_byte = *payload.first().ok_or(ProtocolError::EmptyFrame)?;
    let is_map = matches!(first_byte, 0x80..=0x8f | 0xde | 0xdf);
    if !is_map {
        return Err(ProtocolError::NotAMap { first_byte });
    }
    let mut de = rmp_serde::Deserializer::new(Cursor::new(payload));
    // rmp-serde fails when its counter reaches zero, i.e. at `depth` levels: allow MAX_DEPTH.
    de.set_max_depth(MAX_DEPTH + 1);
    let msg = T::deserialize(&mut de).map_err(|e| ProtocolError::Malformed {
        reason: e.to_string(),
    })?;
    let used = de.position() as usize;
    if used != payload.len() {
        return Err(ProtocolError::TrailingBytes {
            extra: payload.len() - used,
        });
    }
    Ok(msg)
}

/// Reads one frame's payload from a blocking reader.
///
/// Returns `Ok(None)` on a clean EOF (exactly on a frame boundary). The header is checked
/// before the payload buffer is allocated.
pub fn read_frame<R: Read>(
    reader: &mut R,
    max_frame: usize,
) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut header)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            expected: HEADER_LEN as u64,
            got: got as u64,
        });
    }
    let len = check_len(u32::from_be_bytes(header), max_frame)?;
    let mut payload = vec![0u8; len];
    let got = read_full(reader, &mut payload)?;
    if got < len {
        return Err(ProtocolError::Truncated {
            expected: (HEADER_LEN + len) as u64,
            got: (HEADER_LEN + got) as u64,
        });
    }
    Ok(Some(payload))
}

/// Reads until `buf` is full or EOF; returns how many bytes were read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

/// A tokio-util codec of raw frames: decodes payloads, encodes payloads with their header.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec that refuses payloads over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
    }

    /// The configured maximum payload size.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, ProtocolError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let announced = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        let len = check_len(announced, self.max_frame)?;
        if src.len() < HEADER_LEN + len {
            // Now that the length is known to be sane, make room for the rest of the frame.
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        Ok(Some(src.split_to(len)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, ProtocolError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => {
                let expected = if src.len() < HEADER_LEN {
                    HEADER_LEN as u64
                } else {
                    (HEADER_LEN as u64)
                        + u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as u64
                };
                Err(ProtocolError::Truncated {
                    expected,
                    got: src.len() as u64,
                })
            }
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let len = payload.len();
        if len == 0 {
            return Err(ProtocolError::EmptyFrame);
        }
        if len > self.max_frame || len > u32::MAX as usize {
            return Err(ProtocolError::FrameTooLarge {
                len: len as u64,
                max: self.max_frame,
            });
        }
        dst.reserve(HEADER_LEN + len);
        dst.put_u32(len as u32);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

/// A tokio-util codec of typed messages: decodes `In`, encodes `Out`.
///
/// The runtime uses `MessageCodec<FromWorker, ToWorker>`; a worker would use the reverse.
#[derive(Debug)]
pub struct MessageCodec<In, Out> {
    frames: FrameCodec,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> MessageCodec<In, Out> {
    /// A codec that refuses payloads over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            frames: FrameCodec::new(max_frame),
            _types: PhantomData,
        }
    }
}

impl<In, Out> Clone for MessageCodec<In, Out> {
    fn clone(&self) -> Self {
        Self::new(self.frames.max_frame)
    }
}

impl<In: DeserializeOwned, Out> Decoder for MessageCodec<In, Out> {
    type Item = In;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, ProtocolError> {
        match self.frames.decode(src)? {
            Some(payload) => decode(&payload).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<In>, ProtocolError> {
        match self.frames.decode_eof(src)? {
            Some(payload) => decode(&payload).map(Some),
            None => Ok(None),
        }
    }
}

impl<In, Out: Serialize> Encoder<&Out> for MessageCodec<In, Out> {
    type Error = ProtocolError;

    fn encode(&mut self, msg: &Out, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let start = dst.len();
        dst.put_u32(0);
        let mut writer = dst.writer();
        let written = rmp_serde::encode::write_named(&mut writer, msg);
        let dst = writer.into_inner();
        if let Err(e) = written {
            // Leave nothing half-written: a sink would otherwise send the placeholder header.
            dst.truncate(start);
            return Err(ProtocolError::Encode {
                reason: e.to_string(),
            });
        }
        let len = dst.len() - start - HEADER_LEN;
        if len > self.frames.max_frame || len > u32::MAX as usize {
            dst.truncate(start);
            return Err(ProtocolError::Encode {
                reason: format!(
                    "encoded message of {len} bytes exceeds max_frame of {} bytes",
                    self.frames.max_frame
                ),
            });
        }
        dst[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}
