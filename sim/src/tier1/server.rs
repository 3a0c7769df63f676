//! The simulated server node: the real core, log and data files over the
//! simulated disk, with group commit modelled in steps that a crash can cut.
//!
//! Outputs of the core go into an open batch; when no flight is in progress
//! the batch's records are written to the log (not yet durable) and a flight
//! starts; the fsync completes some milliseconds later, then the file writes
//! are applied, then (a moment later) the replies leave. Requests that arrive
//! meanwhile gather in the next batch: one fsync serves them all.

use std::collections::BTreeMap;

use dlm::core::staging::{FileIndex, FileWrite};
use dlm::core::time::Time;
use dlm::core::types::{CallId, Reply, Request};
use dlm::core::{Core, Input, Output};
use dlm::files::DataFiles;
use dlm::log::{SnapshotWrite, Wal};
use dlm::server::{recover, ServerConfig};

use super::{Dir, Event, World};
use crate::disk::CrashLoss;
use crate::Plant;

/// Where a reply goes: (client index, client incarnation, attempt).
type Route = (usize, u64, u64);

#[derive(Default)]
struct Batch {
    records: usize,
    writes: Vec<FileWrite>,
    replies: Vec<(Route, Reply)>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.records == 0 && self.writes.is_empty() && self.replies.is_empty()
    }
}

struct Node {
    core: Core,
    wal: Wal,
    files: DataFiles,
    routes: BTreeMap<CallId, Route>,
    calls_of: BTreeMap<Route, Vec<CallId>>,
    next_call: u64,
    open: Batch,
    /// Written to the log, fsync in progress.
    flight: Option<Batch>,
    /// Synced and applied; replies about to leave.
    synced: Option<Batch>,
    deadline: Option<u64>,
    /// A snapshot whose generation the log has started, not yet written
    /// (the server writes it on a thread of its own).
    snapshot_write: Option<SnapshotWrite>,
}

/// The server: up (a node) or down.
#[derive(Default)]
pub struct Server {
    pub incarnation: u64,
    node: Option<Node>,
}

impl Server {
    /// True while the server runs.
    pub fn is_up(&self) -> bool {
        self.node.is_some()
    }
}

/// Snapshot the log after this many records (small, so snapshots happen).
const SNAPSHOT_EVERY: u64 = 25;

fn config(dedup_capacity: usize) -> ServerConfig {
    let mut config = ServerConfig::new("sim");
    config.dedup_capacity = dedup_capacity;
    config.max_detached_waiters = crate::rng::max_detached_waiters(dedup_capacity);
    config.lease_ms = 1_000;
    // Two blocks of zeros ahead: every few snapshots' logs grow past it.
    config.log_prealloc = 8192;
    // Steps whose record passes a few hundred bytes (an expiry with the
    // next grant, a call after it) are logged as runs of their changes,
    // which a torn write may cut between.
    config.split_record_bytes = 64;
    config
}

impl World {
    fn node(&mut self) -> Option<&mut Node> {
        self.server.node.as_mut()
    }

    pub(super) fn server_receive(
        &mut self,
        client: usize,
        incarnation: u64,
        attempt: u64,
        request_id: String,
        request: Request,
    ) {
        let now = self.now;
        let Some(node) = self.node() else {
            return;
        };
        node.next_call += 1;
        let call = CallId(node.next_call);
        let route = (client, incarnation, attempt);
        node.routes.insert(call, route);
        node.calls_of.entry(route).or_default().push(call);
        let outputs = node.core.handle(
            Time::from_millis(now),
            Input::Call {
                id: call,
                request_id: request_id.clone(),
                request: request.clone(),
            },
        );
        self.log(|| {
            format!(
                "server <- c{} #{attempt} {request_id} {request:?}",
                client + 1
            )
        });
        self.absorb(outputs);
    }

    pub(super) fn server_cancel(&mut self, client: usize, incarnation: u64, attempt: u64) {
        let now = self.now;
        let Some(node) = self.node() else {
            return;
        };
        let calls = node
            .calls_of
            .remove(&(client, incarnation, attempt))
            .unwrap_or_default();
        let mut outputs = Vec::new();
        for call in calls {
            node.routes.remove(&call);
            outputs.extend(
                node.core
                    .handle(Time::from_millis(now), Input::CallDropped(call)),
            );
        }
        self.absorb(outputs);
    }

    pub(super) fn server_deadline(&mut self, incarnation: u64) {
        if incarnation != self.server.incarnation {
            return;
        }
        let now = self.now;
        let Some(node) = self.node() else {
            return;
        };
        node.deadline = None;
        let outputs = node.core.tick(Time::from_millis(now));
        self.absorb(outputs);
        self.audit_leases();
    }

