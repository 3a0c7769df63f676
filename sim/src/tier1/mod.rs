//! Tier 1: the real core, log and data-file code, driven by a seeded
//! message-level simulator — many seeds per second, all in memory.
//!
//! A run is a discrete-event simulation on virtual milliseconds. The network
//! delays (and so reorders), drops, duplicates and partitions packets. The
//! server is the real [`dlm::core::Core`] with the real log
//! ([`dlm::log::Wal`]) and data files over a [`SimDisk`]; its group commit is
//! modelled as two steps — the log write, then the fsync some milliseconds
//! later — and only then are file writes applied and replies sent. The server
//! crashes at any instant: between a write and its fsync (unsynced bytes are
//! lost or torn), between the fsync and the replies, or while idle, by a
//! power loss or by a `kill -9` (the disk keeps what was written, synced or
//! not, until a later power loss); it restarts through the real recovery
//! path. Clients follow the client
//! library's rules: one request id per operation across retries, a deadline
//! per attempt, a cancel when an attempt is abandoned, exponential backoff
//! with full jitter, lease renewal while holding; they also pause past their
//! lease and crash. Each seed picks its own fault rates, then a heal phase
//! turns faults off and checks liveness.

mod client;
mod server;

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use dlm::core::types::{Reply, Request};
use dlm::core::Plants;

use crate::disk::SimDisk;
use crate::history::History;
use crate::rng::SimRng;
use crate::{Faults, Plant, RunResult};

use client::Client;
use server::Server;

/// Fault rates and sizes of one run, drawn from its seed.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub clients: usize,
    pub drop: f64,
    pub duplicate: f64,
    pub delay_min: u64,
    pub delay_jitter: u64,
    /// Mean partitions started per second of chaos.
    pub partitions_per_s: f64,
    /// Mean server crashes per second of chaos.
    pub crashes_per_s: f64,
    pub client_crashes_per_s: f64,
    /// Chance that a holding client stalls past its lease at a step.
    pub pause: f64,
    pub torn: f64,
    pub fsync_min: u64,
    pub fsync_max: u64,
    pub chaos_ms: u64,
    pub heal_ms: u64,
    /// Share of the server crashes (those not aimed inside a storage step)
    /// that are a `kill -9` of the process rather than a power loss: the
    /// disk keeps every write, synced or not, until a later power loss.
    pub kills: f64,
    /// Answers the server's dedup table keeps: tiny in half the seeds, so
    /// that late retries find their answers forgotten (and must be refused
    /// as expired, never applied twice).
    pub dedup_capacity: usize,
}

impl Scenario {
    fn draw(rng: &mut SimRng) -> Scenario {
        Scenario {
            clients: rng.between(2, 5) as usize,
            drop: rng.fraction(0.3),
            duplicate: rng.fraction(0.3),
            delay_min: rng.between(0, 3),
            delay_jitter: rng.between(0, 40),
            partitions_per_s: rng.fraction(1.0),
            crashes_per_s: rng.fraction(0.8),
            client_crashes_per_s: rng.fraction(0.3),
            pause: rng.fraction(0.08),
            torn: 0.5,
            fsync_min: 1,
            fsync_max: rng.between(1, 8),
            chaos_ms: 6_000,
            heal_ms: 8_000,
            // Drawn last, so that the draws above are those of earlier
            // versions for the same seed.
            kills: rng.fraction(0.7),
            dedup_capacity: rng.dedup_capacity(),
        }
    }
}

/// No live client may wait longer than this after the heal (ms): the longest
/// lease a client asks for, plus the place kept for a cut-off waiter, plus
/// the queue ahead of it, plus backoff.
pub const LIVENESS_BOUND_MS: u64 = 6_000;

