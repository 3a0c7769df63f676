//! The running server's heart: the core behind a mutex, a queue of jobs in
//! the core's order, and group commit by whoever is free to do it.
//!
//! Owns: feeding calls to the core, queueing its outputs in order, and
//! making them durable. A call steps the core under the state lock, queues
//! the step's records, writes and replies, and then, if no one else is
//! writing, carries out the queue itself (write + one fdatasync + file
//! writes + replies) on its own thread: at low load a request reaches the
//! disk and its reply with no thread handoff at all (the handoffs cost
//! ~35 µs of the 0.11 ms no-fsync round trip on the bench machine). When
//! someone is already writing, the call only waits: the writer in charge
//! sees its job in the next group. A flusher that finds more work after its
//! group hands it to the background writer (a thread in production, a task
//! in the simulation) instead of keeping its own caller waiting, so that
//! under load the background writer does back-to-back group commits.
//!
//! A caller also leaves the queue alone while the background writer is
//! draining, or when the last group answered more than one call (calls
//! overlap: a caller that blocked in an fsync would keep one of the
//! runtime's two threads from the network while the others' requests wait),
//! so that under load the callers' threads serve the network.
//!
//! Invariants: jobs run in queue order, one group at a time (the `io` lock is
//! held from taking a group to finishing it); whoever releases `io` looks at
//! the queue again, so a job queued while `io` was busy is never stranded.
//! A storage failure closes the engine: queued and pending replies are
//! dropped (their callers see "shutting down") and the node stops.
//! Must not: contain lock rules (the core's) or wire formats.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard, TryLockError};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::core::time::Time;
use crate::core::types::{CallId, Reply, RequestKind};
use crate::core::{Core, Input, Output};

use super::writer::{Batch, Job, Persister, WriterError};
use super::{Clock, Observer};

/// The core and what surrounds it, under one lock.
pub(super) struct State {
    pub core: Core,
    pub observer: Option<Observer>,
    /// Reply channels of calls the core has not answered yet.
    pub pending: HashMap<CallId, oneshot::Sender<Reply>>,
    /// Jobs in the core's order, not yet taken by a writer.
    pub queue: Vec<Job>,
    pub since_snapshot: u64,
    pub snapshot_every: u64,
    /// The deadline the timer task sleeps until.
    pub timer_at: Option<Time>,
    /// No new calls: the node stopped or storage failed.
    pub closed: bool,
    /// Calls whose futures were dropped before their reply, not yet told to
    /// the core (see [`Engine::dropped`]).
    pub dropped: Vec<CallId>,
    /// Planted bug (`Plants::late_grants`): answers to other calls than the
    /// one stepped, held until the next acquire. Always `None` in
    /// production.
    pub late_grants: Option<Vec<(oneshot::Sender<Reply>, Reply)>>,
}

/// The persister, held by whoever is writing.
pub(super) struct Io {
    pub persister: Persister,
    /// Storage failed: nothing more is written.
    pub failed: bool,
}

/// How the background writer is woken.
pub(super) enum Wake {
    /// A dedicated thread blocked on a channel of capacity one.
    Thread(std_mpsc::SyncSender<()>),
    /// A task of the (simulated) runtime.
    Task(Arc<Notify>),
}

/// The largest read-reply budget: what one read may take at once (`u32`),
/// and what tokio's semaphore counts on every target.
pub const MOST_READ_REPLY_BYTES: u64 = {
    let most = tokio::sync::Semaphore::MAX_PERMITS as u64;
    if most < u32::MAX as u64 {
        most
    } else {
        u32::MAX as u64
    }
};

/// Bytes of file-read replies the server may hold at once (see
/// [`super::handle::HeldReply`]).
pub(super) struct ReplyBudget {
    /// One permit per byte.
    pub bytes: Arc<tokio::sync::Semaphore>,
    /// The permits there are in all (at most `u32::MAX`: one read takes at
    /// most that many at once).
    pub total: u64,
    /// Reads waiting for their share.
    pub waiting: std::sync::atomic::AtomicUsize,
}

