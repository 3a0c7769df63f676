//! The client's clock for leases: tokio's monotonic clock, which stands
//! still while the machine is suspended, paired with how long the machine
//! had been suspended at that instant. A lease runs on at the server
//! through a suspend; a [`Stamp`] taken before it knows, after it, that its
//! deadline came earlier by the time slept.

use std::time::Duration;

use tokio::time::Instant;

/// An instant of tokio's clock, with the machine's suspended time then.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Stamp {
    at: Instant,
    suspended: Duration,
}

impl Stamp {
    /// Now.
    pub fn now() -> Stamp {
        let suspended = suspended();
        Stamp {
            at: Instant::now(),
            suspended,
        }
    }

    /// `at`, taken as if the machine's suspended time then were its time
    /// now (an instant of the present, or of the past when nothing was
    /// suspended since).
    #[cfg(test)]
    pub fn at(at: Instant) -> Stamp {
        Stamp {
            at,
            suspended: suspended(),
        }
    }

    /// `by` later on tokio's clock, from the same suspended time.
    pub fn plus(self, by: Duration) -> Stamp {
        Stamp {
            at: self.at + by,
            suspended: self.suspended,
        }
    }

    /// The instant, moved earlier by the machine's suspends since it was
    /// stamped: the instant tokio's clock shows when that much real time
    /// has passed.
    pub fn effective(self) -> Instant {
        self.effective_with(suspended())
    }

    /// [`Stamp::effective`] with `suspended_now` as the suspended time.
    /// Less than [`SUSPEND_NOISE`] counts as none.
    fn effective_with(self, suspended_now: Duration) -> Instant {
        let slept = suspended_now.saturating_sub(self.suspended);
        if slept < SUSPEND_NOISE {
            return self.at;
        }
        // Earlier than the clock's origin: long past.
        self.at.checked_sub(slept).unwrap_or_else(Instant::now)
    }
}

/// Differences in [`suspended`] below this are not a suspend: reading two
/// clocks in turn is accurate to [`READ_SPREAD`].
const SUSPEND_NOISE: Duration = Duration::from_millis(1);

/// The longest a reading of [`suspended`] may take: one that took longer
/// (the thread was preempted between its clock readings) is taken again.
const READ_SPREAD: Duration = Duration::from_micros(50);

/// How long the machine has been suspended since it booted: Linux's
/// `CLOCK_BOOTTIME` counts suspended time and `CLOCK_MONOTONIC` (tokio's and
/// std's `Instant`) does not. Read between two monotonic readings no more
/// than [`READ_SPREAD`] apart (a few tries, then the last), so it is off by
/// no more than that. Zero where there is no such clock.
#[cfg(target_os = "linux")]
pub(crate) fn suspended() -> Duration {
    fn read(clock: libc::clockid_t) -> Option<Duration> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to write.
        if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(now.tv_sec).ok()?,
            u32::try_from(now.tv_nsec).ok()?,
        ))
    }
    let mut last = Duration::ZERO;
    for _ in 0..4 {
        let (Some(before), Some(boot), Some(after)) = (
            read(libc::CLOCK_MONOTONIC),
            read(libc::CLOCK_BOOTTIME),
            read(libc::CLOCK_MONOTONIC),
        ) else {
            return Duration::ZERO;
        };
        last = boot.saturating_sub(after);
        if after.saturating_sub(before) <= READ_SPREAD {
            break;
        }
    }
    last
}

/// See the Linux version: elsewhere suspends are not counted.
#[cfg(not(target_os = "linux"))]
pub(crate) fn suspended() -> Duration {
    Duration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stamp's instant moves earlier by the time the machine spent
    /// suspended since it was stamped (tokio's clock stood still
    /// meanwhile), and not by the noise of reading two clocks.
    #[test]
    fn a_suspend_brings_a_stamp_forward() {
        let at = Instant::now() + Duration::from_secs(30);
        let stamp = Stamp {
            at,
            suspended: Duration::from_secs(100),
        };
        assert_eq!(stamp.effective_with(Duration::from_secs(100)), at);
        assert_eq!(
            stamp.effective_with(Duration::from_secs(100) + SUSPEND_NOISE / 2),
            at
        );
        assert_eq!(
            stamp.effective_with(Duration::from_secs(112)),
            at - Duration::from_secs(12)
        );
        // Later on the clock, from the same suspended time.
        assert_eq!(
            stamp
                .plus(Duration::from_secs(5))
                .effective_with(Duration::from_secs(112)),
            at - Duration::from_secs(7)
        );
        // A clock that went back (it cannot) moves nothing.
        assert_eq!(stamp.effective_with(Duration::from_secs(90)), at);
        // A suspend longer than the clock has run: long past.
        assert!(stamp.effective_with(Duration::MAX) <= Instant::now());
    }

    /// Read twice in a row, the suspended time is the same but for the
    /// spread of a reading.
    #[test]
    fn the_suspended_time_is_steady_while_awake() {
        let first = suspended();
        let second = suspended();
        assert!(
            second.abs_diff(first) < SUSPEND_NOISE,
            "{first:?} {second:?}"
        );
    }
}