/// A packet or a timer.
#[derive(Clone, Debug)]
enum Event {
    ToServer {
        client: usize,
        incarnation: u64,
        attempt: u64,
        request_id: String,
        request: Request,
    },
    Cancel {
        client: usize,
        incarnation: u64,
        attempt: u64,
    },
    ToClient {
        client: usize,
        incarnation: u64,
        attempt: u64,
        reply: Reply,
    },
    ClientWake {
        client: usize,
        generation: u64,
    },
    ServerDeadline {
        incarnation: u64,
    },
    LogSynced {
        incarnation: u64,
    },
    RepliesOut {
        incarnation: u64,
    },
    /// The snapshot begun by the server is written (as by a background
    /// thread: records went on meanwhile).
    SnapshotWritten {
        incarnation: u64,
    },
    ServerCrash,
    /// A crash aimed at a flight (between log write, fsync and replies).
    InjectedCrash,
    ServerRestart,
    ClientCrash,
    ClientRestart {
        client: usize,
    },
    Partition,
    Heal,
    End,
}

impl Event {
    fn code(&self) -> (u8, u64, u64) {
        match self {
            Event::ToServer {
                client, attempt, ..
            } => (1, *client as u64, *attempt),
            Event::Cancel {
                client, attempt, ..
            } => (2, *client as u64, *attempt),
            Event::ToClient {
                client, attempt, ..
            } => (3, *client as u64, *attempt),
            Event::ClientWake { client, generation } => (4, *client as u64, *generation),
            Event::ServerDeadline { incarnation } => (5, *incarnation, 0),
            Event::LogSynced { incarnation } => (6, *incarnation, 0),
            Event::RepliesOut { incarnation } => (7, *incarnation, 0),
            Event::ServerCrash => (8, 0, 0),
            Event::ServerRestart => (9, 0, 0),
            Event::ClientCrash => (10, 0, 0),
            Event::ClientRestart { client } => (11, *client as u64, 0),
            Event::Partition => (12, 0, 0),
            Event::Heal => (13, 0, 0),
            Event::End => (14, 0, 0),
            Event::InjectedCrash => (15, 0, 0),
            Event::SnapshotWritten { incarnation } => (16, *incarnation, 0),
        }
    }
}

struct Queued {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Which way a packet goes.
#[derive(Clone, Copy)]
enum Dir {
    Up(usize),
    Down(usize),
}

/// The whole simulated world of one seed.
pub struct World {
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    pub rng: SimRng,
    pub scenario: Scenario,
    pub plant: Option<Plant>,
    pub healed: bool,
    pub faults: Faults,
    pub history: History,
    disk: SimDisk,
    server: Server,
    clients: Vec<Client>,
    /// Until when each client's link is cut.
    cut_until: Vec<u64>,
    /// Latest delivery time scheduled per link, to count reordering.
    last_delivery: Vec<(u64, u64)>,
    /// FNV-1a over every event handled: equal for equal schedules.
    pub hash: u64,
    pub trace: Option<Vec<String>>,
}

impl World {
    fn new(seed: u64, plant: Option<Plant>, trace: bool) -> World {
        let mut rng = SimRng::new(seed);
        let scenario = Scenario::draw(&mut rng);
        let clients = (0..scenario.clients)
            .map(|i| Client::new(i as i32 + 1, rng.between(150, 1200)))
            .collect();
        World {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            cut_until: vec![0; scenario.clients],
            last_delivery: vec![(0, 0); scenario.clients],
            rng,
            plant,
            healed: false,
            faults: Faults::default(),
            history: History::default(),
            disk: SimDisk::default(),
            server: Server::default(),
            clients,
            hash: 0xcbf2_9ce4_8422_2325,
            trace: trace.then(Vec::new),
            scenario,
        }
    }

    fn plants(&self) -> Plants {
        let mut plants = Plants::default();
        match self.plant {
            Some(Plant::DedupOff) => plants.dedup_off = true,
            Some(Plant::FloorsOff) => plants.floors_off = true,
            Some(Plant::LifoGrants) => plants.lifo_grants = true,
            Some(Plant::StaleAppends) => plants.stale_appends = true,
            Some(Plant::NoRearm) => plants.no_rearm = true,
            // ReplyBeforeFsync is planted in the modelled writer; tier 1 has
            // no LateGrants (the command line refuses it).
            Some(Plant::ReplyBeforeFsync | Plant::LateGrants) | None => {}
        }
        plants
    }

