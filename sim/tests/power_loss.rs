//! The log under a power failure at every storage change in turn.
//!
//! A fixed sequence of log operations — a new directory, records synced one
//! by one, two snapshots each written while records go on in the next
//! generation — runs on a [`SimDisk`] whose power fails after the first
//! `k` changes (writes, size changes, syncs, directory changes), for every
//! `k` the sequence makes. The crash then keeps random prefixes of what was
//! not synced: of each file's bytes (torn writes) and of each directory's
//! creates, renames and removes. Recovery must start, and give back every
//! record whose sync returned before the power failed, once: either folded
//! into the snapshot or replayed after it. Two more cases kill the process
//! first (its unsynced writes stay in the page cache): the power fails
//! during the next recovery, or after it, when the records that recovery
//! replayed count as acknowledged too (the server answers from them).

use dlm::core::records::{Change, Record, Snapshot};
use dlm::core::types::Fence;
use dlm::log::{LogError, Wal};
use dlm_sim::disk::SimDisk;
use dlm_sim::rng::SimRng;

/// Zeros kept ahead: small, so that the sequence also grows the segments.
const PREALLOC: u64 = 8192;

fn record(n: u64) -> Record {
    Record {
        changes: vec![Change::Ended {
            lock: format!("lock-{n}").into(),
            fence: Fence(n),
        }],
    }
}

/// A snapshot that folds in records `1..=n`.
fn folding(n: u64) -> Snapshot {
    Snapshot {
        last_fence: Fence(n),
        ..Snapshot::default()
    }
}

/// Runs the sequence until it ends or a step fails; `acked` gets every
/// record whose sync returned before the power failed.
fn sequence(disk: &SimDisk, acked: &mut Vec<u64>) -> Result<(), LogError> {
    let mut r = Wal::recover_with(Box::new(disk.dir("state")), PREALLOC, Snapshot::default)?;
    let mut appended = 0;
    let mut log = |wal: &mut Wal, acked: &mut Vec<u64>, count: u64| -> Result<(), LogError> {
        for _ in 0..count {
            appended += 1;
            let mut record = record(appended);
            // Over a block per record: the segments grow past their zeros
            // (a block plus `PREALLOC` at first) within three records.
            if let Change::Ended { lock, .. } = &mut record.changes[0] {
                *lock = format!("{lock}{}", "x".repeat(5000)).into();
            }
            wal.append(&record);
            wal.sync()?;
            if !disk.power_failed() {
                acked.push(appended);
            }
        }
        Ok(())
    };
    log(&mut r.wal, acked, 3)?;
    for _ in 0..2 {
        // The state after every record so far, as the server's snapshots.
        let folded = acked.last().copied().unwrap_or(0);
        let write = r.wal.begin_snapshot(folding(folded))?;
        log(&mut r.wal, acked, 2)?;
        let premade = write.run()?;
        r.wal.adopt(premade);
        log(&mut r.wal, acked, 1)?;
    }
    Ok(())
}

/// The test records' numbers, in order.
fn numbers(records: &[Record]) -> Vec<u64> {
    records
        .iter()
        .map(|r| match &r.changes[0] {
            Change::Ended { fence, .. } => fence.0,
            other => panic!("not a test record: {other:?}"),
        })
        .collect()
}

/// A disk whose process ran the sequence and was killed after `at`
/// changes (what it wrote stays, synced or not), with the records
/// acknowledged before the kill.
fn killed_after(at: u64) -> (SimDisk, Vec<u64>) {
    let disk = SimDisk::default();
    disk.power_fails_at(at);
    let mut acked = Vec::new();
    let _ = sequence(&disk, &mut acked);
    disk.process_killed();
    (disk, acked)
}

/// Recovers `disk` and checks that every record of `acked` is there once,
/// folded into the snapshot or replayed after it; `what` names the case.
fn check(disk: &SimDisk, acked: &[u64], what: &str) {
    let recovered = Wal::recover_with(Box::new(disk.dir("state")), PREALLOC, Snapshot::default)
        .unwrap_or_else(|e| panic!("{what}: recovery refused: {e}"));
    let folded = recovered.snapshot.last_fence.0;
    let replayed = numbers(&recovered.records);
    assert!(
        replayed.windows(2).all(|w| w[0] < w[1]) && replayed.iter().all(|f| *f > folded),
        "{what}: folded {folded}, replayed {replayed:?}: a record twice"
    );
    for n in acked {
        assert!(
            *n <= folded || replayed.contains(n),
            "{what}: record {n} was acknowledged and is lost (folded {folded}, replayed {replayed:?})"
        );
    }
}

/// How many changes the whole sequence makes.
fn whole_sequence() -> u64 {
    let whole = SimDisk::default();
    let mut all = Vec::new();
    sequence(&whole, &mut all).expect("the sequence runs without a failure");
    assert_eq!(all, (1..=9).collect::<Vec<_>>());
    whole.changes()
}

#[test]
fn every_synced_record_survives_a_power_failure_at_any_storage_change() {
    let changes = whole_sequence();
    assert!(changes > 30, "{changes} changes");
    let mut rng = SimRng::new(7);
    let mut lost_names = 0;
    let mut checked_records = 0;
    for at in 0..=changes {
        for _ in 0..8 {
            let disk = SimDisk::default();
            disk.power_fails_at(at);
            let mut acked = Vec::new();
            if sequence(&disk, &mut acked).is_err() {
                // Only the dead machine's steps may fail.
                assert!(disk.power_failed(), "a step failed before the power did");
            }
            let loss = disk.crash(&mut rng, 0.5);
            lost_names += loss.names_lost;
            checked_records += acked.len();
            check(&disk, &acked, &format!("power failed after {at} changes"));
        }
    }
    assert!(
        lost_names > 0,
        "no crash fell between a directory change and its sync"
    );
    assert!(
        checked_records > 8 * changes as usize,
        "{checked_records} records checked"
    );
}

