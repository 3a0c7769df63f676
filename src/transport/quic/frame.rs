//! The QUIC framing: each direction of a stream carries exactly one frame,
//! a protobuf varint length followed by that many bytes of one message
//! (protobuf's "length-delimited" form), and then the end of the stream.
//!
//! Owns: encoding a frame, and [`FrameReader`], a pure incremental parser
//! that refuses an oversize frame as soon as its length prefix is in and
//! refuses anything that is not exactly one frame; [`read_frame`] drives it
//! from a quinn stream. Must not: know which messages travel or what they
//! mean.

use std::sync::Arc;

use prost::Message;
use quinn::{ConnectionError, ReadError, RecvStream};

use super::ErrorCode;
use crate::transport::budget::{NoRoom, RequestBudget};

/// Longest protobuf varint (a u64).
const MAX_VARINT_BYTES: usize = 10;

/// Why a frame could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FrameError {
    /// The bytes are not one well-formed frame of the expected message
    /// (bad length prefix, cut short, bytes after it, a body that does not
    /// decode).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The length prefix declares (or the stream holds) more than the limit.
    #[error("frame of {declared} bytes is over the limit of {limit}")]
    TooLarge {
        /// Bytes declared by the prefix.
        declared: u64,
        /// The reader's limit.
        limit: usize,
    },
    /// The peer reset the stream with this code.
    #[error("stream reset by the peer (code {0:#x})")]
    Reset(u64),
    /// The connection ended.
    #[error("connection lost: {0}")]
    Lost(ConnectionError),
    /// The stream was already closed locally.
    #[error("stream already closed")]
    Closed,
    /// The frame stopped arriving, or arrives too slowly
    /// ([`read_frame_paced`]).
    #[error("the frame stopped arriving or arrives too slowly")]
    Slow,
    /// The server's request budget had no room for the frame
    /// ([`read_frame_paced`]).
    #[error("{}", .0.message())]
    NoRoom(NoRoom),
}

impl FrameError {
    /// The code to reset the stream with when this was the peer's fault;
    /// `None` when the stream is gone anyway.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            FrameError::Malformed(_) => Some(ErrorCode::MalformedFrame),
            FrameError::TooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            FrameError::Slow => Some(ErrorCode::IncompleteRequest),
            FrameError::NoRoom(_) => Some(ErrorCode::ResourceExhausted),
            FrameError::Reset(_) | FrameError::Lost(_) | FrameError::Closed => None,
        }
    }
}

impl From<ReadError> for FrameError {
    fn from(error: ReadError) -> FrameError {
        match error {
            ReadError::Reset(code) => FrameError::Reset(code.into_inner()),
            ReadError::ConnectionLost(e) => FrameError::Lost(e),
            ReadError::ClosedStream | ReadError::IllegalOrderedRead => FrameError::Closed,
            ReadError::ZeroRttRejected => FrameError::Closed,
        }
    }
}

/// `message` as one frame.
pub fn encode(message: &impl Message) -> Vec<u8> {
    message.encode_length_delimited_to_vec()
}

