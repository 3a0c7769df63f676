//! The request budget (`--max-inflight-request-bytes`): bytes of requests
//! the server holds while they arrive, over both transports at once.
//!
//! Owns: the count of those bytes. A request takes its share as soon as its
//! length is known (QUIC: the frame's prefix; gRPC: the message's 5-byte
//! prefix), before its body is read, and gives it back once the request has
//! ended and been decoded (before the call is carried out): the declared
//! length, not what has arrived so far, because tonic sets aside room for a
//! whole message as soon as its prefix is in. A request whose share is not
//! free is refused at once
//! (`RESOURCE_EXHAUSTED`, which clients retry with backoff) rather than
//! made to wait: a waiting stream's unread bytes would take room in its
//! connection's flow-control window, which the requests already holding
//! shares on that connection may need to finish. Must not: wait, or hold a
//! lock; it is two atomic operations on every request.
//!
//! Without it, each connection could hold up to its 256 streams times the
//! largest request (256 MiB by default over gRPC, and 64 times that with
//! `--max-append-bytes` at its most), on each of thousands of connections:
//! a few clients uploading large appends slowly could exhaust the server's
//! memory. The per-request time limits bound how long such bytes are held,
//! not how many.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The default budget: 256 MiB.
pub const DEFAULT_BYTES: u64 = 256 << 20;

/// Requests of at most this many bytes are "small": every call but an
/// append with content (QUIC's frame room for all but the content).
pub const SMALL_REQUEST_BYTES: u64 = super::quic::FRAME_OVERHEAD as u64;

/// Bytes of requests being received, across the server.
#[derive(Debug)]
pub struct RequestBudget {
    held: AtomicU64,
    /// The budget.
    total: u64,
    /// What larger requests may fill: three quarters of it. The last
    /// quarter is for small requests (renewals, releases, acquires), so
    /// that a flood of large appends cannot make holders lose their leases.
    large: u64,
    refused: AtomicU64,
}

/// A request's share of the budget, given back when dropped.
#[derive(Debug)]
pub struct RequestShare {
    budget: Arc<RequestBudget>,
    bytes: u64,
}

impl Drop for RequestShare {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The budget had no room for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoRoom {
    pub bytes: u64,
}

impl NoRoom {
    /// What the peer is told.
    pub fn message(self) -> String {
        format!(
            "the server holds as many arriving request bytes as it takes \
             (--max-inflight-request-bytes); retry later ({} bytes)",
            self.bytes
        )
    }
}

impl RequestBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Arc<RequestBudget> {
        Arc::new(RequestBudget {
            held: AtomicU64::new(0),
            total,
            large: Self::large_part(total),
            refused: AtomicU64::new(0),
        })
    }

    /// What requests larger than [`SMALL_REQUEST_BYTES`] may fill of a
    /// budget of `total`: the largest request must fit in it, or it would
    /// always be refused (`dlm server` checks).
    pub fn large_part(total: u64) -> u64 {
        total - total / 4
    }

    /// Takes `bytes` for a request, or refuses it.
    ///
    /// # Errors
    /// [`NoRoom`] when the request would take the budget past its total
    /// (past three quarters of it, for a large request).
    pub fn take(self: &Arc<Self>, bytes: u64) -> Result<RequestShare, NoRoom> {
        let most = if bytes > SMALL_REQUEST_BYTES {
            self.large
        } else {
            self.total
        };
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            let Some(next) = held.checked_add(bytes).filter(|&next| next <= most) else {
                self.note_refusal();
                return Err(NoRoom { bytes });
            };
            match self
                .held
                .compare_exchange_weak(held, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(RequestShare {
                        budget: self.clone(),
                        bytes,
                    })
                }
                Err(now) => held = now,
            }
        }
    }

    /// One log line for the first refusal and then one per thousand: a
    /// flood must not turn into a flood of log lines.
    fn note_refusal(&self) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        if refused == 1 || refused.is_multiple_of(1000) {
            tracing::warn!(
                refused,
                budget = self.total,
                "arriving requests fill --max-inflight-request-bytes; refusing more (RESOURCE_EXHAUSTED)"
            );
        }
    }

    /// Bytes held now, and requests refused so far: for tests and
    /// diagnostics.
    pub fn held(&self) -> (u64, u64) {
        (
            self.held.load(Ordering::Acquire),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// The lengths a gRPC request body declares, read from its messages'
/// 5-byte prefixes (a flag byte, then the length, big-endian) as the body's
/// pieces arrive, split anywhere.
#[derive(Debug, Default)]
pub struct MessagePrefixes {
    /// Bytes of the current prefix so far.
    prefix: [u8; 5],
    have: usize,
    /// Bytes of the current message still to come.
    rest: u64,
}

impl MessagePrefixes {
    /// Takes the next piece of the body; returns the whole length (prefix
    /// included) of each message whose prefix completed in it.
    pub fn push(&mut self, mut data: &[u8], mut found: impl FnMut(u64)) {
        while !data.is_empty() {
            if self.rest > 0 {
                let n = self.rest.min(data.len() as u64);
                self.rest -= n;
                data = &data[n as usize..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == 5 {
                self.have = 0;
                let len = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]);
                self.rest = u64::from(len);
                found(5 + u64::from(len));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_back_when_dropped() {
        let budget = RequestBudget::new(400 << 10);
        let a = budget.take(100 << 10).unwrap();
        let b = budget.take(100 << 10).unwrap();
        assert_eq!(budget.held(), (200 << 10, 0));
        drop(a);
        assert_eq!(budget.held(), (100 << 10, 0));
        drop(b);
        assert_eq!(budget.held(), (0, 0));
    }

    #[test]
    fn large_requests_leave_the_last_quarter_to_small_ones() {
        let budget = RequestBudget::new(400 << 10);
        let large = SMALL_REQUEST_BYTES + 1;
        let held: Vec<_> = (0..4).map(|_| budget.take(large).unwrap()).collect();
        // 4 × 64 KiB + 4 of 300 KiB taken; a fifth large one does not fit.
        assert_eq!(budget.take(large).unwrap_err(), NoRoom { bytes: large });
        // Small ones still do, up to the whole budget.
        let small: Vec<_> = (0..2).map(|_| budget.take(64 << 10).unwrap()).collect();
        assert_eq!(
            budget.take(16 << 10).unwrap_err(),
            NoRoom { bytes: 16 << 10 }
        );
        assert_eq!(budget.held(), (4 * large + (128 << 10), 2));
        drop(small);
        drop(held);
        assert_eq!(budget.held(), (0, 2));
        // Nothing larger than the budget's parts, ever; no overflow.
        assert!(budget.take(u64::MAX).is_err());
        assert_eq!(RequestBudget::large_part(400), 300);
        assert_eq!(RequestBudget::large_part(0), 0);
    }

    #[test]
    fn message_prefixes_are_found_however_the_body_is_split() {
        let mut body = Vec::new();
        for len in [0u32, 3, 300] {
            body.push(0);
            body.extend_from_slice(&len.to_be_bytes());
            body.extend(std::iter::repeat_n(7u8, len as usize));
        }
        for step in 1..=body.len() {
            let mut prefixes = MessagePrefixes::default();
            let mut found = Vec::new();
            for piece in body.chunks(step) {
                prefixes.push(piece, |n| found.push(n));
            }
            assert_eq!(found, [5, 8, 305], "pieces of {step}");
        }
    }
}