    /// Asks the server's status (as `dlm status` would): every lock still
    /// held must have lease left — a grant whose lease ran out is gone.
    pub(super) fn audit_leases(&mut self) {
        let now = self.now;
        let Some(node) = self.node() else {
            return;
        };
        let probe = CallId(u64::MAX);
        let outputs = node.core.handle(
            Time::from_millis(now),
            Input::Call {
                id: probe,
                request_id: String::new(),
                request: Request::Status,
            },
        );
        let mut rest = Vec::with_capacity(outputs.len());
        for output in outputs {
            match output {
                Output::Reply {
                    call,
                    reply: Reply::Status { locks, .. },
                } if call == probe => {
                    for lock in locks.iter().filter(|l| l.holder.is_some()) {
                        if lock.lease_left.0 == 0 {
                            self.history.violations.push(format!(
                                "lease: lock {:?} still held by client {:?} (fence {}) at {now} with no lease left",
                                lock.lock,
                                lock.holder,
                                lock.fence.0
                            ));
                        }
                    }
                }
                other => rest.push(other),
            }
        }
        self.absorb(rest);
    }

    /// Takes the core's outputs into the open batch, then moves the pipeline.
    fn absorb(&mut self, outputs: Vec<Output>) {
        let now = self.now;
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        for output in outputs {
            match output {
                Output::Persist(record) => {
                    for change in &record.changes {
                        self.history.on_change(now, change);
                    }
                    node.wal.append(&record);
                    node.open.records += 1;
                }
                Output::Write(write) => node.open.writes.push(write),
                Output::Reply { call, reply } => {
                    if let Some(route) = node.routes.remove(&call) {
                        if let Some(calls) = node.calls_of.get_mut(&route) {
                            calls.retain(|c| *c != call);
                        }
                        node.open.replies.push((route, reply));
                    }
                }
                Output::Trace(trace) => self.history.on_trace(now, &trace),
            }
        }
        self.pump();
        self.arm_deadline();
    }

    fn arm_deadline(&mut self) {
        let incarnation = self.server.incarnation;
        let Some(node) = self.node() else {
            return;
        };
        let Some(next) = node.core.next_deadline().map(Time::as_millis) else {
            return;
        };
        if node.deadline.is_none_or(|d| next < d) {
            node.deadline = Some(next);
            self.at(next, Event::ServerDeadline { incarnation });
        }
    }

    /// Starts a flight (log write, then fsync) if none is in progress.
    fn pump(&mut self) {
        let incarnation = self.server.incarnation;
        let reply_early = self.plant == Some(Plant::ReplyBeforeFsync);
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        if node.flight.is_some() || node.synced.is_some() || node.open.is_empty() {
            return;
        }
        if let Err(e) = node.wal.write_pending() {
            self.history
                .violations
                .push(format!("log write failed: {e}"));
            return;
        }
        let mut flight = std::mem::take(&mut node.open);
        let has_records = flight.records > 0;
        let early: Vec<(Route, Reply)> = if reply_early {
            std::mem::take(&mut flight.replies)
        } else {
            Vec::new()
        };
        node.flight = Some(flight);
        for (route, reply) in early {
            self.reply(route, reply);
        }
        let latency = if has_records {
            self.rng
                .between(self.scenario.fsync_min, self.scenario.fsync_max)
        } else {
            0
        };
        self.at(self.now + latency, Event::LogSynced { incarnation });
        // Aim some crashes at the instants that matter most: between the
        // log write and its fsync, and between the fsync and the replies.
        if has_records {
            self.aim_crash(latency, 0.01);
        }
    }

    /// With probability `chance` (and while crashes are on), a crash at a
    /// random instant of the next `within` ms.
    fn aim_crash(&mut self, within: u64, chance: f64) {
        if !self.healed && self.scenario.crashes_per_s > 0.0 && self.rng.chance(chance) {
            let at = self.now + self.rng.between(0, within + 1);
            self.at(at, Event::InjectedCrash);
        }
    }

    pub(super) fn server_synced(&mut self, incarnation: u64) {
        if incarnation != self.server.incarnation {
            return;
        }
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        let Some(flight) = node.flight.take() else {
            return;
        };
        self.arm_power_cut(false);
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        let mut failure = node.wal.sync().err().map(|e| e.to_string());
        for write in &flight.writes {
            if let Err(e) = node.files.apply(write) {
                failure = Some(e.to_string());
            }
        }
        // A cut inside the sync is counted as that, not also as a crash
        // between the fsync and the replies: the flight becomes `synced`
        // only once the step is whole.
        if self.power_cut_happened() {
            return;
        }
        if let Some(node) = self.server.node.as_mut() {
            node.synced = Some(flight);
        }
        if let Some(e) = failure {
            self.history
                .violations
                .push(format!("storage failed in the simulation: {e}"));
        }
        let gap = self.rng.between(0, 1);
        self.at(self.now + gap, Event::RepliesOut { incarnation });
    }

