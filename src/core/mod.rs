//! The sans-IO lock/file state machine.
//!
//! `Core` owns every rule of the service — named locks, FIFO waiters, leases,
//! tokens and fencing numbers, staged appends, request-id dedup — and nothing
//! else: no socket, no file, no clock, no thread, no global randomness. Time
//! comes in as an argument, randomness as a seed, and every effect goes out as
//! an [`Output`] value. Given the same inputs it gives the same outputs.
//!
//! # Calling rule
//!
//! A driver (the server shell, a test, the simulation) must:
//!
//! 1. feed each input with [`Core::handle`]`(now, input)`, and call
//!    [`Core::tick`]`(now)` whenever [`Core::next_deadline`] has passed;
//!    a spurious or late tick is harmless, and `now` never goes backwards
//!    (an earlier `now` is treated as the latest one seen);
//! 2. take the returned outputs **in order**: every [`Output::Persist`] must
//!    be durable before any [`Output::Write`] or [`Output::Reply`] that follows
//!    it is applied or sent (group commit: one fsync may cover the records of
//!    many inputs, as long as the order holds);
//! 3. apply [`Output::Write`]s to the data files at their exact offsets, in
//!    order, before sending the replies that follow them;
//! 4. after each input, read [`Core::next_deadline`] again.
//!
//! Recovery is [`Core::restore`] from the last snapshot, [`Core::replay`] of
//! every record logged after it (re-applying the writes it returns), then
//! [`Core::resume`]`(now)`, which gives every surviving grant a fresh lease.

// Purity is enforced: clippy.toml lists the clock, randomness, thread and
// task calls that may not appear under the core.
#![deny(clippy::disallowed_methods)]

pub mod dedup;
pub mod locks;
pub mod records;
pub mod staging;
pub mod time;
pub mod timers;
pub mod types;

use std::collections::BTreeMap;
use std::sync::Arc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use dedup::{Dedup, IdHash, Keys, Seen, WaiterId};
use locks::{validate_lock_name, Grant, LockState, Waiter};
use records::{AnswerSnapshot, Change, GrantSnapshot, Record, Snapshot};
use staging::{FileIndex, FileLengths, FileWrite, StagedAppend};
use time::{Millis, Time};
use timers::{Timer, Timers};
use types::{
    CallId, ClientId, Fence, LockName, LockView, RefusalCode, Reply, Request, RequestId,
    RequestKind, Token, DEFAULT_LOCK,
};

/// Limits and defaults of the core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Lease of a grant whose acquire names none.
    pub default_lease: Millis,
    /// Shortest lease a client may ask for.
    pub min_lease: Millis,
    /// Longest lease a client may ask for.
    pub max_lease: Millis,
    /// Longest wait timeout a client may ask for (absent means forever).
    pub max_wait: Millis,
    /// Largest single append.
    pub max_append_bytes: usize,
    /// Most bytes staged under one grant.
    pub max_staged_bytes: u64,
    /// How many answers the dedup table keeps.
    pub dedup_capacity: usize,
    /// Most cut-off waiters whose places are kept at once. A waiter cut off
    /// while this many are kept leaves the queue at once, as one without a
    /// request id does (its retry queues again at the back): without a
    /// bound, acquires that are sent and dropped, each with a new request
    /// id, would each hold memory for up to `max_lease`.
    pub max_detached: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            default_lease: Millis::from_secs(30),
            min_lease: Millis(10),
            max_lease: Millis::from_secs(3600),
            max_wait: Millis::from_secs(24 * 3600),
            max_append_bytes: 1 << 20,
            max_staged_bytes: 64 << 20,
            dedup_capacity: 100_000,
            max_detached: 100_000,
        }
    }
}

/// Test-only switches that plant known bugs, so that the simulation's checker
/// can be shown to catch them. All off in production.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plants {
    /// Forget request ids: every retry is applied again.
    pub dedup_off: bool,
    /// Grant to the newest waiter instead of the oldest.
    pub lifo_grants: bool,
    /// Do not give surviving grants a lease on restart (they never run out).
    pub no_rearm: bool,
    /// Accept appends with a token whose lease ran out.
    pub stale_appends: bool,
    /// Serve a retry whose answer was forgotten (never `RequestExpired`).
    pub floors_off: bool,
    /// Not the core's: the server holds the answer to a waiting call (a
    /// grant handed over, a wait that ran out: any answer to another call
    /// than the one being stepped) until the next acquire arrives — the
    /// waiter's own at the latest, when its attempt is cut off and
    /// re-attaches. Nothing is lost and nothing applied twice; the waiter
    /// only hears late, or from the dedup table. Read by
    /// [`crate::server::Node::start`].
    pub late_grants: bool,
}

/// Something that happened to the core: a call, or a call cut off.
#[derive(Clone, Debug)]
pub enum Input {
    /// A request; its reply will be addressed to `id`.
    Call {
        id: CallId,
        request_id: RequestId,
        request: Request,
    },
    /// The call `id` was cut off (client deadline, dropped connection).
    CallDropped(CallId),
}

