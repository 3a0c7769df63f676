//! The core's deadlines: lease ends, wait timeouts, and how long a cut-off
//! waiter's place is kept.
//!
//! Owns: an ordered set of (deadline, what) so that the earliest deadline is
//! known in O(log n). Must not: act on a deadline; the core checks that a fired
//! timer is still current before it acts.

use std::collections::BTreeSet;

use super::dedup::WaiterId;
use super::time::Time;
use super::types::LockName;

/// What a deadline is for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Timer {
    /// The lease of `lock`'s current grant runs out.
    Lease(LockName),
    /// The waiter's own wait timeout passes.
    Wait(WaiterId),
    /// The place kept for a cut-off waiter is given up.
    Detached(WaiterId),
}

/// The set of pending deadlines.
#[derive(Debug, Default)]
pub struct Timers {
    pending: BTreeSet<(Time, Timer)>,
}

impl Timers {
    /// Arms `timer` at `at`.
    pub fn arm(&mut self, at: Time, timer: Timer) {
        self.pending.insert((at, timer));
    }

    /// Disarms `timer` at `at` (no-op if not armed).
    pub fn disarm(&mut self, at: Time, timer: &Timer) {
        self.pending.remove(&(at, timer.clone()));
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Time> {
        self.pending.first().map(|(at, _)| *at)
    }

    /// Takes the earliest timer due at or before `now`.
    pub fn pop_due(&mut self, now: Time) -> Option<(Time, Timer)> {
        match self.pending.first() {
            Some((at, _)) if *at <= now => self.pending.pop_first(),
            _ => None,
        }
    }
}
