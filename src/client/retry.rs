//! Backoff between retries: exponential growth with full jitter.
//!
//! Pure arithmetic over a seeded random source: no clock, no sleeping, no
//! network, so its bounds are testable. Whether to retry, and the sleeping,
//! belong to [`super::call`].

use std::time::Duration;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Limits of the exponential backoff.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BackoffPolicy {
    /// Ceiling of the delay before the first retry; it doubles per retry.
    pub base: Duration,
    /// The ceiling never grows past this.
    pub max: Duration,
}

impl BackoffPolicy {
    /// Ceiling of the delay before retry number `retry` (0 for the first):
    /// `base · 2^retry`, capped at `max`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }
}

/// Full jitter: a delay spread uniformly over `0..=ceiling`, drawn from the
/// random word `random`. Spreading over the whole range (not around the
/// ceiling) keeps clients that failed together from retrying together.
pub(crate) fn full_jitter(ceiling: Duration, random: u64) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    match nanos.checked_add(1) {
        Some(span) => Duration::from_nanos(random % span),
        None => Duration::from_nanos(random),
    }
}

/// The delays of one operation's retries.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// Limits of the delays.
    policy: BackoffPolicy,
    /// Retries so far since the last reset; sets the ceiling.
    retries: u32,
    /// Source of the jitter.
    rng: ChaCha8Rng,
}

impl Backoff {
    /// A backoff seeded from the operating system, for real use.
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff::seeded(policy, ChaCha8Rng::from_os_rng().next_u64())
    }

    /// A backoff with a fixed seed, for tests.
    pub fn seeded(policy: BackoffPolicy, seed: u64) -> Backoff {
        Backoff {
            policy,
            retries: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The delay before the next retry; each call raises the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.policy.ceiling(self.retries);
        self.retries = self.retries.saturating_add(1);
        full_jitter(ceiling, self.rng.next_u64())
    }

    /// Starts over from the base ceiling (after progress was made).
    pub fn reset(&mut self) {
        self.retries = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BackoffPolicy = BackoffPolicy {
        base: Duration::from_millis(20),
        max: Duration::from_secs(1),
    };

    #[test]
    fn ceiling_doubles_from_base_and_stops_at_max() {
        let ceilings: Vec<u64> = (0..8)
            .map(|r| POLICY.ceiling(r).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [20, 40, 80, 160, 320, 640, 1000, 1000]);
    }

    #[test]
    fn ceiling_never_overflows() {
        for retry in [31, 32, 63, 64, 1000, u32::MAX] {
            assert_eq!(POLICY.ceiling(retry), POLICY.max, "retry {retry}");
        }
        let huge = BackoffPolicy {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(huge.ceiling(5), Duration::MAX);
    }

    #[test]
    fn jitter_stays_within_zero_and_the_ceiling() {
        let ceiling = Duration::from_millis(20);
        assert_eq!(full_jitter(ceiling, 0), Duration::ZERO);
        assert_eq!(full_jitter(ceiling, 20_000_000), ceiling);
        assert_eq!(full_jitter(ceiling, 20_000_001), Duration::ZERO);
        assert!(full_jitter(ceiling, u64::MAX) <= ceiling);
        assert_eq!(full_jitter(Duration::ZERO, 12345), Duration::ZERO);
        assert!(full_jitter(Duration::MAX, u64::MAX) <= Duration::MAX);
    }

    #[test]
    fn delays_are_bounded_by_their_ceilings_and_spread_out() {
        let mut backoff = Backoff::seeded(POLICY, 7);
        let mut delays = Vec::new();
        for retry in 0..12 {
            let delay = backoff.next_delay();
            assert!(delay <= POLICY.ceiling(retry), "retry {retry}: {delay:?}");
            delays.push(delay);
        }
        delays.sort();
        delays.dedup();
        assert!(
            delays.len() > 6,
            "jitter should not repeat itself: {delays:?}"
        );
    }

    #[test]
    fn jitter_is_roughly_uniform_over_the_range() {
        let mut backoff = Backoff::seeded(POLICY, 1);
        let (mut low, mut high) = (0, 0);
        for _ in 0..2000 {
            backoff.reset();
            let delay = backoff.next_delay();
            if delay < Duration::from_millis(10) {
                low += 1;
            } else {
                high += 1;
            }
        }
        assert!((800..1200).contains(&low), "low {low} high {high}");
    }

    #[test]
    fn reset_brings_the_ceiling_back_to_base() {
        let mut backoff = Backoff::seeded(POLICY, 3);
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(backoff.next_delay() <= POLICY.base);
    }

    #[test]
    fn different_seeds_give_different_delays() {
        let a: Vec<_> = {
            let mut b = Backoff::seeded(POLICY, 1);
            (0..5).map(|_| b.next_delay()).collect()
        };
        let b: Vec<_> = {
            let mut b = Backoff::seeded(POLICY, 2);
            (0..5).map(|_| b.next_delay()).collect()
        };
        assert_ne!(a, b);
    }
}