    fn at(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: at.max(self.now),
            seq: self.seq,
            event,
        }));
    }

    /// Writes a line to the trace (only when tracing).
    pub fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{:>7} {}", self.now, line()));
        }
    }

    fn mix(&mut self, value: u64) {
        for byte in value.to_le_bytes() {
            self.hash ^= u64::from(byte);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Sends a packet over the simulated network: maybe lost, maybe
    /// duplicated, each copy with its own delay (so packets reorder).
    fn send(&mut self, dir: Dir, event: Event) {
        let link = match dir {
            Dir::Up(c) | Dir::Down(c) => c,
        };
        if self.now < self.cut_until[link] {
            self.faults.partition_drops += 1;
            return;
        }
        if self.rng.chance(self.faults_on(self.scenario.drop)) {
            self.faults.drops += 1;
            return;
        }
        let copies = if self.rng.chance(self.faults_on(self.scenario.duplicate)) {
            self.faults.duplicates += 1;
            2
        } else {
            1
        };
        let mut event = Some(event);
        for copy in 0..copies {
            let delay = self.scenario.delay_min + self.rng.between(0, self.scenario.delay_jitter);
            let at = self.now + delay;
            let slot = match dir {
                Dir::Up(_) => &mut self.last_delivery[link].0,
                Dir::Down(_) => &mut self.last_delivery[link].1,
            };
            if at < *slot {
                self.faults.reorders += 1;
            }
            *slot = (*slot).max(at);
            let this = if copy + 1 == copies {
                event.take()
            } else {
                event.clone()
            };
            if let Some(this) = this {
                self.at(at, this);
            }
        }
    }

    fn faults_on(&self, rate: f64) -> f64 {
        if self.healed {
            0.0
        } else {
            rate
        }
    }

    /// Exponential inter-arrival time for a rate per second (chaos only).
    fn next_arrival(&mut self, per_s: f64) -> Option<u64> {
        if per_s <= 0.0 {
            return None;
        }
        let u = self.rng.fraction(1.0).max(1e-9);
        Some(self.now + (-u.ln() / per_s * 1000.0) as u64 + 1)
    }

    fn run(&mut self) -> Vec<String> {
        self.server_restart();
        for i in 0..self.clients.len() {
            self.client_wake_now(i);
        }
        if let Some(at) = self.next_arrival(self.scenario.crashes_per_s) {
            self.at(at, Event::ServerCrash);
        }
        if let Some(at) = self.next_arrival(self.scenario.client_crashes_per_s) {
            self.at(at, Event::ClientCrash);
        }
        if let Some(at) = self.next_arrival(self.scenario.partitions_per_s) {
            self.at(at, Event::Partition);
        }
        self.at(self.scenario.chaos_ms, Event::Heal);
        self.at(self.scenario.chaos_ms + self.scenario.heal_ms, Event::End);
        let mut steps: u64 = 0;
        while let Some(Reverse(next)) = self.queue.pop() {
            steps += 1;
            if steps > 5_000_000 {
                return vec!["simulation did not finish (event storm)".to_owned()];
            }
            self.now = next.at;
            let (code, a, b) = next.event.code();
            self.mix(self.now);
            self.mix(u64::from(code) << 56 | a << 32 | b);
            if matches!(next.event, Event::End) {
                return self.finish();
            }
            self.handle(next.event);
        }
        vec!["the event queue ran dry".to_owned()]
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::ToServer {
                client,
                incarnation,
                attempt,
                request_id,
                request,
            } => self.server_receive(client, incarnation, attempt, request_id, request),
            Event::Cancel {
                client,
                incarnation,
                attempt,
            } => self.server_cancel(client, incarnation, attempt),
            Event::ToClient {
                client,
                incarnation,
                attempt,
                reply,
            } => self.client_reply(client, incarnation, attempt, reply),
            Event::ClientWake { client, generation } => {
                if self.clients[client].wake_generation == generation {
                    self.clients[client].wake_at = None;
                    self.client_step(client);
                }
            }
            Event::ServerDeadline { incarnation } => self.server_deadline(incarnation),
            Event::LogSynced { incarnation } => self.server_synced(incarnation),
            Event::RepliesOut { incarnation } => self.server_replies_out(incarnation),
            Event::SnapshotWritten { incarnation } => self.server_snapshot_written(incarnation),
            Event::ServerCrash => {
                if !self.healed {
                    self.server_crash_or_kill();
                    if let Some(at) = self.next_arrival(self.scenario.crashes_per_s) {
                        self.at(at, Event::ServerCrash);
                    }
                }
            }
            Event::InjectedCrash => {
                if !self.healed {
                    self.server_crash_or_kill();
                }
            }
            Event::ServerRestart => {
                if !self.server.is_up() {
                    self.server_restart();
                }
            }
            Event::ClientCrash => {
                if !self.healed {
                    let victim = self.rng.between(0, self.clients.len() as u64 - 1) as usize;
                    self.client_crash(victim);
                    if let Some(at) = self.next_arrival(self.scenario.client_crashes_per_s) {
                        self.at(at, Event::ClientCrash);
                    }
                }
            }
            Event::ClientRestart { client } => self.client_restart(client),
            Event::Partition => {
                if !self.healed {
                    let length = self.rng.between(100, 3_000);
                    if self.rng.chance(0.3) {
                        for cut in &mut self.cut_until {
                            *cut = (*cut).max(self.now + length);
                        }
                    } else {
                        let link = self.rng.between(0, self.clients.len() as u64 - 1) as usize;
                        self.cut_until[link] = self.cut_until[link].max(self.now + length);
                    }
                    self.faults.partitions += 1;
                    self.log(|| format!("partition for {length} ms"));
                    if let Some(at) = self.next_arrival(self.scenario.partitions_per_s) {
                        self.at(at, Event::Partition);
                    }
                }
            }
            Event::Heal => {
                self.healed = true;
                self.log(|| "heal: faults off".to_owned());
                for cut in &mut self.cut_until {
                    *cut = 0;
                }
                if !self.server.is_up() {
                    self.server_restart();
                }
                for i in 0..self.clients.len() {
                    if !self.clients[i].alive {
                        self.client_restart(i);
                    }
                    self.clients[i].ops_since_heal = 0;
                }
            }
            Event::End => {}
        }
    }

    /// End of the run: liveness, then the final files (checked again after a
    /// crash and a recovery, which must give back exactly the same files).
    fn finish(&mut self) -> Vec<String> {
        let mut violations = Vec::new();
        for client in &self.clients {
            if let Some(op) = &client.op {
                if self.now.saturating_sub(op.invoked) > LIVENESS_BOUND_MS {
                    violations.push(format!(
                        "liveness: client {} has waited {} ms for {} after the heal",
                        client.id,
                        self.now - op.invoked,
                        op.kind.name()
                    ));
                }
            }
            if client.alive && client.ops_since_heal == 0 {
                violations.push(format!(
                    "liveness: client {} completed nothing after the heal",
                    client.id
                ));
            }
        }
        // Operations still in flight at the end have unknown outcomes.
        for i in 0..self.clients.len() {
            self.client_abandon(i);
        }
        self.server_drain();
        let files = self.server_files();
        self.server_crash();
        self.server_restart();
        let again = self.server_files();
        if again != files {
            violations.push("recovery changed the files (lost or doubled bytes)".to_owned());
        }
        violations.extend(self.history.check(&files));
        violations
    }
}

/// Runs one seed of tier 1.
pub fn run_seed(seed: u64, plant: Option<Plant>, trace: bool) -> RunResult {
    let mut world = World::new(seed, plant, trace);
    let violations = world.run();
    RunResult {
        seed,
        violations,
        faults: world.faults.clone(),
        hash: world.hash,
        trace: world.trace.take().unwrap_or_default(),
    }
}
