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

    /// Disarms `timer` at `at` (no-op if not armed). Takes the timer by
    /// value: the set's key is the pair, and a lock name is shared, so the
    /// caller's copy costs a reference count.
    pub fn disarm(&mut self, at: Time, timer: Timer) {
        self.pending.remove(&(at, timer));
    }

    /// Moves `timer` from `old` to `new` (arms it at `new` if it was not
    /// armed at `old`).
    pub fn rearm(&mut self, old: Time, new: Time, timer: Timer) {
        let key = (old, timer);
        self.pending.remove(&key);
        self.pending.insert((new, key.1));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rearmed_timer_fires_at_its_new_time_only() {
        let mut timers = Timers::default();
        let lease = || Timer::Lease("a".into());
        timers.arm(Time::from_millis(5), lease());
        timers.arm(Time::from_millis(7), Timer::Wait(1));
        timers.rearm(Time::from_millis(5), Time::from_millis(9), lease());
        // Not armed at the old time: armed at the new one all the same.
        timers.rearm(Time::from_millis(1), Time::from_millis(8), Timer::Wait(2));
        timers.disarm(Time::from_millis(7), Timer::Wait(1));
        timers.arm(Time::from_millis(3), Timer::Lease("b".into()));
        timers.disarm(Time::from_millis(3), Timer::Lease("b".into()));
        // Not armed: nothing happens.
        timers.disarm(Time::from_millis(4), Timer::Lease("c".into()));
        let mut fired = Vec::new();
        while let Some(due) = timers.pop_due(Time::from_millis(100)) {
            fired.push(due);
        }
        assert_eq!(
            fired,
            [
                (Time::from_millis(8), Timer::Wait(2)),
                (Time::from_millis(9), lease()),
            ]
        );
    }
}
