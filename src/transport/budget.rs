//! The request budget (`--max-inflight-request-bytes`): bytes of requests
//! the server holds while they arrive, over both transports at once.
//!
//! Owns: the count of those bytes. A request's share grows with each piece
//! of it that arrives (QUIC: the frame's chunks; gRPC: the body's data
//! frames) and is given back once the request has ended and been decoded,
//! before the call is carried out. A request whose next piece finds no room
//! is refused at once (`RESOURCE_EXHAUSTED`, which clients retry with
//! backoff) rather than made to wait: a waiting stream's unread bytes would
//! take room in its connection's flow-control window, which the requests
//! already holding shares on that connection may need to finish. Must not:
//! wait, or hold a lock; it is an atomic operation per piece.
//!
//! What counts is what arrived, not what a request's prefix declares: a
//! declared length costs the server nothing until its bytes come (tonic's
//! buffer for a declared message is address space until written), and
//! counting it would let a peer that sends a few 5-byte prefixes fill the
//! budget. To hold the budget, a peer must send it, and the request time
//! limits (a pause of 30 s, a minimum rate) bound how long.
//!
//! Without it, each connection could hold up to its 256 streams times the
//! largest request (4 MiB by default over gRPC, and 64 MiB at most), on
//! each of thousands of connections: a few clients uploading large appends
//! slowly could exhaust the server's memory.

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

impl RequestShare {
    /// Counts `more` bytes of the request, arrived.
    ///
    /// # Errors
    /// [`NoRoom`] when they would take the budget past its total, or past
    /// three quarters of it once the request is larger than
    /// [`SMALL_REQUEST_BYTES`]; the share keeps what it had.
    pub fn grow(&mut self, more: u64) -> Result<(), NoRoom> {
        let after = self.bytes.saturating_add(more);
        let most = if after > SMALL_REQUEST_BYTES {
            self.budget.large
        } else {
            self.budget.total
        };
        self.budget.add(more, most)?;
        self.bytes = after;
        Ok(())
    }

    /// The bytes counted.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for RequestShare {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
        }
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
             (--max-inflight-request-bytes); retry later (no room for {} more bytes)",
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

    /// An empty share for a request that starts arriving.
    pub fn share(self: &Arc<Self>) -> RequestShare {
        RequestShare {
            budget: self.clone(),
            bytes: 0,
        }
    }

    /// Adds `more` to `held` unless that passes `most`.
    fn add(&self, more: u64, most: u64) -> Result<(), NoRoom> {
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            let Some(next) = held.checked_add(more).filter(|&next| next <= most) else {
                self.note_refusal();
                return Err(NoRoom { bytes: more });
            };
            match self
                .held
                .compare_exchange_weak(held, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_grow_as_bytes_arrive_and_come_back_when_dropped() {
        let budget = RequestBudget::new(400 << 10);
        let mut a = budget.share();
        let mut b = budget.share();
        a.grow(100 << 10).unwrap();
        b.grow(60 << 10).unwrap();
        b.grow(40 << 10).unwrap();
        assert_eq!((a.bytes(), b.bytes()), (100 << 10, 100 << 10));
        assert_eq!(budget.held(), (200 << 10, 0));
        drop(a);
        assert_eq!(budget.held(), (100 << 10, 0));
        drop(b);
        assert_eq!(budget.held(), (0, 0));
        // An empty share gives nothing back.
        drop(budget.share());
        assert_eq!(budget.held(), (0, 0));
    }

    #[test]
    fn large_requests_leave_the_last_quarter_to_small_ones() {
        let budget = RequestBudget::new(400 << 10);
        // Three large requests of 100 KiB fill the 300 KiB they may.
        let mut large: Vec<_> = (0..3).map(|_| budget.share()).collect();
        for share in &mut large {
            share.grow(SMALL_REQUEST_BYTES).unwrap();
            share.grow((100 << 10) - SMALL_REQUEST_BYTES).unwrap();
        }
        // A fourth grows while small, and is refused once it is large.
        let mut fourth = budget.share();
        fourth.grow(SMALL_REQUEST_BYTES).unwrap();
        assert_eq!(fourth.grow(1).unwrap_err(), NoRoom { bytes: 1 });
        assert_eq!(fourth.bytes(), SMALL_REQUEST_BYTES, "keeps what it had");
        // Small ones still fit, up to the whole budget.
        let mut small = budget.share();
        small.grow((100 << 10) - SMALL_REQUEST_BYTES).unwrap();
        assert_eq!(budget.held(), (400 << 10, 1));
        assert!(budget.share().grow(1).is_err());
        drop((large, fourth, small));
        assert_eq!(budget.held(), (0, 2));
        // Nothing larger than the budget's parts, ever; no overflow.
        assert!(budget.share().grow(u64::MAX).is_err());
        assert_eq!(RequestBudget::large_part(400), 300);
        assert_eq!(RequestBudget::large_part(0), 0);
    }
}
