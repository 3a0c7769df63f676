//! Our own time types: the core never reads a clock, it is told the time.
//!
//! `Time` is a point on a monotonic millisecond axis whose origin the driver
//! chooses (server start, simulation start). `Millis` is a span on that axis.
//! Neither is tied to `std::time`, so the core stays pure and a simulation can
//! jump time forward at will.

use serde::{Deserialize, Serialize};

/// A point in time, in milliseconds since an origin chosen by the driver.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(u64);

/// A span of time in milliseconds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Millis(pub u64);

impl Time {
    /// The origin.
    pub const ZERO: Time = Time(0);

    /// The point `ms` milliseconds after the origin.
    pub const fn from_millis(ms: u64) -> Time {
        Time(ms)
    }

    /// Milliseconds since the origin.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + span`, saturating at the end of time.
    pub const fn plus(self, span: Millis) -> Time {
        Time(self.0.saturating_add(span.0))
    }

    /// How long from `self` until `later` (zero if `later` is not later).
    pub const fn until(self, later: Time) -> Millis {
        Millis(later.0.saturating_sub(self.0))
    }
}

impl Millis {
    /// `n` seconds.
    pub const fn from_secs(n: u64) -> Millis {
        Millis(n.saturating_mul(1000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Time::from_millis(u64::MAX - 1);
        assert_eq!(t.plus(Millis(10)).as_millis(), u64::MAX);
        assert_eq!(Time::from_millis(5).until(Time::from_millis(3)), Millis(0));
        assert_eq!(Time::from_millis(3).until(Time::from_millis(5)), Millis(2));
    }
}