/// An effect the driver must carry out, in order (see the calling rule).
#[derive(Clone, Debug)]
pub enum Output {
    /// Make this record durable before anything that follows.
    Persist(Record),
    /// Write to a data file at an exact offset.
    Write(FileWrite),
    /// Send this reply to call `call`.
    Reply { call: CallId, reply: Reply },
    /// A queue event, only when tracing is on; needs no action.
    Trace(Trace),
}

/// What happened to a wait queue, reported only when tracing is on (the
/// simulation's checker follows queues with it; production leaves it off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trace {
    /// A waiter joined the back of `lock`'s queue.
    Enqueued {
        lock: LockName,
        waiter: WaiterId,
        client: ClientId,
    },
    /// The waiter left the queue: granted (`fence`) or gone (`None`: wait
    /// timeout, session closed, cut off and not back in time).
    Dequeued {
        lock: LockName,
        waiter: WaiterId,
        granted: Option<Fence>,
    },
}

/// A log that does not fit the state it is replayed onto.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    /// A grant was logged for a lock that was still held.
    #[error("grant {fence:?} of lock {lock:?} logged while the lock was held")]
    AlreadyHeld { lock: LockName, fence: Fence },
    /// A release, an end or an append names a grant that is not current.
    #[error("change names grant {fence:?} of lock {lock:?}, which is not current")]
    NotCurrent { lock: LockName, fence: Fence },
}

/// What one input did, gathered so it can be emitted in the safe order.
#[derive(Default)]
struct Step {
    changes: Vec<Change>,
    writes: Vec<FileWrite>,
    /// The replies, as outputs already: the vector handed out, with the
    /// rest put in front of them (one allocation per call, not two).
    replies: Vec<Output>,
    traces: Vec<Trace>,
}

impl Step {
    fn reply(&mut self, call: CallId, reply: Reply) {
        if self.replies.capacity() == 0 {
            // Room for the record and a second reply without growing.
            self.replies.reserve_exact(4);
        }
        self.replies.push(Output::Reply { call, reply });
    }

    fn finish(self) -> Vec<Output> {
        let persist = (!self.changes.is_empty()).then(|| {
            Output::Persist(Record {
                changes: self.changes,
            })
        });
        let mut out = self.replies;
        if persist.is_none() && self.traces.is_empty() && self.writes.is_empty() {
            return out;
        }
        // The rest goes in front of the replies: pushed behind them, then
        // rotated to the front (a few moves; a splice at the front took
        // its general path, ~400 instructions a step).
        let replies = out.len();
        out.extend(self.traces.into_iter().map(Output::Trace));
        out.extend(persist);
        out.extend(self.writes.into_iter().map(Output::Write));
        out.rotate_left(replies);
        out
    }
}

/// The state machine. See the module docs for the calling rule.
pub struct Core {
    config: CoreConfig,
    plants: Plants,
    /// Source of tokens; seeded by the driver (OS entropy in production).
    rng: ChaCha20Rng,
    /// The latest time seen.
    now: Time,
    /// Locks that are held or waited for; idle locks are forgotten.
    locks: BTreeMap<LockName, LockState>,
    /// The last fencing number handed out, over all locks.
    last_fence: Fence,
    /// Committed length of each data file.
    files: FileLengths,
    dedup: Dedup,
    timers: Timers,
    /// Which lock each queued waiter stands in. (B-trees, not hash maps:
    /// std's hash maps draw their keys from the OS, which the core must
    /// not; these keys are the server's own numbers.)
    waiter_locks: BTreeMap<WaiterId, LockName>,
    /// Which waiter each open call waits as.
    open_calls: BTreeMap<CallId, WaiterId>,
    next_waiter: WaiterId,
    /// How many queued waiters are cut off with their places kept.
    detached: usize,
    /// Emit [`Output::Trace`] events.
    tracing: bool,
}

/// The dedup table's hash keys, drawn from `seed` on a stream of its own:
/// the tokens' stream (stream 0) is the same as without them.
fn dedup_keys(seed: [u8; 32]) -> Keys {
    let mut rng = ChaCha20Rng::from_seed(seed);
    rng.set_stream(1);
    Keys(rng.next_u64(), rng.next_u64())
}

impl Core {
    /// A core with no state, started at time zero.
    pub fn new(config: CoreConfig, seed: [u8; 32]) -> Core {
        let mut core = Core::restore(config, seed, Snapshot::default());
        core.resume(Time::ZERO);
        core
    }

