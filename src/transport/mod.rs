//! Transports: each turns its wire format into core requests sent through a
//! [`crate::server::Handle`], and core replies back into its wire format.
//! None of them holds lock rules.
//!
//! - [`budget`]: the bytes of requests held while they arrive, server-wide.
//! - [`calls`]: the meaning of each protobuf call, shared by every transport.
//! - [`grpc`]: tonic, wire compatible with the original service; TLS optional.
//! - [`quic`]: quinn, one stream per call, length-delimited envelopes
//!   (`proto/QUIC.md`); always TLS 1.3.
//! - [`tls`]: certificates (the development CA) and TLS configurations.

use std::time::Duration;

pub mod budget;
pub mod calls;
pub mod grpc;
pub mod quic;
pub mod tls;

#[cfg(test)]
mod tests;

/// How a server watches its quiet peers (`--keepalive-ms`,
/// `--keepalive-timeout-ms`): after `interval` without hearing from a
/// client it pings, and a connection still silent `timeout` later is
/// closed. Closing is what cuts a vanished client's calls off: its waiting
/// acquire is detached (its place kept for a retry) instead of being granted
/// a lock nobody will use or release. gRPC sends HTTP/2 pings and waits
/// `timeout` for their answer; QUIC pings after `interval` and closes after
/// `interval + timeout` of silence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Keepalive {
    /// 10 s, then 20 s: a dead client is noticed within 30 s.
    pub const DEFAULT: Keepalive = Keepalive {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(20),
    };

    /// The longest silence a connection survives.
    pub fn idle_limit(self) -> Duration {
        self.interval.saturating_add(self.timeout)
    }
}

/// How long a request may keep the server waiting for its next bytes (or
/// its end), over either transport (then QUIC: `INCOMPLETE_REQUEST`; gRPC:
/// DEADLINE_EXCEEDED). What arrived of it is dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The slowest a request may arrive on average, in bytes per second: a
/// request may take [`REQUEST_TIMEOUT`] plus one second per this many bytes
/// received, however it trickles in ([`request_deadline`]). Without it a
/// peer could send most of a large request and then a byte every 29 s,
/// holding its buffer for ever.
pub const MIN_REQUEST_RATE: u64 = 64 << 10;

/// The latest a request that started at `started`, with `received` bytes so
/// far, may keep arriving: `pause` plus one second per `min_rate` bytes
/// received (no bound when `min_rate` is 0).
pub fn request_deadline(
    started: tokio::time::Instant,
    pause: Duration,
    received: u64,
    min_rate: u64,
) -> Option<tokio::time::Instant> {
    if min_rate == 0 {
        return None;
    }
    // The fraction of a second is below 10^9 nanoseconds.
    let nanos = u128::from(received % min_rate) * 1_000_000_000 / u128::from(min_rate);
    let allowance = Duration::new(received / min_rate, nanos as u32);
    started.checked_add(pause.checked_add(allowance)?)
}

/// How long a stopping server waits for its connections to finish the
/// calls they have open (the engine already answered every waiting call
/// with "shutting down") before it drops them: a peer that stopped halfway
/// through a request, or never reads its answer, would hold a graceful
/// drain open for ever. Both transports use it (`drain_grace` in their
/// limits).
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long a file read's reply may wait for the peer to take any more of
/// it; then the server gives up on it (QUIC: resets its stream with
/// `REPLY_STALLED`; gRPC: closes its connection) and gives its share of the
/// read-reply budget back.
pub const REPLY_STALL_LIMIT: Duration = Duration::from_secs(30);

/// Most connections a server keeps at once, per transport, by default
/// (`--max-connections`).
pub const MAX_CONNECTIONS: usize = 4096;