impl ReplyBudget {
    /// A budget of `bytes` (at least one, at most [`MOST_READ_REPLY_BYTES`]:
    /// `dlm server` refuses other values).
    pub fn new(bytes: u64) -> ReplyBudget {
        let total = bytes.clamp(1, MOST_READ_REPLY_BYTES);
        ReplyBudget {
            bytes: Arc::new(tokio::sync::Semaphore::new(total as usize)),
            total,
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

pub(super) struct Engine {
    pub state: Mutex<State>,
    pub io: Mutex<Io>,
    /// The data files' directory, for reads outside `io`.
    pub data: Arc<dyn crate::storage::Dir>,
    /// Reads of data files outside `io` at once (each holds a descriptor
    /// and the file's bytes).
    pub reads: Arc<tokio::sync::Semaphore>,
    /// The read-reply budget: bytes of file-read replies held at once.
    pub reply_bytes: ReplyBudget,
    /// The request budget: bytes of requests held while they arrive, over
    /// every transport.
    pub request_bytes: Arc<crate::transport::budget::RequestBudget>,
    /// Large reads go to a blocking thread (production); the simulation
    /// reads everything in line, deterministically.
    pub blocking_reads: bool,
    pub clock: Clock,
    pub wake: Wake,
    /// The timer task's alarm: the next deadline moved earlier.
    pub timer: Notify,
    pub next_call: AtomicU64,
    /// Fires once when storage fails.
    pub failed_tx: mpsc::UnboundedSender<()>,
    /// Set when the background writer should stop once the queue is empty.
    pub stopping: AtomicBool,
    /// The background writer is draining: callers leave the queue to it
    /// (under load a caller's thread stays free for the network).
    pub writer_busy: AtomicBool,
    /// When the background writer last went idle (µs on the engine's clock).
    pub writer_idle_since: AtomicU64,
    /// How many answered batches (calls, roughly) the last group carried:
    /// more than one means calls overlap, and a caller leaves the group
    /// commit to the writer. (A snapshot or a read riding along does not
    /// count.)
    pub last_group: AtomicU64,
}

/// A call that comes this soon after the background writer went idle leaves
/// the queue to it: requests are arriving back to back (load), and a caller
/// that blocked in an fsync would keep its thread from the network. After a
/// quiet spell (a lone client's next request comes ~0.1 ms after its reply)
/// the caller writes itself and saves two thread handoffs.
const BUSY_WINDOW_MICROS: u64 = 50;

/// The state lock, whatever a panicking holder left (the core does not panic
/// on any input; this only keeps a bug from wedging every caller).
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    pub fn state(&self) -> MutexGuard<'_, State> {
        locked(&self.state)
    }

    /// Feeds `input` to the core at the current time and queues its
    /// outputs. `reply` is registered first when the input is a call.
    /// Returns false when the engine is closed.
    pub fn step(&self, input: Input, reply: Option<(CallId, oneshot::Sender<Reply>)>) -> bool {
        let mut state = self.state();
        if state.closed {
            return false;
        }
        self.apply_dropped(&mut state);
        let stepped = match (&input, &reply) {
            (Input::Call { request, .. }, Some((id, _))) => Some((*id, request.kind())),
            _ => None,
        };
        if let Some((id, to)) = reply {
            state.pending.insert(id, to);
        }
        let now = self.clock.now();
        let outputs = state.core.handle(now, input);
        self.queue_outputs(&mut state, outputs, stepped);
        true
    }

    /// A call's future was dropped before its reply: the core decides what
    /// that means for a waiter (keep its place for a retry, or give it up).
    /// Only noted here: a drop runs wherever the future is dropped — also
    /// while a stopping runtime tears its tasks down — so the core hears of
    /// it from the next step or from the background writer, never from the
    /// teardown itself (which would step a node that is going away).
    pub fn dropped(&self, id: CallId) {
        let mut state = self.state();
        if !state.closed {
            state.dropped.push(id);
        }
    }

    /// Tells the core of the calls dropped since the last step.
    fn apply_dropped(&self, state: &mut State) {
        if state.dropped.is_empty() {
            return;
        }
        let now = self.clock.now();
        for id in std::mem::take(&mut state.dropped) {
            state.pending.remove(&id);
            let outputs = state.core.handle(now, Input::CallDropped(id));
            self.queue_outputs(state, outputs, None);
        }
    }

    /// Ticks the core at the current time and queues its outputs.
    pub fn tick(&self) {
        let mut state = self.state();
        if state.closed {
            return;
        }
        self.apply_dropped(&mut state);
        let now = self.clock.now();
        let outputs = state.core.tick(now);
        self.queue_outputs(&mut state, outputs, None);
    }

    /// Queues a job that must run after everything queued so far.
    /// Returns false when the engine is closed.
    pub fn queue(&self, job: Job) -> bool {
        let mut state = self.state();
        if state.closed {
            return false;
        }
        state.queue.push(job);
        true
    }

    /// Queues the outputs of one step of the core; `stepped` is the call
    /// stepped and its kind, if it was one.
    fn queue_outputs(
        &self,
        state: &mut State,
        outputs: Vec<Output>,
        stepped: Option<(CallId, RequestKind)>,
    ) {
        if let Some(observer) = &mut state.observer {
            let now = state.core.now();
            for output in &outputs {
                observer(now, output);
            }
        }
        let mut batch = Batch::default();
        if let (Some(late), Some((_, RequestKind::Acquire))) = (&mut state.late_grants, stepped) {
            // Planted: what was held leaves with the next acquire's batch
            // (after its group's fsync: nothing leaves before it is durable).
            batch.replies.append(late);
        }
        for output in outputs {
            match output {
                Output::Persist(record) => batch.records.push(record),
                Output::Write(write) => batch.writes.push(write),
                Output::Trace(_) => {}
                Output::Reply { call, reply } => {
                    if let Some(to) = state.pending.remove(&call) {
                        match &mut state.late_grants {
                            Some(late) if stepped.is_none_or(|(id, _)| id != call) => {
                                late.push((to, reply));
                            }
                            _ => batch.replies.push((to, reply)),
                        }
                    }
                }
            }
        }
        let records = batch.records.len() as u64;
        if !batch.is_empty() {
            state.queue.push(Job::Batch(batch));
        }
        state.since_snapshot += records;
        if state.since_snapshot >= state.snapshot_every {
            state.since_snapshot = 0;
            let snapshot = Box::new(state.core.snapshot());
            state.queue.push(Job::Snapshot(snapshot));
        }
        // Wake the timer if the core's next deadline moved earlier.
        if let Some(next) = state.core.next_deadline() {
            if state.timer_at.is_none_or(|at| next < at) {
                state.timer_at = Some(next);
                self.timer.notify_one();
            }
        }
    }

    /// Carries out the queue on this thread if no one else is writing (one
    /// group); hands what is left to the background writer.
    pub fn flush_here(&self) {
        if self.writer_busy.load(Ordering::SeqCst) {
            return;
        }
        let idle_since = self.writer_idle_since.load(Ordering::Relaxed);
        if self.last_group.load(Ordering::Relaxed) > 1
            || self.clock.micros().saturating_sub(idle_since) < BUSY_WINDOW_MICROS
        {
            self.wake_writer();
            return;
        }
        let io = match self.io.try_lock() {
            Ok(io) => io,
            Err(TryLockError::WouldBlock) => return,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
        };
        self.run_group(io);
        if !self.state().queue.is_empty() {
            self.wake_writer();
        }
    }

    /// Takes every queued job and carries it out while holding `io`.
    /// Returns false when there was nothing to do.
    fn run_group(&self, mut io: MutexGuard<'_, Io>) -> bool {
        let jobs = std::mem::take(&mut self.state().queue);
        if jobs.is_empty() {
            return false;
        }
        let answered = jobs
            .iter()
            .filter(|job| matches!(job, Job::Batch(b) if !b.replies.is_empty()))
            .count();
        self.last_group.store(answered as u64, Ordering::Relaxed);
        if io.failed {
            return true;
        }
        if let Err(e) = io.persister.run_jobs(jobs) {
            io.failed = true;
            drop(io);
            self.fail(&e);
        }
        true
    }

    /// Storage failed: close, drop every waiting reply, report.
    fn fail(&self, error: &WriterError) {
        tracing::error!(error = %error, "storage failure");
        let mut state = self.state();
        state.closed = true;
        state.queue.clear();
        state.pending.clear();
        state.dropped.clear();
        drop(state);
        let _ = self.failed_tx.send(());
    }

    /// Asks the background writer to look at the queue.
    pub fn wake_writer(&self) {
        match &self.wake {
            // Full means a wake-up is already waiting: nothing is lost.
            Wake::Thread(tx) => {
                let _ = tx.try_send(());
            }
            Wake::Task(notify) => notify.notify_one(),
        }
    }

    /// The background writer's work after a wake-up: group after group until
    /// the queue is empty (looking again after releasing `io`).
    pub fn drain(&self) {
        self.writer_busy.store(true, Ordering::SeqCst);
        loop {
            {
                let mut state = self.state();
                if !state.closed {
                    self.apply_dropped(&mut state);
                }
            }
            let io = locked(&self.io);
            if self.run_group(io) {
                continue;
            }
            // Idle again; a job queued before a caller saw the flag clear
            // is found here, one queued after is flushed by its caller (or
            // wakes this writer again).
            self.writer_idle_since
                .store(self.clock.micros(), Ordering::Relaxed);
            self.writer_busy.store(false, Ordering::SeqCst);
            let state = self.state();
            if state.queue.is_empty() && (state.closed || state.dropped.is_empty()) {
                return;
            }
            drop(state);
            self.writer_busy.store(true, Ordering::SeqCst);
        }
    }

    /// Waits for a snapshot still being written in the background (the
    /// writer's last act, also after a storage failure: nothing may write
    /// to the directory once the node has stopped); its failure is a
    /// storage failure.
    fn finish(&self) {
        let mut io = locked(&self.io);
        let result = io.persister.finish();
        if io.failed {
            return;
        }
        if let Err(e) = result {
            io.failed = true;
            drop(io);
            self.fail(&e);
        }
    }

    /// Closes to new calls and drops replies still waiting for the core
    /// (queued jobs are still carried out by the writer).
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.pending.clear();
        // A closed core is stepped no more: cut-off calls noted before the
        // close are moot (and the writer, which drains until none is left,
        // must not wait for them).
        state.dropped.clear();
    }