    /// A core holding the state of `snapshot`, not yet started: replay the
    /// records logged after the snapshot, then call [`Core::resume`].
    pub fn restore(config: CoreConfig, seed: [u8; 32], snapshot: Snapshot) -> Core {
        let mut dedup = Dedup::new(config.dedup_capacity, dedup_keys(seed));
        for (i, floor) in snapshot.floors.iter().enumerate() {
            let raised = snapshot.floors_raised.get(i).copied().unwrap_or(true);
            dedup.restore_floor(floor, raised);
        }
        for answer in snapshot.answers {
            dedup.restore(answer);
        }
        let mut locks = BTreeMap::new();
        for g in snapshot.grants {
            let staged: Vec<StagedAppend> = g
                .staged
                .into_iter()
                .map(|(file, content)| StagedAppend { file, content })
                .collect();
            let staged_bytes = staged.iter().map(|s| s.content.len() as u64).sum();
            let grant = Grant {
                client: g.client,
                token: g.token,
                fence: g.fence,
                lease: g.lease,
                deadline: Time::ZERO,
                staged,
                staged_bytes,
            };
            locks.insert(
                g.lock,
                LockState {
                    holder: Some(grant),
                    waiters: Default::default(),
                },
            );
        }
        Core {
            config,
            plants: Plants::default(),
            rng: ChaCha20Rng::from_seed(seed),
            now: Time::ZERO,
            locks,
            last_fence: snapshot.last_fence,
            files: snapshot.file_lengths,
            dedup,
            timers: Timers::default(),
            waiter_locks: BTreeMap::new(),
            open_calls: BTreeMap::new(),
            next_waiter: 0,
            detached: 0,
            tracing: false,
        }
    }

    /// Turns [`Output::Trace`] events on or off.
    pub fn set_tracing(&mut self, on: bool) {
        self.tracing = on;
    }

    /// Turns planted bugs on (tests of the checker only).
    pub fn set_plants(&mut self, plants: Plants) {
        self.plants = plants;
    }

    /// The planted bugs turned on (none in production).
    pub fn plants(&self) -> Plants {
        self.plants
    }

    /// Before [`Core::replay`]: the log to be replayed holds `answers`
    /// [`Change::Answered`] changes (or more). The answers the dedup table
    /// would evict before the replay ends are then never put in it, which
    /// leaves the same table (see [`Dedup::plan_replay`]) in a fraction of
    /// the time for a long log. Optional.
    pub fn plan_replay(&mut self, answers: u64) {
        self.dedup.plan_replay(answers);
    }

    /// Applies one logged record during recovery; returns the file writes it
    /// committed, which the driver re-applies (idempotent: exact offsets).
    ///
    /// # Errors
    /// [`ReplayError`] when the record does not fit the state: the log is
    /// not this state's, and the server must not start on it.
    pub fn replay(&mut self, record: Record) -> Result<Vec<FileWrite>, ReplayError> {
        let mut writes = Vec::new();
        for change in record.changes {
            match change {
                Change::Granted {
                    lock,
                    client,
                    token,
                    fence,
                    lease,
                } => {
                    if self.locks.get(&lock).is_some_and(|s| s.holder.is_some()) {
                        return Err(ReplayError::AlreadyHeld { lock, fence });
                    }
                    self.locks.entry(lock).or_default().holder = Some(Grant {
                        client,
                        token,
                        fence,
                        lease,
                        deadline: Time::ZERO,
                        staged: Vec::new(),
                        staged_bytes: 0,
                    });
                    self.last_fence = self.last_fence.max(fence);
                }
                Change::Released { lock, fence } => {
                    let grant = self.take_current(&lock, fence)?;
                    self.files.commit(grant.staged, &mut writes);
                }
                Change::Ended { lock, fence } => {
                    self.take_current(&lock, fence)?;
                }
                Change::Staged {
                    fence,
                    file,
                    content,
                } => {
                    let not_current = || ReplayError::NotCurrent {
                        lock: DEFAULT_LOCK.into(),
                        fence,
                    };
                    let state = self.locks.get_mut(DEFAULT_LOCK).ok_or_else(not_current)?;
                    let grant = state
                        .holder
                        .as_mut()
                        .filter(|g| g.fence == fence)
                        .ok_or_else(not_current)?;
                    grant.staged_bytes += content.len() as u64;
                    grant.staged.push(StagedAppend { file, content });
                }
                Change::Answered(answer) => self.dedup.replayed(answer),
                Change::LeaseSet { lock, fence, lease } => {
                    let not_current = || ReplayError::NotCurrent {
                        lock: lock.clone(),
                        fence,
                    };
                    let grant = self
                        .locks
                        .get_mut(&lock)
                        .and_then(|s| s.holder.as_mut())
                        .filter(|g| g.fence == fence)
                        .ok_or_else(not_current)?;
                    grant.lease = lease;
                }
            }
        }
        Ok(writes)
    }

    fn take_current(&mut self, lock: &str, fence: Fence) -> Result<Grant, ReplayError> {
        let not_current = || ReplayError::NotCurrent {
            lock: lock.into(),
            fence,
        };
        let state = self.locks.get_mut(lock).ok_or_else(not_current)?;
        if state.holder.as_ref().map(|g| g.fence) != Some(fence) {
            return Err(not_current());
        }
        let grant = state.holder.take().ok_or_else(not_current)?;
        if state.is_idle() {
            self.locks.remove(lock);
        }
        Ok(grant)
    }

