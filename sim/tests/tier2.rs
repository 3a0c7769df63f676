//! Tier-2 simulation in CI (the real server, log, gRPC and client on
//! turmoil): a fixed range of seeds, the regression seeds, same-seed
//! determinism, and every planted bug caught.
//!
//! A seed takes about 1.4 s in the debug profile; the fixed range is sized so
//! that this file runs in about a minute on 2 cores. `DLM_SIM_TIER2_SEEDS`
//! widens it.

use dlm_sim::{tier2, Plant};

/// Seeds that once failed (and the fix they proved).
const REGRESSIONS: &[u64] = &[
    // A power cut aimed at a log fsync struck the fsync that recovery makes
    // after cutting a torn tail; the simulation reported the interrupted
    // recovery as a recovery failure instead of as a crash during recovery.
    48, 151, 158, 199,
    // The end-of-run check that every lease ran out after the clients
    // stopped waited 3 s; a cut-off waiter whose kept place is granted just
    // before it lapses legitimately holds the lock until 3.4 s.
    1043, 1114, 2205, 2443, 2948, 3932, 4154, 4992,
    // The engine stepped the core from a dropped call's destructor: when a
    // bounce tore the old server's tasks down, a call dropped after its
    // holder's lease had run out granted the lock to the next waiter from a
    // node that was already gone (seen by the checker as a FIFO violation).
    // Dropped calls are now only noted, and applied by the next step or the
    // background writer.
    1460, 1808,
    // An acquire whose reply was lost collected the remembered grant after
    // its lease had run out and the lock had gone on: the client library
    // handed out a grant with an older fence than one already handed out.
    // The library now renews a late grant before handing it out.
    3, 5, 6,
];

fn assert_clean(seed: u64) {
    let result = tier2::run_seed(seed, None, false);
    assert!(
        result.violations.is_empty(),
        "seed {seed}: {:?}\nreplay: cargo run --release -p dlm-sim -- --tier 2 --seed {seed} --trace",
        result.violations
    );
}

#[test]
fn a_fixed_range_of_seeds_is_clean() {
    let seeds: u64 = std::env::var("DLM_SIM_TIER2_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    // Two threads, each seed its own simulation.
    std::thread::scope(|scope| {
        for lane in 0..2 {
            scope.spawn(move || {
                for seed in (20_000 + lane..20_000 + seeds).step_by(2) {
                    assert_clean(seed);
                }
            });
        }
    });
}

#[test]
fn regression_seeds_are_clean() {
    for &seed in REGRESSIONS {
        assert_clean(seed);
    }
}

#[test]
fn the_same_seed_twice_gives_the_same_trace() {
    // Several runs in one process: nothing may leak from one run into the
    // next (tokio's task ids, for one, are process-wide).
    for seed in [1, 6] {
        let a = tier2::run_seed(seed, None, true);
        let b = tier2::run_seed(seed, None, true);
        assert_eq!(a.hash, b.hash, "seed {seed}");
        assert_eq!(a.trace, b.trace, "seed {seed}");
        assert!(
            a.trace.len() > 500,
            "a trace worth comparing: {} lines",
            a.trace.len()
        );
        assert_eq!(a.faults, b.faults);
    }
    assert_ne!(
        tier2::run_seed(2, None, false).hash,
        tier2::run_seed(3, None, false).hash
    );
}

#[test]
fn every_planted_bug_is_caught_within_a_few_hundred_seeds() {
    // floors-off is tier 1's to catch (4 of its first 300 seeds): here a
    // retry reaches the server after its answer was forgotten in only 2 of
    // 1,000 seeds (`dlm-sim --tier 2 --seeds 1000 --from 200 --plant
    // floors-off`), too rare for this test.
    let plants = Plant::ALL
        .into_iter()
        .filter(|(_, p)| *p != Plant::FloorsOff);
    for (name, plant) in plants {
        let caught = (0..200).find(|&seed| {
            !tier2::run_seed(seed, Some(plant), false)
                .violations
                .is_empty()
        });
        assert!(caught.is_some(), "plant {name} was not caught in 200 seeds");
    }
}