    /// Stops: no new calls, the timer task ends, and the background writer
    /// carries out what is queued and exits. Does not wait; calling it
    /// again does nothing more.
    pub fn stop(&self) {
        self.close();
        // Reads waiting for a share of the budget end ("shutting down")
        // rather than wait for replies that a stalled peer holds.
        self.reply_bytes.bytes.close();
        self.timer.notify_one();
        self.stopping.store(true, Ordering::Release);
        self.wake_writer();
    }

    /// A fresh call id.
    pub fn call_id(&self) -> CallId {
        CallId(self.next_call.fetch_add(1, Ordering::Relaxed))
    }

    /// Storage has failed.
    pub fn has_failed(&self) -> bool {
        locked(&self.io).failed
    }
}

/// The background writer on its own thread: waits for a wake-up, drains,
/// until told to stop (then drains what is left).
pub(super) fn run_thread(engine: Arc<Engine>, wakes: std_mpsc::Receiver<()>) {
    while wakes.recv().is_ok() {
        engine.drain();
        if engine.stopping.load(Ordering::Acquire) {
            break;
        }
    }
    engine.drain();
    engine.finish();
}

/// The background writer as a task (single-threaded simulation).
pub(super) async fn run_task(engine: Arc<Engine>, notify: Arc<Notify>) {
    loop {
        notify.notified().await;
        engine.drain();
        if engine.stopping.load(Ordering::Acquire) {
            break;
        }
    }
    engine.drain();
    engine.finish();
}

/// The timer: ticks the core at its next deadline.
pub(super) async fn run_timer(engine: Arc<Engine>) {
    loop {
        let deadline = {
            let mut state = engine.state();
            if state.closed {
                return;
            }
            let next = state.core.next_deadline();
            state.timer_at = next;
            next.map(|at| engine.clock.instant(at))
        };
        let fire = tokio::select! {
            biased;
            () = engine.timer.notified() => false,
            () = sleep_until_opt(deadline) => true,
        };
        if fire {
            engine.tick();
            engine.flush_here();
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