    /// Starts a restored core at `now`: every surviving grant gets a fresh
    /// lease, since the driver cannot know how long it was down.
    pub fn resume(&mut self, now: Time) {
        self.now = self.now.max(now);
        self.dedup.plan_replay(0);
        if self.plants.no_rearm {
            return;
        }
        for (name, state) in &mut self.locks {
            if let Some(grant) = &mut state.holder {
                grant.deadline = self.now.plus(grant.lease);
                self.timers.arm(grant.deadline, Timer::Lease(name.clone()));
            }
        }
    }

    /// The durable state as one value, to be written as a snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let grants = self
            .locks
            .iter()
            .filter_map(|(name, state)| {
                state.holder.as_ref().map(|g| GrantSnapshot {
                    lock: name.clone(),
                    client: g.client,
                    token: g.token.clone(),
                    fence: g.fence,
                    lease: g.lease,
                    staged: g
                        .staged
                        .iter()
                        .map(|s| (s.file, s.content.clone()))
                        .collect(),
                })
            })
            .collect();
        let (floors, floors_raised) = self.dedup.floors();
        Snapshot {
            last_fence: self.last_fence,
            file_lengths: self.files.clone(),
            grants,
            answers: self.dedup.answers(),
            floors,
            floors_raised,
        }
    }

    /// The earliest time at which [`Core::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Time> {
        self.timers.next()
    }

    /// The latest time seen.
    pub fn now(&self) -> Time {
        self.now
    }

    /// The limits in force.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The committed length of a data file.
    pub fn file_length(&self, file: FileIndex) -> u64 {
        self.files.get(file)
    }

    /// Lets time pass: ends leases, wait timeouts and kept places that are due.
    pub fn tick(&mut self, now: Time) -> Vec<Output> {
        let mut step = Step::default();
        self.advance(now, &mut step);
        step.finish()
    }

    /// Feeds one input (after letting time pass to `now`).
    pub fn handle(&mut self, now: Time, input: Input) -> Vec<Output> {
        let mut step = Step::default();
        self.advance(now, &mut step);
        match input {
            Input::Call {
                id,
                request_id,
                request,
            } => self.call(id, request_id, request, &mut step),
            Input::CallDropped(id) => self.dropped(id, &mut step),
        }
        step.finish()
    }

    fn advance(&mut self, now: Time, step: &mut Step) {
        self.now = self.now.max(now);
        while let Some((at, timer)) = self.timers.pop_due(self.now) {
            self.fire(at, timer, step);
        }
    }

    fn fire(&mut self, at: Time, timer: Timer, step: &mut Step) {
        match timer {
            Timer::Lease(lock) => {
                let due = self
                    .locks
                    .get(&lock)
                    .and_then(|s| s.holder.as_ref())
                    .is_some_and(|g| g.deadline == at);
                if due {
                    self.end_grant(lock, false, step);
                }
            }
            Timer::Wait(id) => {
                if self.waiter(id).is_some_and(|w| w.wait_deadline == Some(at)) {
                    if let Some(w) = self.remove_waiter(id, None, step) {
                        let reply = Reply::refused(
                            RefusalCode::WaitTimeout,
                            "wait timeout passed before the lock was granted",
                        );
                        self.answer_waiter(w, reply, step);
                    }
                }
            }
            Timer::Detached(id) => {
                let due = self
                    .waiter(id)
                    .is_some_and(|w| w.detached_until == Some(at) && w.calls.is_empty());
                if due {
                    self.give_up_place(id, step);
                }
            }
        }
    }

    fn call(&mut self, call: CallId, request_id: RequestId, request: Request, step: &mut Step) {
        // Before the dedup table: an oversized id or name must not be
        // remembered (nor echoed into a remembered refusal), or the table's
        // bound in answers would be no bound in bytes.
        if let Err(reason) = check_arguments(&request_id, &request) {
            step.reply(call, Reply::refused(RefusalCode::InvalidArgument, reason));
            return;
        }
        let kind = request.kind();
        let client = request.client().unwrap_or_default();
        let dedup = !request_id.is_empty() && kind != RequestKind::Status && !self.plants.dedup_off;
        // The id is hashed once, for the lookup and for the answer.
        let id_hash = dedup.then(|| self.dedup.id_hash(client, &request_id));
        if let Some(hash) = id_hash {
            match self.dedup.get_hashed(hash, client, &request_id) {
                Some(Seen::Answered(answer)) => {
                    let reply = if answer.kind == kind {
                        answer.reply.clone()
                    } else {
                        reused_request_id()
                    };
                    step.reply(call, reply);
                    return;
                }
                Some(Seen::Waiting(waiter)) => {
                    if kind == RequestKind::Acquire {
                        self.reattach(waiter, call);
                    } else {
                        step.reply(call, reused_request_id());
                    }
                    return;
                }
                // Answered once, maybe, and forgotten since: serving it
                // could apply it twice. Refused, and nothing remembered
                // (the floor only rises, so a retry is refused again).
                None if !self.plants.floors_off && self.dedup.expired(client, &request_id) => {
                    let reason = format!(
                        "request id {request_id:?} is older than the answers this server \
                         still remembers: it may or may not have taken effect"
                    );
                    step.reply(call, Reply::refused(RefusalCode::RequestExpired, reason));
                    return;
                }
                None => {}
            }
        }
        let outcome = match request {
            Request::ClientInit { .. } => Some(Reply::Done),
            Request::ClientClose { client } => Some(self.close(client, step)),
            Request::Acquire {
                client,
                lock,
                wait,
                lease,
            } => self.acquire(call, client, &request_id, id_hash, lock, wait, lease, step),
            Request::Release {
                client,
                lock,
                token,
            } => Some(self.release(client, lock, &token, step)),
            Request::Renew {
                client,
                lock,
                token,
                lease,
            } => Some(self.renew(client, lock, &token, lease, step)),
            Request::Append {
                client,
                file,
                content,
                token,
            } => Some(self.append(client, &file, content, &token, step)),
            Request::Status => Some(self.status()),
        };
        if let Some(reply) = outcome {
            if let Some(hash) = id_hash {
                self.remember(client, request_id, Some(hash), kind, &reply, step);
            }
            step.reply(call, reply);
        }
    }

    fn lease_arg(&self, lease: Option<Millis>) -> Result<Option<Millis>, Reply> {
        match lease {
            Some(l) if l < self.config.min_lease || l > self.config.max_lease => {
                Err(Reply::refused(
                    RefusalCode::InvalidArgument,
                    format!(
                        "lease of {} ms is outside {}..={} ms",
                        l.0, self.config.min_lease.0, self.config.max_lease.0
                    ),
                ))
            }
            other => Ok(other),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        call: CallId,
        client: ClientId,
        request_id: &str,
        id_hash: Option<IdHash>,
        lock: LockName,
        wait: Option<Millis>,
        lease: Option<Millis>,
        step: &mut Step,
    ) -> Option<Reply> {
        let lease = match self.lease_arg(lease) {
            Ok(lease) => lease,
            Err(refusal) => return Some(refusal),
        };
        if let Some(w) = wait.filter(|w| *w > self.config.max_wait) {
            let reason = format!(
                "wait timeout of {} ms exceeds {} ms",
                w.0, self.config.max_wait.0
            );
            return Some(Reply::refused(RefusalCode::InvalidArgument, reason));
        }
        let now = self.now;
        // Looked up by reference: a free lock is granted under the
        // request's own name, which becomes the table's key (no copy of it
        // made just to look it up).
        match self.locks.get_mut(&lock) {
            Some(LockState {
                holder: Some(grant),
                ..
            }) if grant.client == client => {
                // Re-acquire by the holder: the same grant, with a renewed
                // lease, as a renew renews it (see `extend_lease`); the
                // answer names the length asked for.
                let old = grant.deadline;
                let lease = lease.unwrap_or(grant.lease);
                extend_lease(&lock, grant, now, lease, step);
                let mut info = grant.info(&lock);
                info.lease = lease;
                let new = grant.deadline;
                self.timers.rearm(old, new, Timer::Lease(lock));
                Some(Reply::Granted(info))
            }
            Some(LockState {
                holder: Some(grant),
                waiters,
            }) => {
                if wait == Some(Millis(0)) {
                    let reason = format!("lock {lock:?} is held by client {}", grant.client);
                    return Some(Reply::refused(RefusalCode::LockHeld, reason));
                }
                let id = self.next_waiter;
                self.next_waiter += 1;
                let waiter = Waiter {
                    id,
                    client,
                    request_id: request_id.to_owned(),
                    request_hash: id_hash,
                    calls: vec![call],
                    lease: lease.unwrap_or(self.config.default_lease),
                    wait_deadline: wait.map(|w| now.plus(w)),
                    detached_until: None,
                };
                if let Some(at) = waiter.wait_deadline {
                    self.timers.arm(at, Timer::Wait(id));
                }
                waiters.push_back(waiter);
                if self.tracing {
                    step.traces.push(Trace::Enqueued {
                        lock: lock.clone(),
                        waiter: id,
                        client,
                    });
                }
                self.waiter_locks.insert(id, lock);
                self.open_calls.insert(call, id);
                if let Some(hash) = id_hash {
                    self.dedup.wait_hashed(hash, client, request_id, id);
                }
                None
            }
            // Free (a lock without a holder has no waiters).
            _ => {
                let lease = lease.unwrap_or(self.config.default_lease);
                let info = self.grant(lock, client, lease, step);
                Some(Reply::Granted(info))
            }
        }
    }

    /// Makes a new grant of the free lock `lock`.
    fn grant(
        &mut self,
        lock: LockName,
        client: ClientId,
        lease: Millis,
        step: &mut Step,
    ) -> types::GrantInfo {
        let fence = self.next_fence();
        self.last_fence = fence;
        let token = self.new_token();
        let deadline = self.now.plus(lease);
        self.timers.arm(deadline, Timer::Lease(lock.clone()));
        step.changes.push(Change::Granted {
            lock: lock.clone(),
            client,
            token: token.clone(),
            fence,
            lease,
        });
        let grant = Grant {
            client,
            token,
            fence,
            lease,
            deadline,
            staged: Vec::new(),
            staged_bytes: 0,
        };
        let info = grant.info(&lock);
        self.locks.entry(lock).or_default().holder = Some(grant);
        info
    }

    /// The fencing number the next grant gets.
    fn next_fence(&self) -> Fence {
        Fence(self.last_fence.0 + 1)
    }

    fn new_token(&mut self) -> Token {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [0u8; 16];
        self.rng.fill_bytes(&mut bytes);
        // Spelled on the stack: the shared string is the one allocation.
        let mut hex = [0u8; 32];
        for (pair, b) in hex.chunks_exact_mut(2).zip(bytes) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 15)];
        }
        Token::from(std::str::from_utf8(&hex).unwrap_or_default())
    }

    /// Ends the current grant of `lock` (committing its staged appends when
    /// `released`) and grants the lock to the next waiter.
    fn end_grant(&mut self, lock: LockName, released: bool, step: &mut Step) {
        let Some(state) = self.locks.get_mut(&lock) else {
            return;
        };
        let Some(grant) = state.holder.take() else {
            return;
        };
        self.timers
            .disarm(grant.deadline, Timer::Lease(LockName::clone(&lock)));
        if released {
            step.changes.push(Change::Released {
                lock: LockName::clone(&lock),
                fence: grant.fence,
            });
            self.files.commit(grant.staged, &mut step.writes);
        } else {
            step.changes.push(Change::Ended {
                lock: LockName::clone(&lock),
                fence: grant.fence,
            });
        }
        self.grant_next(lock, step);
    }

    /// Grants the free lock `lock` to its first waiter, or forgets the lock.
    fn grant_next(&mut self, lock: LockName, step: &mut Step) {
        let next = self.locks.get(&lock).and_then(|state| {
            if self.plants.lifo_grants {
                state.waiters.back().map(|w| w.id)
            } else {
                state.waiters.front().map(|w| w.id)
            }
        });
        let fence = self.next_fence();
        match next.and_then(|id| self.remove_waiter(id, Some(fence), step)) {
            Some(waiter) => {
                let client = waiter.client;
                let info = self.grant(LockName::clone(&lock), client, waiter.lease, step);
                self.answer_waiter(waiter, Reply::Granted(info.clone()), step);
                // The new holder's other acquires of this lock, queued
                // behind (another process of the same client, or a new
                // operation behind a cut-off one): an acquire by the holder
                // gets its grant, whenever it arrived. They leave the queue
                // without a grant of their own; the others keep their order.
                let same: Vec<WaiterId> = self.locks.get(&lock).map_or_else(Vec::new, |state| {
                    state
                        .waiters
                        .iter()
                        .filter(|w| w.client == client)
                        .map(|w| w.id)
                        .collect()
                });
                for id in same {
                    if let Some(waiter) = self.remove_waiter(id, None, step) {
                        self.answer_waiter(waiter, Reply::Granted(info.clone()), step);
                    }
                }
            }
            None => {
                if self.locks.get(&lock).is_some_and(LockState::is_idle) {
                    self.locks.remove(&lock);
                }
            }
        }
    }

    /// Answers every call of a waiter that has left its queue, and remembers
    /// the answer for its request id.
    fn answer_waiter(&mut self, waiter: Waiter, reply: Reply, step: &mut Step) {
        if !waiter.request_id.is_empty() && !self.plants.dedup_off {
            self.remember(
                waiter.client,
                waiter.request_id,
                waiter.request_hash,
                RequestKind::Acquire,
                &reply,
                step,
            );
        }
        for call in waiter.calls {
            step.reply(call, reply.clone());
        }
    }

    /// Remembers the answer to a request id, in memory and in the log, so a
    /// retry, a duplicate or a replay after a restart gets it again. A refusal
    /// of a malformed argument is not remembered: it depends on the request
    /// alone, so it is the same every time and writes nothing.
    fn remember(
        &mut self,
        client: ClientId,
        request_id: RequestId,
        hash: Option<IdHash>,
        kind: RequestKind,
        reply: &Reply,
        step: &mut Step,
    ) {
        if matches!(reply, Reply::Refused(r) if r.code == RefusalCode::InvalidArgument) {
            return;
        }
        let hash = hash.unwrap_or_else(|| self.dedup.id_hash(client, &request_id));
        let answer = Arc::new(AnswerSnapshot {
            client,
            request_id: request_id.into_boxed_str(),
            kind,
            reply: reply.clone(),
        });
        self.dedup.answer_hashed(hash, answer.clone());
        step.changes.push(Change::Answered(answer));
    }

    fn waiter(&self, id: WaiterId) -> Option<&Waiter> {
        let lock = self.waiter_locks.get(&id)?;
        self.locks.get(lock)?.waiters.iter().find(|w| w.id == id)
    }

    /// Takes a waiter out of its queue and out of every index and timer.
    fn remove_waiter(
        &mut self,
        id: WaiterId,
        granted: Option<Fence>,
        step: &mut Step,
    ) -> Option<Waiter> {
        let lock = self.waiter_locks.remove(&id)?;
        let state = self.locks.get_mut(&lock)?;
        let waiter = state.remove_waiter(id)?;
        if self.tracing {
            step.traces.push(Trace::Dequeued {
                lock: lock.clone(),
                waiter: id,
                granted,
            });
        }
        if state.is_idle() {
            self.locks.remove(&lock);
        }
        for call in &waiter.calls {
            self.open_calls.remove(call);
        }
        if let Some(at) = waiter.wait_deadline {
            self.timers.disarm(at, Timer::Wait(id));
        }
        if let Some(at) = waiter.detached_until {
            self.timers.disarm(at, Timer::Detached(id));
            self.detached -= 1;
        }
        Some(waiter)
    }

    /// Removes a cut-off waiter and forgets its request id's wait: a retry
    /// with that id queues again, at the back.
    fn give_up_place(&mut self, id: WaiterId, step: &mut Step) {
        if let Some(w) = self.remove_waiter(id, None, step) {
            self.dedup.forget_waiter(w.client, &w.request_id);
        }
    }

    /// A retry of a queued acquire: the call joins the waiter, which keeps its place.
    fn reattach(&mut self, id: WaiterId, call: CallId) {
        let Some(lock) = self.waiter_locks.get(&id) else {
            return;
        };
        let Some(waiter) = self.locks.get_mut(lock).and_then(|s| s.waiter_mut(id)) else {
            return;
        };
        waiter.calls.push(call);
        let kept = waiter.detached_until.take();
        self.open_calls.insert(call, id);
        if let Some(at) = kept {
            self.timers.disarm(at, Timer::Detached(id));
            self.detached -= 1;
        }
    }

    fn dropped(&mut self, call: CallId, step: &mut Step) {
        let Some(id) = self.open_calls.remove(&call) else {
            return;
        };
        let now = self.now;
        let Some(lock) = self.waiter_locks.get(&id) else {
            return;
        };
        let Some(waiter) = self.locks.get_mut(lock).and_then(|s| s.waiter_mut(id)) else {
            return;
        };
        waiter.calls.retain(|c| *c != call);
        if !waiter.calls.is_empty() {
            return;
        }
        if waiter.request_id.is_empty() {
            // Nobody can come back for it: leave at once.
            self.remove_waiter(id, None, step);
        } else if self.detached >= self.config.max_detached {
            // No room to keep its place: a retry queues again.
            self.give_up_place(id, step);
        } else {
            // Keep the place for one lease period for a retry with the same id.
            let until = now.plus(waiter.lease);
            waiter.detached_until = Some(until);
            self.timers.arm(until, Timer::Detached(id));
            self.detached += 1;
        }
    }

    /// Checks that `token` is the current grant of `lock` and belongs to `client`.
    fn check_token(&self, client: ClientId, lock: &str, token: &str) -> Result<&Grant, Reply> {
        let Some(grant) = self.locks.get(lock).and_then(|s| s.holder.as_ref()) else {
            return Err(Reply::refused(
                RefusalCode::LockNotHeld,
                format!("lock {lock:?} is not held"),
            ));
        };
        if *grant.token != *token {
            return Err(Reply::refused(
                RefusalCode::InvalidToken,
                format!(
                    "token is not the current grant of lock {lock:?} (stale, run out or unknown)"
                ),
            ));
        }
        if grant.client != client {
            return Err(Reply::refused(
                RefusalCode::PermissionDenied,
                format!(
                    "lock {lock:?} is held by client {}, not {client}",
                    grant.client
                ),
            ));
        }
        Ok(grant)
    }

    fn release(&mut self, client: ClientId, lock: LockName, token: &str, step: &mut Step) -> Reply {
        if let Err(refusal) = self.check_token(client, &lock, token) {
            return refusal;
        }
        self.end_grant(lock, true, step);
        Reply::Done
    }

    fn renew(
        &mut self,
        client: ClientId,
        lock: LockName,
        token: &str,
        lease: Option<Millis>,
        step: &mut Step,
    ) -> Reply {
        let lease = match self.lease_arg(lease) {
            Ok(lease) => lease,
            Err(refusal) => return refusal,
        };
        if let Err(refusal) = self.check_token(client, &lock, token) {
            return refusal;
        }
        let now = self.now;
        let Some(grant) = self.locks.get_mut(&lock).and_then(|s| s.holder.as_mut()) else {
            return Reply::refused(RefusalCode::LockNotHeld, "lock is not held");
        };
        let old = grant.deadline;
        let lease = lease.unwrap_or(grant.lease);
        extend_lease(&lock, grant, now, lease, step);
        let new = grant.deadline;
        self.timers.rearm(old, new, Timer::Lease(lock));
        Reply::Renewed { lease }
    }

    fn append(
        &mut self,
        client: ClientId,
        file: &str,
        content: bytes::Bytes,
        token: &str,
        step: &mut Step,
    ) -> Reply {
        let file = match FileIndex::parse(file) {
            Ok(file) => file,
            Err(reason) => return Reply::refused(RefusalCode::InvalidArgument, reason),
        };
        if content.len() > self.config.max_append_bytes {
            let reason = format!(
                "content is {} bytes; at most {} per append",
                content.len(),
                self.config.max_append_bytes
            );
            return Reply::refused(RefusalCode::InvalidArgument, reason);
        }
        if let Err(refusal) = self.check_token(client, DEFAULT_LOCK, token) {
            if !self.plants.stale_appends {
                return refusal;
            }
        }
        let max_staged = self.config.max_staged_bytes;
        let Some(grant) = self
            .locks
            .get_mut(DEFAULT_LOCK)
            .and_then(|s| s.holder.as_mut())
        else {
            return Reply::refused(RefusalCode::LockNotHeld, "the default lock is not held");
        };
        if grant.staged_bytes + content.len() as u64 > max_staged {
            let reason = format!("more than {max_staged} bytes staged under one grant");
            return Reply::refused(RefusalCode::StagedLimit, reason);
        }
        grant.staged_bytes += content.len() as u64;
        grant.staged.push(StagedAppend {
            file,
            content: content.clone(),
        });
        step.changes.push(Change::Staged {
            fence: grant.fence,
            file,
            content,
        });
        Reply::Done
    }

    fn close(&mut self, client: ClientId, step: &mut Step) -> Reply {
        // Cancel the client's waits first, so that ending its grants does not
        // hand a lock to the client's own waiter.
        let waiting: Vec<WaiterId> = self
            .locks
            .values()
            .flat_map(|s| s.waiters.iter())
            .filter(|w| w.client == client)
            .map(|w| w.id)
            .collect();
        for id in waiting {
            if let Some(waiter) = self.remove_waiter(id, None, step) {
                let reply = Reply::refused(
                    RefusalCode::SessionClosed,
                    "the client's session was closed",
                );
                self.answer_waiter(waiter, reply, step);
            }
        }
        let held: Vec<LockName> = self
            .locks
            .iter()
            .filter(|(_, s)| s.holder.as_ref().is_some_and(|g| g.client == client))
            .map(|(name, _)| name.clone())
            .collect();
        for lock in held {
            self.end_grant(lock, false, step);
        }
        Reply::Done
    }

    fn status(&self) -> Reply {
        let locks = self
            .locks
            .iter()
            .map(|(name, state)| LockView {
                lock: name.clone(),
                holder: state.holder.as_ref().map(|g| g.client),
                fence: state.holder.as_ref().map(|g| g.fence).unwrap_or_default(),
                lease_left: state
                    .holder
                    .as_ref()
                    .map(|g| self.now.until(g.deadline))
                    .unwrap_or_default(),
                waiters: state
                    .waiters
                    .iter()
                    .map(|w| (w.client, w.calls.is_empty()))
                    .collect(),
                staged_appends: state
                    .holder
                    .as_ref()
                    .map(|g| g.staged.len() as u64)
                    .unwrap_or_default(),
            })
            .collect();
        Reply::Status {
            locks,
            last_fence: self.last_fence,
        }
    }
}