    pub(super) fn server_replies_out(&mut self, incarnation: u64) {
        if incarnation != self.server.incarnation {
            return;
        }
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        let Some(batch) = node.synced.take() else {
            return;
        };
        for (route, reply) in batch.replies {
            self.reply(route, reply);
        }
        self.maybe_snapshot();
        self.pump();
        self.audit_leases();
    }

    /// Begins a snapshot at a quiet point, as the server's writer does: the
    /// log moves to the next generation at once, the snapshot file is
    /// written later (`SnapshotWritten`) while records go on, and crashes
    /// are aimed at that window too.
    fn maybe_snapshot(&mut self) {
        let incarnation = self.server.incarnation;
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        if node.wal.records_since_snapshot() < SNAPSHOT_EVERY
            || !node.open.is_empty()
            || node.flight.is_some()
            || node.snapshot_write.is_some()
        {
            return;
        }
        let snapshot = node.core.snapshot();
        let result = node
            .files
            .sync()
            .map_err(|e| e.to_string())
            .and_then(|()| node.wal.begin_snapshot(snapshot).map_err(|e| e.to_string()));
        match result {
            Ok(write) => node.snapshot_write = Some(write),
            Err(e) => {
                self.history
                    .violations
                    .push(format!("snapshot failed: {e}"));
                return;
            }
        }
        self.faults.snapshots += 1;
        let latency = self
            .rng
            .between(self.scenario.fsync_min, 4 * self.scenario.fsync_max + 1);
        self.at(self.now + latency, Event::SnapshotWritten { incarnation });
        self.aim_crash(latency, 0.05);
    }

    pub(super) fn server_snapshot_written(&mut self, incarnation: u64) {
        if incarnation != self.server.incarnation {
            return;
        }
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        let Some(write) = node.snapshot_write.take() else {
            return;
        };
        self.arm_power_cut(false);
        let written = write.run();
        if self.power_cut_happened() {
            return;
        }
        let Some(node) = self.server.node.as_mut() else {
            return;
        };
        match written {
            Ok(premade) => node.wal.adopt(premade),
            Err(e) => self
                .history
                .violations
                .push(format!("snapshot write failed: {e}")),
        }
    }

    /// With a small chance (while crashes are on), the power fails after a
    /// random few of the storage changes the coming step makes; for a `long`
    /// step (a start: a new directory's first makes a hundred data files,
    /// then syncs their directory), half the time after up to 240.
    fn arm_power_cut(&mut self, long: bool) {
        if !self.healed && self.scenario.crashes_per_s > 0.0 && self.rng.chance(0.02) {
            let most = if long && self.rng.chance(0.5) {
                240
            } else {
                12
            };
            let after = self.rng.between(0, most);
            self.disk.power_fails_at(self.disk.changes() + after);
        }
    }

    /// After a step's storage changes: if the power failed among them, the
    /// server is down from that instant (nothing the step did after it left
    /// the machine, and the step sends nothing). Otherwise the failure set
    /// for the step, if any, is taken back. With the scenario's share of
    /// kills, the instant is a `kill -9` instead: the process stops there,
    /// and the disk keeps what the step wrote up to it, synced or not.
    fn power_cut_happened(&mut self) -> bool {
        if !self.disk.power_failed() {
            self.disk.disarm_power_failure();
            return false;
        }
        self.faults.power_cuts_in_step += 1;
        let kill = self.rng.chance(self.scenario.kills);
        self.log(|| {
            let what = if kill { "kill -9" } else { "power cut" };
            format!("{what} in the middle of a step")
        });
        match (self.server.node.is_some(), kill) {
            (true, true) => self.server_kill(),
            (true, false) => self.server_crash(),
            (false, true) => {
                // During recovery: it starts again later, on what it wrote.
                self.faults.server_crashes += 1;
                self.faults.kills += 1;
                self.disk.process_killed();
                let down = self.rng.between(10, 1_500);
                self.at(self.now + down, Event::ServerRestart);
            }
            // During recovery: the machine goes down again before serving.
            (false, false) => self.power_loss_while_down(),
        }
        true
    }

    fn reply(&mut self, route: Route, reply: Reply) {
        let (client, incarnation, attempt) = route;
        self.log(|| format!("server -> c{} #{attempt} {reply:?}", client + 1));
        self.send(
            Dir::Down(client),
            Event::ToClient {
                client,
                incarnation,
                attempt,
                reply,
            },
        );
    }

    /// A crash drawn by the scenario: a `kill -9` with the chance
    /// [`Scenario::kills`](super::Scenario::kills), otherwise a power loss.
    pub(super) fn server_crash_or_kill(&mut self) {
        if self.server.node.is_none() {
            return;
        }
        if self.rng.chance(self.scenario.kills) {
            self.server_kill();
        } else {
            self.server_crash();
        }
    }