/// A protobuf varint at the start of `bytes`: `Ok(None)` while more bytes
/// are needed, else the value and its length.
fn varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, FrameError> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().take(MAX_VARINT_BYTES).enumerate() {
        if i == MAX_VARINT_BYTES - 1 && byte > 1 {
            return Err(FrameError::Malformed(
                "length prefix overflows 64 bits".into(),
            ));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= MAX_VARINT_BYTES {
        return Err(FrameError::Malformed(
            "length prefix longer than 10 bytes".into(),
        ));
    }
    Ok(None)
}

/// Collects the bytes of one frame as they arrive, refusing early.
#[derive(Debug)]
pub struct FrameReader {
    /// Bytes so far (prefix and body).
    buf: Vec<u8>,
    /// Largest body accepted.
    limit: usize,
    /// Once the prefix is in: its length and the body's.
    shape: Option<(usize, usize)>,
}

impl FrameReader {
    /// A reader for a frame whose body is at most `limit` bytes.
    pub fn new(limit: usize) -> FrameReader {
        FrameReader {
            buf: Vec::new(),
            limit,
            shape: None,
        }
    }

    /// How many more bytes the frame may take (so a caller reads no more);
    /// one past the end, so that a trailing byte is seen and refused.
    pub fn wanted(&self) -> usize {
        match self.shape {
            None => MAX_VARINT_BYTES.saturating_sub(self.buf.len()).max(1),
            Some((prefix, body)) => (prefix + body + 1).saturating_sub(self.buf.len()),
        }
    }

    /// Takes the next bytes of the stream.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] as soon as the prefix declares too much;
    /// [`FrameError::Malformed`] for a bad prefix or bytes after the frame.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        if self.shape.is_none() {
            if let Some((declared, prefix)) = varint(&self.buf)? {
                let body = usize::try_from(declared)
                    .ok()
                    .filter(|&n| n <= self.limit)
                    .ok_or(FrameError::TooLarge {
                        declared,
                        limit: self.limit,
                    })?;
                self.shape = Some((prefix, body));
            }
        }
        if let Some((prefix, body)) = self.shape {
            if self.buf.len() > prefix + body {
                return Err(FrameError::Malformed(format!(
                    "bytes after the {body}-byte frame"
                )));
            }
        }
        Ok(())
    }

    /// The message, once the stream has ended.
    ///
    /// # Errors
    /// [`FrameError::Malformed`] when the stream ended before the frame did,
    /// or the body is not an `M`.
    pub fn finish<M: Message + Default>(self) -> Result<M, FrameError> {
        let Some((prefix, body)) = self.shape else {
            return Err(FrameError::Malformed(if self.buf.is_empty() {
                "empty stream".into()
            } else {
                "stream ended inside the length prefix".into()
            }));
        };
        if self.buf.len() < prefix + body {
            return Err(FrameError::Malformed(format!(
                "stream ended after {} of {body} bytes",
                self.buf.len() - prefix
            )));
        }
        M::decode(&self.buf[prefix..]).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

/// Reads the one frame of `recv` (up to the end of the stream) as an `M`.
///
/// # Errors
/// [`FrameError`]: a bad frame, or the stream or connection failing.
pub async fn read_frame<M: Message + Default>(
    recv: &mut RecvStream,
    limit: usize,
) -> Result<M, FrameError> {
    let mut reader = FrameReader::new(limit);
    while let Some(chunk) = recv.read_chunk(reader.wanted(), true).await? {
        reader.push(&chunk.bytes)?;
    }
    reader.finish()
}

/// [`read_frame`], giving up when no byte (nor the stream's end) arrives
/// for `pause`, or when the frame takes longer than `pause` plus one second
/// per `min_rate` bytes received ([`crate::transport::request_deadline`]):
/// a large frame on a slow link that keeps coming is read whole, one that
/// trickles in is not. The frame's bytes count against `budget` as they
/// arrive, until it is decoded.
///
/// # Errors
/// [`FrameError::Slow`] then; [`FrameError::NoRoom`] when `budget` has no
/// room for the frame; otherwise as [`read_frame`].
pub async fn read_frame_paced<M: Message + Default>(
    recv: &mut RecvStream,
    limit: usize,
    pause: std::time::Duration,
    min_rate: u64,
    budget: &Arc<RequestBudget>,
) -> Result<M, FrameError> {
    let started = tokio::time::Instant::now();
    let mut received = 0u64;
    let mut reader = FrameReader::new(limit);
    let mut share = budget.share();
    loop {
        let overall = crate::transport::request_deadline(started, pause, received, min_rate);
        let now = tokio::time::Instant::now();
        let wait = overall.map_or(pause, |at| pause.min(at.saturating_duration_since(now)));
        // A chunk already received is taken without arming a timer.
        let next = tokio::time::timeout(wait, recv.read_chunk(reader.wanted(), true)).await;
        match next.map_err(|_elapsed| FrameError::Slow)?? {
            Some(chunk) => {
                received += chunk.bytes.len() as u64;
                share
                    .grow(chunk.bytes.len() as u64)
                    .map_err(FrameError::NoRoom)?;
                reader.push(&chunk.bytes)?;
            }
            None => return reader.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{call_request::Call, CallRequest, StatusArgs};

    fn status_request() -> CallRequest {
        CallRequest {
            call: Some(Call::LockStatus(StatusArgs {})),
            timeout_ms: 1500,
        }
    }

    fn parse(bytes: &[u8], limit: usize, step: usize) -> Result<CallRequest, FrameError> {
        let mut reader = FrameReader::new(limit);
        for chunk in bytes.chunks(step.max(1)) {
            reader.push(chunk)?;
        }
        reader.finish()
    }

    #[test]
    fn a_frame_round_trips_whatever_the_chunking() {
        let bytes = encode(&status_request());
        for step in 1..=bytes.len() {
            assert_eq!(
                parse(&bytes, 100, step).unwrap(),
                status_request(),
                "{step}"
            );
        }
    }

    #[test]
    fn an_oversize_prefix_is_refused_before_its_body() {
        let mut reader = FrameReader::new(1000);
        // 1,000,000 as a varint: 0xc0 0x84 0x3d.
        let err = reader.push(&[0xc0, 0x84, 0x3d]).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    declared: 1_000_000,
                    limit: 1000
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.code(), Some(ErrorCode::FrameTooLarge));
    }

    #[test]
    fn malformed_frames_are_refused_with_the_malformed_code() {
        let good = encode(&status_request());
        let mut trailing = good.clone();
        trailing.push(0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("eleven continuation bytes", vec![0xff; 11]),
            (
                "overflowing prefix",
                vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            ),
            ("cut short", good[..good.len() - 1].to_vec()),
            ("prefix cut short", vec![0x80]),
            ("bytes after the frame", trailing),
            ("body is not protobuf", vec![3, 0xff, 0xff, 0xff]),
        ];
        for (name, bytes) in cases {
            let err = parse(&bytes, 1 << 20, 1).unwrap_err();
            assert!(matches!(err, FrameError::Malformed(_)), "{name}: {err:?}");
            assert_eq!(err.code(), Some(ErrorCode::MalformedFrame), "{name}");
        }
    }

    #[test]
    fn the_reader_never_asks_for_more_than_the_frame_plus_one_byte() {
        let bytes = encode(&status_request());
        let mut reader = FrameReader::new(100);
        reader.push(&bytes[..1]).unwrap();
        assert_eq!(reader.wanted(), bytes.len());
        reader.push(&bytes[1..]).unwrap();
        assert_eq!(reader.wanted(), 1);
    }
}
