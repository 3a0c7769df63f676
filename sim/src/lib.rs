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
//! - [`tier2`]: the real server shell, log, gRPC transport and client
//!   library on turmoil's simulated TCP and disk, with partitions, held and
//!   failing links, a duplicating relay, client crashes and stalls, server
//!   restarts, power losses and aimed power cuts; or the same over QUIC.
//! - [`quic_turmoil`]: quinn on turmoil — a UDP socket and a runtime for
//!   quinn over turmoil's network and clock, and seeded QUIC material — so
//!   that dlm's QUIC transport runs in tier 2 and replays from a seed.

pub mod disk;
pub mod history;
pub mod quic_turmoil;
pub mod rng;
pub mod tier1;
pub mod tier2;

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
    /// A retry whose answer the dedup table forgot is served again (no
    /// floors: `REQUEST_EXPIRED` is never sent).
    FloorsOff,
    /// The server holds the answer to a waiting call (a grant handed over,
    /// a wait that ran out) until the next acquire arrives: nothing lost,
    /// nothing applied twice, the waiter only hears late (or from the dedup
    /// table when its cut-off attempt re-attaches).
    /// Tier 2 only: it is planted in the production server's engine, which
    /// tier 1 models instead of running.
    LateGrants,
}

impl Plant {
    /// Every plant, with its command-line name.
    pub const ALL: [(&'static str, Plant); 7] = [
        ("dedup-off", Plant::DedupOff),
        ("reply-before-fsync", Plant::ReplyBeforeFsync),
        ("lifo-grants", Plant::LifoGrants),
        ("stale-appends", Plant::StaleAppends),
        ("no-rearm", Plant::NoRearm),
        ("floors-off", Plant::FloorsOff),
        ("late-grants", Plant::LateGrants),
    ];

    /// The plant named `name`.
    pub fn by_name(name: &str) -> Option<Plant> {
        Plant::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        Plant::ALL
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("?", |(n, _)| n)
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
    /// Tier 1: unsynced directory changes (create, rename, remove) that a
    /// crash lost.
    pub dir_changes_lost: u64,
    /// Tier 1: power failures in the middle of a step's storage changes
    /// (a log sync, a snapshot's write, a recovery). Tier 2: power cuts
    /// that struck while the server recovered.
    pub power_cuts_in_step: u64,
    /// Tier 1: server crashes that were a `kill -9` (the disk kept its
    /// unsynced writes) rather than a power loss.
    pub kills: u64,
    pub snapshots: u64,
    /// Server crashes while a snapshot was being written (its generation's
    /// log already in use).
    pub crash_mid_snapshot: u64,
    /// Tier 2: links held (messages delayed, then delivered at once).
    pub holds: u64,
    /// Tier 2: windows in which a link failed at random (turmoil's fail rate).
    pub link_failures: u64,
    /// Tier 2: connections a client had to open again.
    pub reconnects: u64,
    /// Tier 2: server processes killed and restarted with the disk's cache intact.
    pub server_bounces: u64,
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
        self.dir_changes_lost += other.dir_changes_lost;
        self.power_cuts_in_step += other.power_cuts_in_step;
        self.kills += other.kills;
        self.snapshots += other.snapshots;
        self.crash_mid_snapshot += other.crash_mid_snapshot;
        self.holds += other.holds;
        self.link_failures += other.link_failures;
        self.reconnects += other.reconnects;
        self.server_bounces += other.server_bounces;
    }

    /// One line with every fault kind (the tier-2 kinds only when any happened).
    pub fn report(&self) -> String {
        let is_tier2 = self.holds + self.link_failures + self.reconnects + self.server_bounces > 0;
        let (drops, tier2) = if is_tier2 {
            (
                // turmoil drops TCP segments inside partitions and failing
                // links unseen; over QUIC the lost datagrams are counted.
                if self.drops == 0 {
                    "uncounted".to_owned()
                } else {
                    format!("{} datagrams", self.drops)
                },
                format!(
                    " | holds {} | link failure windows {} | reconnects {} | server restarts without power loss {}",
                    self.holds, self.link_failures, self.reconnects, self.server_bounces
                ),
            )
        } else {
            (self.drops.to_string(), String::new())
        };
        // Tier 2's kills are its "server restarts without power loss".
        let kills = if is_tier2 {
            String::new()
        } else {
            format!(", of which {} kill -9 without power loss", self.kills)
        };
        format!(
            "faults: drops {drops} | duplicates {} | reorders {} | partitions {} ({} packets cut) | client pauses past lease {} | client crashes {} | server crashes {}{kills} (between log write and fsync {}, between fsync and reply {}, losing unsynced bytes {}, torn writes {}, unsynced directory changes lost {}, power cut or kill -9 inside a log sync, snapshot write or recovery {}, while a snapshot was written {}) | snapshots {}{tier2}",
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
            self.dir_changes_lost,
            self.power_cuts_in_step,
            self.crash_mid_snapshot,
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