/// Makes `lease` the length of `grant`'s leases from now on, logging it if
/// it changed: the holder was told this length, so a restart (which gives
/// every grant a fresh lease of its length) must not give it a shorter one.
/// Renews `grant` at `now` for `lease`: the lease then ends `lease` from
/// now, and later renewals without a length of their own take this one. A
/// renewal extends a lease and never ends it sooner, so a length that would
/// end before the deadline already given changes nothing, neither the
/// deadline nor the length kept (which a restart grants afresh: recording
/// the shorter one would let a restart end the lease sooner). A holder's
/// guard may be counting on the deadline it was last given; a renewal with
/// a shorter lease by another process of the same client must not end the
/// lease under it. The caller's answer names `lease`, which ends no later
/// than the lease does.
fn extend_lease(lock: &LockName, grant: &mut Grant, now: Time, lease: Millis, step: &mut Step) {
    let until = now.plus(lease);
    if until >= grant.deadline {
        set_lease(lock, grant, lease, step);
        grant.deadline = until;
    }
}

fn set_lease(lock: &LockName, grant: &mut Grant, lease: Millis, step: &mut Step) {
    if grant.lease != lease {
        grant.lease = lease;
        step.changes.push(Change::LeaseSet {
            lock: LockName::clone(lock),
            fence: grant.fence,
            lease,
        });
    }
}

/// Longest request id accepted, in bytes (a UUID is 36).
pub const MAX_REQUEST_ID_BYTES: usize = 256;

/// The checks that depend on a request's arguments alone: its request id's
/// length, and the lock name it gives.
///
/// # Errors
/// A one-line reason, for an `InvalidArgument` refusal.
fn check_arguments(request_id: &str, request: &Request) -> Result<(), String> {
    if request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(format!(
            "request id is {} bytes; at most {MAX_REQUEST_ID_BYTES}",
            request_id.len()
        ));
    }
    match request {
        Request::Acquire { lock, .. }
        | Request::Release { lock, .. }
        | Request::Renew { lock, .. } => validate_lock_name(lock),
        _ => Ok(()),
    }
}

fn reused_request_id() -> Reply {
    Reply::refused(
        RefusalCode::InvalidArgument,
        "request id already used by this client for another operation",
    )
}

#[cfg(test)]
mod tests;
