//! dlm-sim — deterministic simulation of dlm, reproducible from a seed.
//!
//! # Layout
//!
//! - [`rng`]: the one seeded random source of a run.
//! - [`disk`]: a simulated disk behind dlm's storage seam (unsynced bytes are
//!   lost or torn on a crash).
//! - [`history`]: what clients and the server did, and the invariants
//!   checked on it (mutual exclusion, fencing, atomic critical sections, no
//!   duplicates, FIFO; liveness is checked by the driver).
//! - [`tier1`]: the real core, log and file code driven by a seeded
//!   message-level network with drops, duplicates, reordering, partitions,
//!   client pauses and crashes, and server crashes at any instant.

pub mod disk;
pub mod history;
pub mod rng;
pub mod tier1;

/// A bug planted on purpose, to show that the checker catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plant {
    /// The server forgets request ids: retries and duplicates apply twice.
    DedupOff,
    /// The server replies before the fsync that makes the answer durable.
    ReplyBeforeFsync,
    /// Grants go to the newest waiter instead of the oldest.
    LifoGrants,
    /// Appends are accepted with a token whose lease ran out.
    StaleAppends,
    /// Grants that survive a restart get no lease (they never run out).
    NoRearm,
}

impl Plant {
    /// Every plant, with its command-line name.
    pub const ALL: [(&'static str, Plant); 5] = [
        ("dedup-off", Plant::DedupOff),
        ("reply-before-fsync", Plant::ReplyBeforeFsync),
        ("lifo-grants", Plant::LifoGrants),
        ("stale-appends", Plant::StaleAppends),
        ("no-rearm", Plant::NoRearm),
    ];

    /// The plant named `name`.
    pub fn by_name(name: &str) -> Option<Plant> {
        Plant::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        Plant::ALL.iter().find(|(_, p)| *p == self).map_or("?", |(n, _)| n)
    }
}

/// How often each fault happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    pub drops: u64,
    pub duplicates: u64,
    pub reorders: u64,
    pub partitions: u64,
    pub partition_drops: u64,
    pub client_pauses: u64,
    pub client_crashes: u64,
    pub server_crashes: u64,
    pub crash_before_fsync: u64,
    pub crash_before_reply: u64,
    pub crash_unsynced_lost: u64,
    pub torn_writes: u64,
    pub snapshots: u64,
}

impl Faults {
    /// Adds another run's counts.
    pub fn add(&mut self, other: &Faults) {
        self.drops += other.drops;
        self.duplicates += other.duplicates;
        self.reorders += other.reorders;
        self.partitions += other.partitions;
        self.partition_drops += other.partition_drops;
        self.client_pauses += other.client_pauses;
        self.client_crashes += other.client_crashes;
        self.server_crashes += other.server_crashes;
        self.crash_before_fsync += other.crash_before_fsync;
        self.crash_before_reply += other.crash_before_reply;
        self.crash_unsynced_lost += other.crash_unsynced_lost;
        self.torn_writes += other.torn_writes;
        self.snapshots += other.snapshots;
    }

    /// One line per fault kind.
    pub fn report(&self) -> String {
        format!(
            "faults: drops {} | duplicates {} | reorders {} | partitions {} ({} packets cut) | client pauses past lease {} | client crashes {} | server crashes {} (between log write and fsync {}, between fsync and reply {}, losing unsynced bytes {}, torn writes {}) | snapshots {}",
            self.drops,
            self.duplicates,
            self.reorders,
            self.partitions,
            self.partition_drops,
            self.client_pauses,
            self.client_crashes,
            self.server_crashes,
            self.crash_before_fsync,
            self.crash_before_reply,
            self.crash_unsynced_lost,
            self.torn_writes,
            self.snapshots
        )
    }
}

/// The outcome of one seed.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub seed: u64,
    /// Broken invariants; empty when the seed passed.
    pub violations: Vec<String>,
    pub faults: Faults,
    /// A hash of the whole schedule: equal for equal runs.
    pub hash: u64,
    /// The full trace, when asked for.
    pub trace: Vec<String>,
}