    /// `kill -9`: memory is gone, the disk keeps every write (the page cache
    /// survives the process) but not as durable: a later power loss, even
    /// during the next recovery, can still lose what was never synced.
    fn server_kill(&mut self) {
        if !self.server_down() {
            return;
        }
        self.faults.kills += 1;
        self.disk.process_killed();
        self.log(|| "server KILLED (the disk keeps unsynced writes)".to_owned());
        if !self.healed {
            let down = self.rng.between(10, 1_500);
            self.at(self.now + down, Event::ServerRestart);
        }
    }

    /// The process is gone (memory lost): counts what it was doing.
    /// Returns false if it was already down.
    fn server_down(&mut self) -> bool {
        let Some(node) = self.server.node.take() else {
            return false;
        };
        if node.flight.is_some() {
            self.faults.crash_before_fsync += 1;
        }
        if node.synced.is_some() {
            self.faults.crash_before_reply += 1;
        }
        if node.snapshot_write.is_some() {
            self.faults.crash_mid_snapshot += 1;
        }
        self.faults.server_crashes += 1;
        self.server.incarnation += 1;
        self.history.on_crash(self.now);
        true
    }

    /// Power loss: memory is gone, unsynced bytes are lost or torn.
    pub(super) fn server_crash(&mut self) {
        if !self.server_down() {
            return;
        }
        let loss = self.lose_power();
        self.log(|| {
            format!(
                "server CRASH (lost unsynced bytes in {} files, {} torn)",
                loss.files_hit, loss.torn
            )
        });
        if !self.healed {
            let down = self.rng.between(10, 1_500);
            self.at(self.now + down, Event::ServerRestart);
        }
    }

    /// The disk loses what was not durable; the faults count it.
    fn lose_power(&mut self) -> CrashLoss {
        let torn = self.scenario.torn;
        let loss = self.disk.crash(&mut self.rng, torn);
        if loss.files_hit > 0 {
            self.faults.crash_unsynced_lost += 1;
        }
        self.faults.torn_writes += loss.torn;
        self.faults.dir_changes_lost += loss.names_lost;
        loss
    }

    /// The power failed while the server was recovering: the disk loses
    /// what was not durable, and the server starts again later.
    fn power_loss_while_down(&mut self) {
        self.faults.server_crashes += 1;
        let loss = self.lose_power();
        self.log(|| {
            format!(
                "power lost during recovery (unsynced bytes in {} files, {} torn, {} directory changes)",
                loss.files_hit, loss.torn, loss.names_lost
            )
        });
        let down = self.rng.between(10, 1_500);
        self.at(self.now + down, Event::ServerRestart);
    }

    /// Start-up through the real recovery path.
    pub(super) fn server_restart(&mut self) {
        if self.server.is_up() {
            return;
        }
        let seed = self.rng.seed32();
        let plants = self.plants();
        self.arm_power_cut(true);
        let recovered = recover(
            &config(self.scenario.dedup_capacity),
            Box::new(self.disk.dir("data")),
            Box::new(self.disk.dir("state")),
            seed,
            Time::from_millis(self.now),
            plants,
        );
        if self.power_cut_happened() {
            return;
        }
        let recovered = match recovered {
            Ok(recovered) => recovered,
            Err(e) => {
                self.history
                    .violations
                    .push(format!("recovery failed at {}: {e}", self.now));
                return;
            }
        };
        let mut core = recovered.core;
        core.set_tracing(true);
        let grants = core.snapshot().grants;
        self.history.on_recover(self.now, &grants);
        let (wal, files) = recovered.persister.into_parts();
        self.server.incarnation += 1;
        self.server.node = Some(Node {
            core,
            wal,
            files,
            routes: BTreeMap::new(),
            calls_of: BTreeMap::new(),
            next_call: 0,
            open: Batch::default(),
            flight: None,
            synced: None,
            deadline: None,
            snapshot_write: None,
        });
        self.log(|| format!("server up: {} grants recovered", grants.len()));
        self.arm_deadline();
    }

    /// Completes whatever the pipeline holds (end of the run).
    pub(super) fn server_drain(&mut self) {
        for _ in 0..16 {
            let incarnation = self.server.incarnation;
            let Some(node) = self.node() else {
                return;
            };
            if node.flight.is_some() {
                self.server_synced(incarnation);
            } else if node.synced.is_some() {
                self.server_replies_out(incarnation);
            } else if !node.open.is_empty() {
                self.pump();
            } else {
                return;
            }
        }
    }

    /// What a reader of each data file sees now.
    pub(super) fn server_files(&self) -> Vec<Vec<u8>> {
        FileIndex::all()
            .map(|f| self.disk.read("data", &f.name()))
            .collect()
    }
}