#[test]
fn a_power_failure_during_the_recovery_after_a_kill_loses_nothing() {
    // The process is killed after `at` changes (what it wrote stays, synced
    // or not); the next start's recovery then loses power after `again`
    // of its own changes; the start after that must have every record
    // acknowledged before the kill. This reaches a recovery that tidies
    // up after an interrupted snapshot (removing the older generation).
    let changes = whole_sequence();
    let mut rng = SimRng::new(11);
    let mut lost_names = 0;
    for at in 0..=changes {
        // What was acknowledged before the kill, and how many changes the
        // first recovery after it makes.
        let (probe, acked) = killed_after(at);
        let before = probe.changes();
        let _ = Wal::recover_with(Box::new(probe.dir("state")), PREALLOC, Snapshot::default);
        let recovery_changes = probe.changes() - before;
        for again in 0..=recovery_changes {
            for _ in 0..4 {
                let (disk, _) = killed_after(at);
                disk.power_fails_at(disk.changes() + again);
                let _ = Wal::recover_with(Box::new(disk.dir("state")), PREALLOC, Snapshot::default);
                let loss = disk.crash(&mut rng, 0.5);
                lost_names += loss.names_lost;
                check(
                    &disk,
                    &acked,
                    &format!(
                        "killed after {at} changes, power failed {again} changes into recovery"
                    ),
                );
            }
        }
    }
    assert!(
        lost_names > 0,
        "no crash fell between a directory change and its sync"
    );
}

#[test]
fn what_a_recovery_after_a_kill_hands_on_survives_a_later_power_failure() {
    // A killed process leaves records it wrote but never synced; the page
    // cache keeps them, so the next start reads and replays them, and its
    // server answers from them (a retry of the call that wrote one is
    // answered from the replayed dedup entry, with no new log write). They
    // are acknowledged from then on: a power failure after the recovery
    // must not lose them.
    let changes = whole_sequence();
    let mut rng = SimRng::new(13);
    let mut unsynced_replayed = 0;
    for at in 0..=changes {
        for _ in 0..8 {
            let (disk, acked) = killed_after(at);
            let recovered =
                Wal::recover_with(Box::new(disk.dir("state")), PREALLOC, Snapshot::default)
                    .unwrap_or_else(|e| panic!("killed after {at} changes: recovery refused: {e}"));
            let mut served = numbers(&recovered.records);
            unsynced_replayed += served.iter().filter(|n| !acked.contains(n)).count();
            served.extend(&acked);
            drop(recovered);
            // No torn writes: every byte not synced is lost, so a record that
            // recovery replayed without making it durable is surely gone.
            disk.crash(&mut rng, 0.0);
            check(
                &disk,
                &served,
                &format!("killed after {at} changes, recovered, then the power failed"),
            );
        }
    }
    assert!(
        unsynced_replayed > 0,
        "no kill fell between a record's write and its sync"
    );
}

#[test]
fn data_file_names_a_killed_first_start_left_unsynced_are_made_durable_by_the_next_start() {
    // The first start created the data files and was killed before syncing
    // the directory; the second start finds every name and goes on; a power
    // failure after it must not take names (and the appends in the files)
    // away.
    use dlm::core::staging::FileIndex;
    use dlm::files::DataFiles;
    use dlm::storage::Dir;
    let mut rng = SimRng::new(17);
    for _ in 0..16 {
        let disk = SimDisk::default();
        let dir = disk.dir("data");
        for file in FileIndex::all() {
            dir.open(&file.name(), true).expect("create");
        }
        disk.process_killed();
        let files = DataFiles::open(Box::new(disk.dir("data"))).expect("second start");
        drop(files);
        disk.crash(&mut rng, 0.0);
        let names = disk.dir("data").list().expect("list");
        assert_eq!(names.len(), 100, "names lost: {names:?}");
    }
}

#[test]
fn a_power_failure_during_the_recovery_after_a_torn_write_loses_nothing() {
    // The power fails after `at` changes and tears what was not synced;
    // the next start's recovery (which zeroes a torn tail, a write of many
    // blocks of its own) loses power after `again` of its changes and tears
    // those too; the start after that must work and have every record
    // acknowledged before the first failure.
    let changes = whole_sequence();
    let mut rng = SimRng::new(19);
    let mut torn_tails = 0;
    // The disk after the first failure, torn as `seed` draws it.
    let torn_after = |at: u64, seed: u64| {
        let disk = SimDisk::default();
        disk.power_fails_at(at);
        let mut acked = Vec::new();
        let _ = sequence(&disk, &mut acked);
        disk.crash(&mut SimRng::new(seed), 1.0);
        (disk, acked)
    };
    for at in 0..=changes {
        for _ in 0..4 {
            let seed = rng.next_u64();
            let (probe, acked) = torn_after(at, seed);
            let before = probe.changes();
            let first =
                Wal::recover_with(Box::new(probe.dir("state")), PREALLOC, Snapshot::default);
            let recovery_changes = probe.changes() - before;
            if first.is_ok_and(|r| r.torn_bytes > 0) {
                torn_tails += 1;
            }
            for again in 0..=recovery_changes {
                let (disk, _) = torn_after(at, seed);
                disk.power_fails_at(disk.changes() + again);
                let _ = Wal::recover_with(Box::new(disk.dir("state")), PREALLOC, Snapshot::default);
                disk.crash(&mut rng, 1.0);
                check(
                    &disk,
                    &acked,
                    &format!(
                        "power failed after {at} changes, and again {again} changes into recovery"
                    ),
                );
            }
        }
    }
    assert!(torn_tails > 0, "no first failure left a torn tail");
}
