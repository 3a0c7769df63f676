//! The simulation's only source of randomness: one seeded generator per run.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded random number generator with the few draws the simulation needs.
pub struct SimRng(ChaCha8Rng);

impl SimRng {
    /// The generator of `seed`.
    pub fn new(seed: u64) -> SimRng {
        SimRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A uniform `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// The answers a scenario's dedup table keeps: tiny (1–64) in half the
    /// seeds, so that late retries find their answers forgotten (and must be
    /// refused as expired, never applied twice); the default otherwise.
    pub fn dedup_capacity(&mut self) -> usize {
        if self.chance(0.5) {
            self.between(1, 64) as usize
        } else {
            100_000
        }
    }

    /// Uniform in `[0, max)` as a float.
    pub fn fraction(&mut self, max: f64) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * max
    }

    /// 32 random bytes (a seed for the core's tokens).
    pub fn seed32(&mut self) -> [u8; 32] {
        let mut seed = [0u8; 32];
        self.0.fill_bytes(&mut seed);
        seed
    }
}

/// The cut-off waiters' places a scenario's server keeps: as few as 0-3 in
/// the seeds with a tiny dedup table (derived, not drawn, so that every
/// seed's scenario stays as it was), so that retries that find their place
/// gone queue again at the back; the default otherwise.
pub fn max_detached_waiters(dedup_capacity: usize) -> usize {
    if dedup_capacity <= 64 {
        dedup_capacity % 4
    } else {
        dlm::server::ServerConfig::new("sim").max_detached_waiters
    }
}
