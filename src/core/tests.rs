//! Core scenarios driven in memory: virtual time, no sockets, no sleeps.
//!
//! A [`Harness`] plays the driver of the calling rule: it feeds inputs at a
//! virtual time, keeps every persisted record, applies file writes at their
//! exact offsets to 100 in-memory files, and collects the reply of each call.
//! Recovery is checked by building a second core from the records (or from a
//! snapshot) and comparing it with the live one.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::records::{count_answers, Change, Record, Snapshot};
use super::staging::{FileIndex, FileWrite, FILE_COUNT};
use super::time::{Millis, Time};
use super::types::{
    CallId, ClientId, Fence, GrantInfo, LockName, LockView, RefusalCode, Reply, Request,
    DEFAULT_LOCK,
};
use super::{Core, CoreConfig, Input, Output, ReplayError};

/// Seed of the first core; every restart uses another one, as a server
/// seeded from OS entropy would (the same seed would repeat old tokens).
const SEED: [u8; 32] = [7u8; 32];
/// Default lease, kept short so that scenarios stay readable.
const LEASE: u64 = 1000;
/// Largest single append.
const MAX_APPEND: usize = 1024;

fn config() -> CoreConfig {
    CoreConfig {
        default_lease: Millis(LEASE),
        min_lease: Millis(10),
        max_lease: Millis(60_000),
        max_wait: Millis(60_000),
        max_append_bytes: MAX_APPEND,
        max_staged_bytes: 1 << 20,
        dedup_capacity: 10_000,
        max_detached: 10_000,
    }
}

/// A driver of one core, in memory.
struct Harness {
    core: Core,
    /// The configuration of this core and of every recovered one.
    config: CoreConfig,
    /// The virtual time fed to the core.
    now: Time,
    /// The last call id handed out; ids are never reused, not even across a restart.
    next_call: u64,
    /// The reply each call got (a call is answered at most once).
    replies: BTreeMap<CallId, Reply>,
    /// Records persisted since `base`: the log a recovery replays.
    records: Vec<Record>,
    /// Every record ever persisted, across restarts (for whole-history checks).
    history: Vec<Record>,
    /// The 100 data files, with every `Output::Write` applied at its offset.
    files: Vec<Vec<u8>>,
    /// The snapshot the log starts from.
    base: Snapshot,
    /// The files as they were when `base` was taken.
    base_files: Vec<Vec<u8>>,
    /// How many times this history was recovered (picks the next seed).
    restarts: u8,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_config(config())
    }

    fn with_config(config: CoreConfig) -> Harness {
        let files = vec![Vec::new(); FILE_COUNT];
        Harness {
            core: Core::new(config.clone(), SEED),
            config,
            now: Time::ZERO,
            next_call: 0,
            replies: BTreeMap::new(),
            records: Vec::new(),
            history: Vec::new(),
            files: files.clone(),
            base: Snapshot::default(),
            base_files: files,
            restarts: 0,
        }
    }

    /// Carries out the outputs of one input, as the calling rule says.
    fn apply(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Persist(record) => {
                    assert!(!record.changes.is_empty(), "empty record persisted");
                    self.history.push(record.clone());
                    self.records.push(record);
                }
                Output::Write(write) => apply_write(&mut self.files, &write),
                Output::Reply { call, reply } => {
                    let earlier = self.replies.insert(call, reply);
                    assert!(earlier.is_none(), "{call:?} answered twice");
                }
                Output::Trace(_) => {}
            }
        }
        if let Some(at) = self.core.next_deadline() {
            assert!(at > self.now, "deadline {at:?} left due at {:?}", self.now);
        }
    }

    /// Sends `request` with `request_id` (empty: none) as a new call.
    fn call(&mut self, request_id: &str, request: Request) -> CallId {
        self.next_call += 1;
        let id = CallId(self.next_call);
        let input = Input::Call {
            id,
            request_id: request_id.to_owned(),
            request,
        };
        let outputs = self.core.handle(self.now, input);
        self.apply(outputs);
        id
    }

    /// The reply `call` got so far.
    fn reply(&self, call: CallId) -> Option<Reply> {
        self.replies.get(&call).cloned()
    }

    /// The grant `call` got; panics otherwise.
    fn granted(&self, call: CallId) -> GrantInfo {
        match self.reply(call) {
            Some(Reply::Granted(grant)) => grant,
            other => panic!("{call:?}: expected a grant, got {other:?}"),
        }
    }

    /// The refusal code `call` got; panics otherwise.
    fn refusal(&self, call: CallId) -> RefusalCode {
        match self.reply(call) {
            Some(Reply::Refused(refusal)) => refusal.code,
            other => panic!("{call:?}: expected a refusal, got {other:?}"),
        }
    }

    /// Sends an acquire that must be granted at once.
    fn grant(&mut self, request_id: &str, request: Request) -> GrantInfo {
        let call = self.call(request_id, request);
        self.granted(call)
    }

    /// Sends a request that must succeed with `Reply::Done`.
    fn done(&mut self, request_id: &str, request: Request) {
        let call = self.call(request_id, request.clone());
        assert_eq!(self.reply(call), Some(Reply::Done), "{request:?}");
    }

    /// Lets `ms` milliseconds pass and ticks.
    fn advance(&mut self, ms: u64) {
        self.now = self.now.plus(Millis(ms));
        let outputs = self.core.tick(self.now);
        self.apply(outputs);
    }

    /// Lets `ms` milliseconds pass without ticking (a late driver).
    fn jump(&mut self, ms: u64) {
        self.now = self.now.plus(Millis(ms));
    }

    /// Cuts off `call` (client deadline, dropped connection).
    fn drop_call(&mut self, call: CallId) {
        let outputs = self.core.handle(self.now, Input::CallDropped(call));
        self.apply(outputs);
    }

    /// The content of `file_n`.
    fn file(&self, n: usize) -> String {
        String::from_utf8(self.files[n].clone()).expect("test content is UTF-8")
    }

    /// The status view of every lock that is held or waited for.
    fn status(&mut self) -> Vec<LockView> {
        let call = self.call("", Request::Status);
        match self.reply(call) {
            Some(Reply::Status { locks, .. }) => locks,
            other => panic!("expected a status, got {other:?}"),
        }
    }

    fn view(&mut self, lock: &str) -> Option<LockView> {
        self.status().into_iter().find(|v| *v.lock == *lock)
    }

    fn holder(&mut self, lock: &str) -> Option<ClientId> {
        self.view(lock).and_then(|v| v.holder)
    }

    /// Waiters of `lock` in grant order: (client, cut off and kept).
    fn waiters(&mut self, lock: &str) -> Vec<(ClientId, bool)> {
        self.view(lock).map(|v| v.waiters).unwrap_or_default()
    }

    /// Every change persisted since the log had `mark` records.
    fn changes_since(&self, mark: usize) -> Vec<Change> {
        self.records[mark..]
            .iter()
            .flat_map(|r| r.changes.iter().cloned())
            .collect()
    }

    /// Grants persisted since the log had `mark` records: (lock, client, fence).
    fn grants_since(&self, mark: usize) -> Vec<(LockName, ClientId, Fence)> {
        self.changes_since(mark)
            .into_iter()
            .filter_map(|c| match c {
                Change::Granted {
                    lock,
                    client,
                    fence,
                    ..
                } => Some((lock, client, fence)),
                _ => None,
            })
            .collect()
    }

    /// A new core recovered the way a server restarts: the last snapshot,
    /// every record logged after it (re-applying the writes it returns onto
    /// the files as they were at the snapshot), then `resume`.
    /// Recovery as the server does it: the answers counted in the encoded
    /// log, then the replay planned with that count. Every use checks that
    /// the plan changes nothing: the same state as a replay without it.
    fn recovered_from_records(&self) -> Harness {
        let restarts = self.restarts + 1;
        let answers = self
            .records
            .iter()
            .map(|r| count_answers(&postcard::to_allocvec(r).expect("encodes")))
            .sum();
        let replayed = |plan: Option<u64>| {
            let mut core = Core::restore(self.config.clone(), seed(restarts), self.base.clone());
            if let Some(answers) = plan {
                core.plan_replay(answers);
            }
            let mut files = self.base_files.clone();
            for record in &self.records {
                let writes = core
                    .replay(record.clone())
                    .expect("the live core's log replays");
                for write in &writes {
                    apply_write(&mut files, write);
                }
            }
            core.resume(self.now);
            (core, files)
        };
        let (core, files) = replayed(Some(answers));
        let (unplanned, _) = replayed(None);
        assert_eq!(
            core.snapshot(),
            unplanned.snapshot(),
            "a planned replay leaves the state an unplanned one does"
        );
        Harness {
            core,
            config: self.config.clone(),
            now: self.now,
            next_call: self.next_call,
            replies: BTreeMap::new(),
            records: self.records.clone(),
            history: self.history.clone(),
            files,
            base: self.base.clone(),
            base_files: self.base_files.clone(),
            restarts,
        }
    }

    /// A new core recovered from a snapshot of this one, with an empty log.
    fn recovered_from_snapshot(&self) -> Harness {
        let restarts = self.restarts + 1;
        let snapshot = self.core.snapshot();
        let mut core = Core::restore(self.config.clone(), seed(restarts), snapshot.clone());
        core.resume(self.now);
        Harness {
            core,
            config: self.config.clone(),
            now: self.now,
            next_call: self.next_call,
            replies: BTreeMap::new(),
            records: Vec::new(),
            history: self.history.clone(),
            files: self.files.clone(),
            base: snapshot,
            base_files: self.files.clone(),
            restarts,
        }
    }
}

fn seed(restarts: u8) -> [u8; 32] {
    [SEED[0].wrapping_add(restarts); 32]
}

/// Applies one write at its exact offset; a write may overwrite (re-apply)
/// but never leave a hole.
fn apply_write(files: &mut [Vec<u8>], write: &FileWrite) {
    let file = &mut files[write.file.get()];
    let offset = usize::try_from(write.offset).expect("offset fits in memory");
    assert!(
        offset <= file.len(),
        "write at {offset} leaves a hole in {} of {} bytes",
        write.file.name(),
        file.len()
    );
    let end = offset + write.data.len();
    if file.len() < end {
        file.resize(end, 0);
    }
    file[offset..end].copy_from_slice(&write.data);
}

// Requests.

fn init(client: ClientId) -> Request {
    Request::ClientInit { client }
}

fn close(client: ClientId) -> Request {
    Request::ClientClose { client }
}

/// Acquire of the default lock, waiting forever, default lease.
fn acquire(client: ClientId) -> Request {
    acquire_lock(client, DEFAULT_LOCK, None, None)
}

fn acquire_lock(client: ClientId, lock: &str, wait: Option<u64>, lease: Option<u64>) -> Request {
    Request::Acquire {
        client,
        lock: lock.into(),
        wait: wait.map(Millis),
        lease: lease.map(Millis),
    }
}

/// Release of the default lock.
fn release(client: ClientId, token: &str) -> Request {
    release_lock(client, DEFAULT_LOCK, token)
}

fn release_lock(client: ClientId, lock: &str, token: &str) -> Request {
    Request::Release {
        client,
        lock: lock.into(),
        token: token.to_owned(),
    }
}

/// Renew of the default lock, keeping the grant's lease length.
fn renew(client: ClientId, token: &str) -> Request {
    renew_lock(client, DEFAULT_LOCK, token, None)
}

fn renew_lock(client: ClientId, lock: &str, token: &str, lease: Option<u64>) -> Request {
    Request::Renew {
        client,
        lock: lock.into(),
        token: token.to_owned(),
        lease: lease.map(Millis),
    }
}

fn append(client: ClientId, file: &str, content: &str, token: &str) -> Request {
    Request::Append {
        client,
        file: file.to_owned(),
        content: Bytes::copy_from_slice(content.as_bytes()),
        token: token.to_owned(),
    }
}

// 1. FIFO waiters, skipped and cut-off waiters.

#[test]
fn fifo_grants_in_arrival_order_for_10_waiters() {
    let mut h = Harness::new();
    let mut token = h.grant("h", acquire(100)).token;
    let mut holder = 100;
    let mut waiting = Vec::new();
    for client in 1..=10 {
        h.advance(1);
        waiting.push((client, h.call(&format!("w{client}"), acquire(client))));
    }
    let expected: Vec<_> = (1..=10).map(|c| (c, false)).collect();
    assert_eq!(h.waiters(""), expected);

    let mut last_fence = Fence(0);
    for (i, &(client, call)) in waiting.iter().enumerate() {
        assert_eq!(
            h.reply(call),
            None,
            "client {client} answered before its turn"
        );
        h.done("", release(holder, &token));
        let grant = h.granted(call);
        assert!(grant.fence > last_fence);
        assert_eq!(h.holder(""), Some(client));
        for &(later, call) in &waiting[i + 1..] {
            assert_eq!(
                h.reply(call),
                None,
                "client {later} answered before its turn"
            );
        }
        (holder, token, last_fence) = (client, grant.token, grant.fence);
    }
    h.done("", release(holder, &token));
    assert_eq!(
        h.view(""),
        None,
        "a released lock with no waiters is forgotten"
    );
}

#[test]
fn fifo_skips_waiters_whose_wait_timeout_passed() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire_lock(100, "", None, Some(5_000))).token;
    let w1 = h.call("w1", acquire_lock(1, "", Some(300), None));
    let w2 = h.call("w2", acquire(2));
    let w3 = h.call("w3", acquire_lock(3, "", Some(200), None));
    let w4 = h.call("w4", acquire(4));

    h.advance(199);
    assert_eq!(h.reply(w3), None);
    h.advance(1);
    assert_eq!(h.refusal(w3), RefusalCode::WaitTimeout);
    h.advance(99);
    assert_eq!(h.reply(w1), None);
    h.advance(1);
    assert_eq!(h.refusal(w1), RefusalCode::WaitTimeout);
    assert_eq!(h.waiters(""), vec![(2, false), (4, false)]);

    h.done("", release(100, &token));
    let g2 = h.granted(w2);
    assert_eq!(h.reply(w4), None);
    h.done("", release(2, &g2.token));
    h.granted(w4);

    // A retry of a timed-out acquire gets the same answer.
    let retry = h.call("w1", acquire_lock(1, "", Some(300), None));
    assert_eq!(h.refusal(retry), RefusalCode::WaitTimeout);
    assert_eq!(h.waiters(""), vec![]);
}

#[test]
fn fifo_skips_waiter_whose_client_closed() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire(100)).token;
    let w1 = h.call("w1", acquire(1));
    let w2 = h.call("w2", acquire(2));
    let w3 = h.call("w3", acquire(3));

    h.done("c2", close(2));
    assert_eq!(h.refusal(w2), RefusalCode::SessionClosed);
    assert_eq!(h.waiters(""), vec![(1, false), (3, false)]);

    h.done("", release(100, &token));
    let g1 = h.granted(w1);
    assert_eq!(h.reply(w3), None);
    h.done("", release(1, &g1.token));
    h.granted(w3);
}

#[test]
fn fifo_cut_off_waiter_retrying_with_same_request_id_keeps_its_place() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire_lock(100, "", None, Some(5_000))).token;
    let w1 = h.call("w1", acquire(1));
    let w2 = h.call("w2", acquire(2));
    let w3 = h.call("w3", acquire(3));

    h.advance(10);
    h.drop_call(w1);
    assert_eq!(h.waiters(""), vec![(1, true), (2, false), (3, false)]);
    h.advance(500);
    let retry = h.call("w1", acquire(1));
    assert_eq!(h.reply(retry), None);
    assert_eq!(h.waiters(""), vec![(1, false), (2, false), (3, false)]);
    // Once re-attached, the place is no longer given up after one lease.
    h.advance(1_000);
    assert_eq!(h.waiters(""), vec![(1, false), (2, false), (3, false)]);

    h.done("", release(100, &token));
    let g1 = h.granted(retry);
    assert_eq!(h.reply(w1), None, "a cut-off call gets nothing");
    assert_eq!((h.reply(w2), h.reply(w3)), (None, None));
    h.done("", release(1, &g1.token));
    let g2 = h.granted(w2);
    h.done("", release(2, &g2.token));
    h.granted(w3);
}

#[test]
fn fifo_cut_off_waiter_granted_while_away_gets_that_grant_on_retry() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire_lock(100, "", None, Some(5_000))).token;
    let w1 = h.call("w1", acquire(1));
    let w2 = h.call("w2", acquire(2));
    h.drop_call(w1);

    let mark = h.records.len();
    h.done("", release(100, &token));
    let granted = h.grants_since(mark);
    assert_eq!(granted.len(), 1);
    let (_, client, fence) = granted[0].clone();
    assert_eq!((client, h.holder("")), (1, Some(1)));
    assert_eq!((h.reply(w1), h.reply(w2)), (None, None));

    h.advance(200);
    let retry = h.call("w1", acquire(1));
    let g1 = h.granted(retry);
    assert_eq!(g1.fence, fence);
    h.done("", release(1, &g1.token));
    h.granted(w2);
}

#[test]
fn fifo_cut_off_waiter_that_never_returns_does_not_wedge_queue() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire_lock(100, "", None, Some(5_000))).token;
    let w1 = h.call("w1", acquire(1));
    let w2 = h.call("w2", acquire(2));
    h.advance(10);
    h.drop_call(w1);

    // Granted to the absent client 1 at t=100, with the default lease.
    h.advance(90);
    h.done("", release(100, &token));
    assert_eq!(h.holder(""), Some(1));
    h.advance(LEASE - 1);
    assert_eq!(h.reply(w2), None);
    assert_eq!(h.holder(""), Some(1));
    h.advance(1);
    let g2 = h.granted(w2);
    assert_eq!(h.holder(""), Some(2));

    // If client 1 comes back now, it learns of its grant, which ran out.
    let late = h.call("w1", acquire(1));
    let g1 = h.granted(late);
    assert!(g1.fence < g2.fence);
    let renewed = h.call("", renew(1, &g1.token));
    assert_eq!(h.refusal(renewed), RefusalCode::InvalidToken);
}

#[test]
fn fifo_cut_off_waiter_place_is_kept_for_one_lease_period_then_given_up() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire_lock(100, "", None, Some(5_000))).token;
    let w1 = h.call("w1", acquire_lock(1, "", None, Some(400)));
    let w2 = h.call("w2", acquire(2));
    h.advance(10);
    h.drop_call(w1);

    h.advance(399);
    assert_eq!(h.waiters(""), vec![(1, true), (2, false)]);
    h.advance(1);
    assert_eq!(h.waiters(""), vec![(2, false)]);

    // Too late: the retry queues again, at the end.
    h.advance(10);
    let retry = h.call("w1", acquire_lock(1, "", None, Some(400)));
    assert_eq!(h.waiters(""), vec![(2, false), (1, false)]);
    h.done("", release(100, &token));
    let g2 = h.granted(w2);
    assert_eq!(h.reply(retry), None);
    h.done("", release(2, &g2.token));
    h.granted(retry);
}

#[test]
fn fifo_cut_off_waiter_without_request_id_is_removed_at_once() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire(100)).token;
    let w1 = h.call("", acquire(1));
    let w2 = h.call("w2", acquire(2));
    assert_eq!(h.waiters(""), vec![(1, false), (2, false)]);

    h.drop_call(w1);
    assert_eq!(h.waiters(""), vec![(2, false)]);
    let mark = h.records.len();
    h.done("", release(100, &token));
    h.granted(w2);
    assert_eq!(h.reply(w1), None);
    let granted: Vec<_> = h.grants_since(mark).into_iter().map(|g| g.1).collect();
    assert_eq!(granted, vec![2]);
}

#[test]
fn a_waiter_cut_off_while_the_most_places_are_kept_leaves_the_queue_at_once() {
    let mut h = Harness::with_config(CoreConfig {
        max_detached: 2,
        ..config()
    });
    let token = h.grant("h", acquire_lock(100, "", None, Some(5_000))).token;
    let w1 = h.call("w1", acquire(1));
    let w2 = h.call("w2", acquire(2));
    let w3 = h.call("w3", acquire(3));
    let w4 = h.call("w4", acquire(4));
    for call in [w1, w2, w3] {
        h.drop_call(call);
    }
    // Two places kept; the third cut-off waiter is gone, as if it had no
    // request id.
    assert_eq!(h.waiters(""), vec![(1, true), (2, true), (4, false)]);

    // A retry of the removed one queues again, at the back.
    let w3_again = h.call("w3", acquire(3));
    assert_eq!(h.reply(w3_again), None);
    assert_eq!(
        h.waiters(""),
        vec![(1, true), (2, true), (4, false), (3, false)]
    );
    // A re-attached waiter frees its room: the next cut-off one is kept.
    let w1_again = h.call("w1", acquire(1));
    h.drop_call(w4);
    assert_eq!(
        h.waiters(""),
        vec![(1, false), (2, true), (4, true), (3, false)]
    );
    // So does a place given up after its lease period.
    h.advance(LEASE);
    assert_eq!(h.waiters(""), vec![(1, false), (3, false)]);
    h.drop_call(w3_again);
    h.drop_call(w1_again);
    assert_eq!(h.waiters(""), vec![(1, true), (3, true)]);

    h.done("", release(100, &token));
    let retry = h.call("w1", acquire(1));
    h.granted(retry);
}

// 2. Leases.

#[test]
fn lease_runs_out_at_exactly_its_deadline() {
    let mut h = Harness::new();
    h.advance(100);
    let grant = h.grant("a", acquire(1));
    assert_eq!(h.core.next_deadline(), Some(Time::from_millis(100 + LEASE)));

    h.advance(LEASE - 1);
    let view = h.view("").expect("held");
    assert_eq!((view.holder, view.lease_left), (Some(1), Millis(1)));
    let busy = h.call("", acquire_lock(2, "", Some(0), None));
    assert_eq!(h.refusal(busy), RefusalCode::LockHeld);

    let mark = h.records.len();
    h.advance(1);
    assert_eq!(
        h.changes_since(mark),
        vec![Change::Ended {
            lock: DEFAULT_LOCK.into(),
            fence: grant.fence
        }]
    );
    assert_eq!(h.view(""), None);
    let renewed = h.call("", renew(1, &grant.token));
    assert_eq!(h.refusal(renewed), RefusalCode::LockNotHeld);
}

#[test]
fn lease_token_is_refused_at_its_deadline_even_if_tick_was_not_called() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.jump(LEASE - 1);
    let busy = h.call("", acquire_lock(2, "", Some(0), None));
    assert_eq!(h.refusal(busy), RefusalCode::LockHeld);
    h.jump(1);
    // The request that arrives at the deadline finds the grant gone.
    let taken = h.grant("", acquire_lock(2, "", Some(0), None));
    assert!(taken.fence > grant.fence);
    let renewed = h.call("", renew(1, &grant.token));
    assert_eq!(h.refusal(renewed), RefusalCode::InvalidToken);
}

#[test]
fn lease_renew_moves_the_deadline() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.advance(900);
    let renewed = h.call("n1", renew(1, &grant.token));
    assert_eq!(
        h.reply(renewed),
        Some(Reply::Renewed {
            lease: Millis(LEASE)
        })
    );
    assert_eq!(h.core.next_deadline(), Some(Time::from_millis(900 + LEASE)));
    h.advance(LEASE - 1);
    assert_eq!(h.holder(""), Some(1));

    // A renew may name another lease length for this extension.
    let shorter = h.call("n2", renew_lock(1, "", &grant.token, Some(300)));
    assert_eq!(
        h.reply(shorter),
        Some(Reply::Renewed { lease: Millis(300) })
    );
    h.advance(299);
    assert_eq!(h.holder(""), Some(1));
    h.advance(1);
    assert_eq!(h.holder(""), None);
}

/// A renewal extends a lease and never ends it sooner: a length that would
/// end before the deadline already given (a guard may be counting on it)
/// changes nothing, not even the length a restart grants afresh; its answer
/// names the length asked for, which ends sooner. The same for a re-acquire
/// by the holder.
#[test]
fn a_renewal_with_a_shorter_lease_does_not_end_it_sooner() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.advance(100);
    let shorter = h.call("n1", renew_lock(1, "", &grant.token, Some(300)));
    assert_eq!(
        h.reply(shorter),
        Some(Reply::Renewed { lease: Millis(300) })
    );
    assert_eq!(h.core.next_deadline(), Some(Time::from_millis(LEASE)));
    let again = h.call("n2", acquire_lock(1, DEFAULT_LOCK, None, Some(200)));
    assert_eq!(h.granted(again).lease, Millis(200));
    assert_eq!(h.core.next_deadline(), Some(Time::from_millis(LEASE)));
    // Nor after a restart, which grants the length kept afresh.
    for mut recovered in [h.recovered_from_records(), h.recovered_from_snapshot()] {
        assert_eq!(recovered.view("").unwrap().lease_left, Millis(LEASE));
    }
    h.advance(LEASE - 101);
    assert_eq!(h.holder(""), Some(1));
    h.advance(1);
    assert_eq!(h.holder(""), None);
}

#[test]
fn lease_run_out_token_is_refused_by_append_renew_and_release() {
    let mut h = Harness::new();
    let old = h.grant("a", acquire(1));
    h.done("p", append(1, "file_0", "lost", &old.token));
    h.advance(LEASE);
    assert_eq!(h.view(""), None);

    let refused = |h: &mut Harness, code: RefusalCode| {
        let mark = h.records.len();
        for request in [
            append(1, "file_0", "late", &old.token),
            renew(1, &old.token),
            release(1, &old.token),
        ] {
            let call = h.call("", request.clone());
            assert_eq!(h.refusal(call), code, "{request:?}");
        }
        assert_eq!(h.records.len(), mark, "a refusal persists nothing");
    };
    // The lock is free: nobody holds it.
    refused(&mut h, RefusalCode::LockNotHeld);
    // Another client holds it.
    let other = h.grant("b", acquire(2));
    refused(&mut h, RefusalCode::InvalidToken);
    // The same client holds it again, under a new grant.
    h.done("", release(2, &other.token));
    let again = h.grant("c", acquire(1));
    assert_ne!(again.token, old.token);
    refused(&mut h, RefusalCode::InvalidToken);
    h.done("", release(1, &again.token));
    assert_eq!(
        h.file(0),
        "",
        "appends staged under the run-out grant are dropped"
    );
}

// 3. Re-acquire and fencing numbers.

#[test]
fn reacquire_by_holder_returns_same_token_and_fence_and_renews_lease() {
    let mut h = Harness::new();
    let grant = h.grant("a1", acquire(1));
    h.advance(800);
    let mark = h.records.len();
    let again = h.grant("a2", acquire(1));
    assert_eq!((&again.token, again.fence), (&grant.token, grant.fence));
    let tried = h.grant("a3", acquire_lock(1, "", Some(0), None));
    assert_eq!((&tried.token, tried.fence), (&grant.token, grant.fence));
    assert_eq!(h.grants_since(mark), vec![], "no new grant");

    h.advance(LEASE - 1);
    assert_eq!(h.holder(""), Some(1));
    h.advance(1);
    assert_eq!(h.holder(""), None);
    let next = h.grant("b", acquire(2));
    assert!(next.fence > grant.fence);
}

/// An append refused for the grant's staged-bytes limit depends on the
/// grant, not on the request alone: it is remembered, so a retry of its id
/// gets the same refusal, also after the grant ended (not INVALID_TOKEN).
#[test]
fn an_append_over_the_staged_limit_is_refused_the_same_way_on_a_retry() {
    let mut h = Harness::with_config(CoreConfig {
        max_staged_bytes: 4,
        ..config()
    });
    let token = h.grant("a", acquire(1)).token;
    h.done("p1", append(1, "file_0", "abc", &token));
    let over = h.call("p2", append(1, "file_0", "de", &token));
    assert_eq!(h.refusal(over), RefusalCode::StagedLimit);
    let first = h.reply(over);
    h.advance(LEASE);
    assert_eq!(h.holder(""), None, "the grant ran out");
    let retry = h.call("p2", append(1, "file_0", "de", &token));
    assert_eq!(h.reply(retry), first);
    assert_eq!(h.file(0), "", "nothing of that grant was committed");
}

/// A client with two acquires queued on one lock (two processes of one
/// client id, or a new operation behind a cut-off one) gets the same grant
/// on both when the first is granted, as an acquire by the holder does;
/// the other waiters keep their order.
#[test]
fn the_holders_other_queued_acquires_get_its_grant() {
    let mut h = Harness::new();
    let token = h.grant("h", acquire(100)).token;
    let first = h.call("a1", acquire(1));
    let other = h.call("b1", acquire(2));
    let second = h.call("a2", acquire(1));
    assert_eq!(h.waiters(""), vec![(1, false), (2, false), (1, false)]);
    h.done("", release(100, &token));
    let grant = h.granted(first);
    let again = h.granted(second);
    assert_eq!((&again.token, again.fence), (&grant.token, grant.fence));
    assert_eq!(h.reply(other), None);
    assert_eq!(h.waiters(""), vec![(2, false)]);
    // Remembered: a retry of the second id gets the same grant.
    let retried = h.grant("a2", acquire(1));
    assert_eq!((&retried.token, retried.fence), (&grant.token, grant.fence));
    // And the next grant is client 2's.
    h.done("", release(1, &grant.token));
    assert!(h.granted(other).fence > grant.fence);
}

/// One round of grants on `lock`, ending with the lock free. Grants end in
/// each of the ways there are: release, lease expiry, client close, and a
/// grant to a cut-off waiter that never returns.
fn churn_round(h: &mut Harness, round: usize) {
    let lock = ["", "jobs", "q"][round % 3];
    let a = ClientId::try_from(round % 4).expect("small") + 1;
    let b = a + 10;
    let first = h.grant(&format!("{round}a"), acquire_lock(a, lock, None, None));
    match round % 4 {
        0 => h.done(&format!("{round}r"), release_lock(a, lock, &first.token)),
        1 => {
            let waiter = h.call(&format!("{round}b"), acquire_lock(b, lock, None, None));
            h.advance(LEASE);
            let second = h.granted(waiter);
            h.done(&format!("{round}r"), release_lock(b, lock, &second.token));
        }
        2 => {
            let waiter = h.call(&format!("{round}b"), acquire_lock(b, lock, None, None));
            h.done(&format!("{round}c"), close(a));
            let second = h.granted(waiter);
            h.done(&format!("{round}r"), release_lock(b, lock, &second.token));
        }
        _ => {
            let waiter = h.call(&format!("{round}b"), acquire_lock(b, lock, None, None));
            h.drop_call(waiter);
            h.done(&format!("{round}r"), release_lock(a, lock, &first.token));
            h.advance(LEASE);
        }
    }
    assert_eq!(h.view(lock), None, "round {round} leaves {lock:?} free");
    h.advance(1);
}

/// Takes lock "kept" for client 50 just before a restart and checks, just
/// after it, that the same grant is still held and can be released.
fn held_across(mut h: Harness, restart: fn(&Harness) -> Harness) -> Harness {
    let kept = h.grant("", acquire_lock(50, "kept", None, None));
    let mut h = restart(&h);
    assert_eq!(h.holder("kept"), Some(50));
    let again = h.grant("", acquire_lock(50, "kept", Some(0), None));
    assert_eq!((again.token, again.fence), (kept.token.clone(), kept.fence));
    h.done("", release_lock(50, "kept", &kept.token));
    h
}

#[test]
fn fencing_numbers_strictly_increase_across_grants_and_recovery() {
    let mut h = Harness::new();
    for round in 0..20 {
        churn_round(&mut h, round);
    }
    h = held_across(h, Harness::recovered_from_records);
    for round in 20..40 {
        churn_round(&mut h, round);
    }
    h = held_across(h, Harness::recovered_from_snapshot);
    for round in 40..60 {
        churn_round(&mut h, round);
    }
    // The log now starts at the snapshot: snapshot + records.
    h = held_across(h, Harness::recovered_from_records);
    for round in 60..80 {
        churn_round(&mut h, round);
    }

    let mut per_lock: BTreeMap<LockName, Vec<u64>> = BTreeMap::new();
    let mut all = Vec::new();
    for change in h.history.iter().flat_map(|r| &r.changes) {
        if let Change::Granted { lock, fence, .. } = change {
            per_lock.entry(lock.clone()).or_default().push(fence.0);
            all.push(fence.0);
        }
    }
    assert_eq!(
        all.len(),
        80 + 60 + 3,
        "one or two grants per round, one per restart"
    );
    for (lock, fences) in &per_lock {
        assert!(
            fences.windows(2).all(|w| w[0] < w[1]),
            "fences of {lock:?} do not strictly increase: {fences:?}"
        );
    }
    assert!(all.windows(2).all(|w| w[0] < w[1]), "never reused: {all:?}");
}

// 4. The example of DESIGN.md.

#[test]
fn bbaa_example_from_design() {
    let mut h = Harness::new();
    let one = h.grant("1a", acquire(1));
    h.done("1p", append(1, "file_0", "A", &one.token));
    h.advance(LEASE); // client 1 stalls past its lease
    assert_eq!(h.file(0), "");

    let two = h.grant("2a", acquire(2));
    h.done("2p1", append(2, "file_0", "B", &two.token));
    h.done("2p2", append(2, "file_0", "B", &two.token));
    // Client 1 wakes up and tries to carry on under its old grant.
    let stale = h.call("1q", append(1, "file_0", "A", &one.token));
    assert_eq!(h.refusal(stale), RefusalCode::InvalidToken);
    assert_eq!(h.file(0), "", "nothing is visible before the release");
    h.done("2r", release(2, &two.token));
    assert_eq!(h.file(0), "BB");

    let again = h.grant("1b", acquire(1));
    assert!(again.fence > two.fence);
    h.done("1p2", append(1, "file_0", "A", &again.token));
    h.done("1p3", append(1, "file_0", "A", &again.token));
    h.done("1r", release(1, &again.token));
    assert_eq!(h.file(0), "BBAA");

    assert_eq!(h.recovered_from_records().file(0), "BBAA");
    assert_eq!(h.recovered_from_snapshot().file(0), "BBAA");
}

// 5. Idempotency.

/// Sends `request` twice with `request_id` and checks that both calls get the
/// same reply and that the second persists nothing. Returns the reply.
fn twice(h: &mut Harness, request_id: &str, request: Request) -> Reply {
    let first = h.call(request_id, request.clone());
    let mark = h.records.len();
    let second = h.call(request_id, request.clone());
    let reply = h.reply(first).expect("answered");
    assert_eq!(h.reply(second), Some(reply.clone()), "{request:?}");
    assert_eq!(h.records.len(), mark, "the retry of {request:?} persisted");
    reply
}

#[test]
fn idempotent_client_init() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    assert_eq!(twice(&mut h, "i", init(1)), Reply::Done);
    assert_eq!(h.holder(""), Some(1), "init never releases");
    h.done("", release(1, &grant.token));
}

#[test]
fn idempotent_client_close() {
    let mut h = Harness::new();
    h.grant("a1", acquire(1));
    let mark = h.records.len();
    assert_eq!(twice(&mut h, "c", close(1)), Reply::Done);
    assert_eq!(h.view(""), None);
    assert_eq!(
        h.changes_since(mark).len(),
        2,
        "Ended and Answered: {:?}",
        h.changes_since(mark)
    );

    // A late copy of the close does not end the next session's grant.
    let grant = h.grant("a2", acquire(1));
    let mark = h.records.len();
    let late = h.call("c", close(1));
    assert_eq!(h.reply(late), Some(Reply::Done));
    assert_eq!(h.records.len(), mark);
    assert_eq!(h.holder(""), Some(1));
    h.done("", release(1, &grant.token));
}

#[test]
fn idempotent_acquire_immediate_grant() {
    let mut h = Harness::new();
    let mark = h.records.len();
    let reply = twice(&mut h, "a", acquire(1));
    let Reply::Granted(grant) = reply else {
        panic!("expected a grant, got {reply:?}");
    };
    assert_eq!(h.grants_since(mark), vec![("".into(), 1, grant.fence)]);

    // After the release, a late copy gets the old answer, not a new grant.
    h.done("r", release(1, &grant.token));
    let mark = h.records.len();
    let late = h.call("a", acquire(1));
    assert_eq!(h.granted(late), grant);
    assert_eq!(h.records.len(), mark);
    assert_eq!(h.view(""), None);
}

#[test]
fn idempotent_acquire_queued() {
    let mut h = Harness::new();
    let holder = h.grant("h", acquire(9));
    let first = h.call("q", acquire(1));
    let mark = h.records.len();
    let copy = h.call("q", acquire(1));
    assert_eq!(h.records.len(), mark);
    assert_eq!(h.waiters(""), vec![(1, false)], "one waiter, not two");

    h.done("", release(9, &holder.token));
    let grant = h.granted(first);
    assert_eq!(h.granted(copy), grant);
    assert_eq!(h.grants_since(mark), vec![("".into(), 1, grant.fence)]);

    let mark = h.records.len();
    let late = h.call("q", acquire(1));
    assert_eq!(h.granted(late), grant);
    assert_eq!(h.records.len(), mark);
}

#[test]
fn idempotent_release() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.done("p", append(1, "file_5", "x", &grant.token));
    assert_eq!(twice(&mut h, "r", release(1, &grant.token)), Reply::Done);
    assert_eq!(h.file(5), "x");

    // A late copy after another client took the lock changes nothing.
    let other = h.grant("b", acquire(2));
    h.done("q", append(2, "file_5", "y", &other.token));
    let mark = h.records.len();
    let late = h.call("r", release(1, &grant.token));
    assert_eq!(h.reply(late), Some(Reply::Done));
    assert_eq!(h.records.len(), mark);
    assert_eq!(h.holder(""), Some(2));
    h.done("", release(2, &other.token));
    assert_eq!(h.file(5), "xy");
}

#[test]
fn idempotent_renew() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.advance(500);
    let first = h.call("n", renew(1, &grant.token));
    assert_eq!(
        h.reply(first),
        Some(Reply::Renewed {
            lease: Millis(LEASE)
        })
    );
    // The copy comes later; it must not move the deadline again.
    h.advance(400);
    let copy = h.call("n", renew(1, &grant.token));
    assert_eq!(h.reply(copy), h.reply(first));
    assert_eq!(h.core.next_deadline(), Some(Time::from_millis(500 + LEASE)));
    h.advance(LEASE - 400 - 1);
    assert_eq!(h.holder(""), Some(1));
    h.advance(1);
    assert_eq!(h.holder(""), None);
}

#[test]
fn idempotent_append_shows_content_once() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    let mark = h.records.len();
    assert_eq!(
        twice(&mut h, "p", append(1, "file_7", "once", &grant.token)),
        Reply::Done
    );
    let staged = h
        .changes_since(mark)
        .into_iter()
        .filter(|c| matches!(c, Change::Staged { .. }))
        .count();
    assert_eq!(staged, 1);
    h.done("r", release(1, &grant.token));
    assert_eq!(h.file(7), "once");
}

/// A late retry whose answer the dedup table already forgot is refused as
/// expired, and not applied again: live, after a restart that replays the
/// log, and after one from a snapshot. An id of another form is not.
#[test]
fn a_retry_whose_answer_was_forgotten_is_refused_not_applied_twice() {
    // Two client instances' prefixes, as the client library makes them.
    let c1 = |n: u64| format!("0b6e4f3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b#{n}");
    let c2 = |n: u64| format!("7d8e9f0a-2b3c-4d5e-9f6a-7b8c9d0e1f2a#{n}");
    let mut h = Harness::with_config(CoreConfig {
        dedup_capacity: 4,
        ..config()
    });
    let grant = h.grant(&c1(1), acquire(1));
    h.done(&c1(2), append(1, "file_3", "once", &grant.token));
    // Four more answers push the append's out (and the acquire's).
    for n in 0..4 {
        h.done(&c2(n), init(2));
    }
    let retry = |h: &mut Harness| {
        let call = h.call(&c1(2), append(1, "file_3", "once", &grant.token));
        h.refusal(call)
    };
    assert_eq!(retry(&mut h), RefusalCode::RequestExpired);
    assert_eq!(retry(&mut h), RefusalCode::RequestExpired, "and again");
    // The same prefix under another client id is another sequence.
    h.done(&c1(2), init(3));
    // A newer id of the prefix is served.
    h.done(&c1(3), append(1, "file_3", "twice", &grant.token));
    for mut restarted in [h.recovered_from_records(), h.recovered_from_snapshot()] {
        assert_eq!(retry(&mut restarted), RefusalCode::RequestExpired);
    }
    h.done(&c1(4), release(1, &grant.token));
    assert_eq!(h.file(3), "oncetwice", "each append exactly once");

    // Ids not of the form UUID#SEQ have no floor: nothing to check by (a
    // third party's `name#N` need not count up).
    let mut h = Harness::with_config(CoreConfig {
        dedup_capacity: 1,
        ..config()
    });
    h.done("uuid-a", init(1));
    h.done("uuid-b", init(1));
    h.done("uuid-a", init(1));
    h.done("job#7", init(1));
    h.done("job#8", init(1));
    h.done("job#1", init(1));
}

/// A replay planned with the log's answer count passes over the answers it
/// would evict before its end, and ends with the table an answer-by-answer
/// replay and the live core have: the same answers in the same order, the
/// same floors with the same flags. Logs shorter than, as long as and
/// longer than the capacity, onto a snapshot that holds answers and floors.
#[test]
fn a_planned_replay_keeps_the_table_the_live_core_has() {
    let p = |n: u64| format!("0b6e4f3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b#{n}");
    let q = |n: u64| format!("7d8e9f0a-2b3c-4d5e-9f6a-7b8c9d0e1f2a#{n}");
    let r = |n: u64| format!("5c4b3a29-1807-4f6e-8d5c-4b3a29180706#{n}");
    for logged in 0..16u64 {
        let mut h = Harness::with_config(CoreConfig {
            dedup_capacity: 5,
            ..config()
        });
        // The snapshot the log starts from holds answers, and a floor of
        // answers it forgot. Its answers of prefix `r` make a floor when
        // the log's answers push them out: before any floor of `q`'s.
        for n in 1..=4 {
            h.done(&p(n), init(1));
        }
        for n in 1..=3 {
            h.done(&r(n), init(4));
        }
        let mut h = h.recovered_from_snapshot();
        assert_eq!(h.base.answers.len(), 5);
        assert_eq!(h.base.floors.len(), 1);
        let mut next_p = 5;
        for n in 0..logged {
            match n % 3 {
                0 => h.done(&q(n + 1), init(3)),
                1 => h.done(&format!("bare-{n}"), init(2)),
                _ => {
                    let grant = h.grant(&p(next_p), acquire(1));
                    h.done(&p(next_p + 1), release(1, &grant.token));
                    next_p += 2;
                }
            }
        }
        // (recovered_from_records also compares with an unplanned replay.)
        let rebuilt = h.recovered_from_records();
        assert_eq!(
            rebuilt.core.snapshot(),
            h.core.snapshot(),
            "{logged} calls logged"
        );
    }
}

#[test]
fn a_lease_length_set_by_renew_or_re_acquire_is_what_a_restart_gives() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    assert_eq!(grant.lease, Millis(LEASE));

    // A renew to the same length changes nothing durable.
    let mark = h.records.len();
    let same = h.call("", renew_lock(1, DEFAULT_LOCK, &grant.token, Some(LEASE)));
    assert_eq!(
        h.reply(same),
        Some(Reply::Renewed {
            lease: Millis(LEASE)
        })
    );
    assert_eq!(h.records.len(), mark);

    // A longer one is logged, and later renews without a length keep it.
    let longer = h.call("", renew_lock(1, DEFAULT_LOCK, &grant.token, Some(50_000)));
    assert_eq!(
        h.reply(longer),
        Some(Reply::Renewed {
            lease: Millis(50_000)
        })
    );
    assert!(h.changes_since(mark).iter().any(|c| matches!(
        c,
        Change::LeaseSet {
            lease: Millis(50_000),
            ..
        }
    )));
    let plain = h.call("", renew(1, &grant.token));
    assert_eq!(
        h.reply(plain),
        Some(Reply::Renewed {
            lease: Millis(50_000)
        })
    );

    // A restart, from the log or from a snapshot, gives the length last
    // told, not the first one.
    h.advance(20_000);
    for recovered in [h.recovered_from_records(), h.recovered_from_snapshot()] {
        let mut recovered = recovered;
        assert_eq!(recovered.view("").unwrap().lease_left, Millis(50_000));
        recovered.advance(LEASE + 1);
        assert_eq!(
            recovered.holder(""),
            Some(1),
            "still held past the first length"
        );
    }

    // A re-acquire by the holder with a length that reaches past the
    // deadline sets it too, shorter than the last one as it is (30,000 ms
    // of the 50,000 are left).
    let again = h.call("", acquire_lock(1, DEFAULT_LOCK, None, Some(40_000)));
    assert_eq!(h.granted(again).lease, Millis(40_000));
    let mut recovered = h.recovered_from_records();
    assert_eq!(recovered.view("").unwrap().lease_left, Millis(40_000));
    recovered.advance(40_001);
    assert_eq!(recovered.holder(""), None, "the shorter lease ran out");
}

#[test]
fn oversized_request_ids_and_lock_names_are_refused_and_never_remembered() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    let snapshot = h.core.snapshot();
    let long_id = "i".repeat(super::MAX_REQUEST_ID_BYTES + 1);
    let long_lock = "l".repeat(300);
    for (request_id, request) in [
        (long_id.as_str(), acquire(2)),
        (long_id.as_str(), release(1, &grant.token)),
        (long_id.as_str(), renew(1, &grant.token)),
        (long_id.as_str(), append(1, "file_0", "z", &grant.token)),
        (long_id.as_str(), close(1)),
        ("r", release_lock(1, &long_lock, &grant.token)),
        ("n", renew_lock(1, &long_lock, &grant.token, None)),
        ("q", acquire_lock(2, &long_lock, None, None)),
    ] {
        let mark = h.records.len();
        let call = h.call(request_id, request.clone());
        assert_eq!(h.refusal(call), RefusalCode::InvalidArgument, "{request:?}");
        assert_eq!(h.records.len(), mark, "nothing logged: {request:?}");
    }
    assert_eq!(h.core.snapshot(), snapshot, "nothing remembered or changed");
    // The longest id accepted still works, and is remembered.
    let longest = "i".repeat(super::MAX_REQUEST_ID_BYTES);
    let first = h.call(&longest, renew(1, &grant.token));
    let again = h.call(&longest, renew(1, &grant.token));
    assert_eq!(h.reply(first), h.reply(again));
    assert!(matches!(h.reply(first), Some(Reply::Renewed { .. })));
}

#[test]
fn idempotent_request_id_reused_for_another_operation_is_refused() {
    let mut h = Harness::new();
    h.done("x", init(1));
    let grant = h.grant("a", acquire(1));
    let snapshot = h.core.snapshot();
    for request in [
        acquire(1),
        release(1, &grant.token),
        renew(1, &grant.token),
        append(1, "file_0", "z", &grant.token),
        close(1),
    ] {
        let mark = h.records.len();
        let call = h.call("x", request.clone());
        assert_eq!(h.refusal(call), RefusalCode::InvalidArgument, "{request:?}");
        assert_eq!(h.records.len(), mark, "{request:?}");
    }
    assert_eq!(h.core.snapshot(), snapshot, "nothing changed");
    let again = h.call("x", init(1));
    assert_eq!(h.reply(again), Some(Reply::Done), "the first answer stays");
    // Request ids are per client.
    h.done("x", init(2));

    // Also while the first use is still a queued acquire.
    let queued = h.call("q", acquire(2));
    let reused = h.call("q", renew(2, &grant.token));
    assert_eq!(h.refusal(reused), RefusalCode::InvalidArgument);
    assert_eq!(h.waiters(""), vec![(2, false)]);
    h.done("", release(1, &grant.token));
    h.granted(queued);
}

/// A request, its id, and the first answer it got.
struct Answered {
    request_id: String,
    request: Request,
    reply: Reply,
}

/// Requests whose answers change durable state (and are persisted): an
/// immediate and a queued acquire, an append, a release, and a close that
/// ends a grant. Leaves client 2 holding the default lock.
fn durable_answers(h: &mut Harness) -> Vec<Answered> {
    let mut answered = Vec::new();
    let Reply::Granted(one) = send(h, &mut answered, "a1", acquire(1)) else {
        panic!("client 1 gets the free lock");
    };
    send(
        h,
        &mut answered,
        "p1",
        append(1, "file_3", "once", &one.token),
    );
    let queued = h.call("a2", acquire(2));
    send(h, &mut answered, "r1", release(1, &one.token));
    let two = h.granted(queued);
    answered.push(Answered {
        request_id: "a2".to_owned(),
        request: acquire(2),
        reply: Reply::Granted(two),
    });
    h.grant("a3", acquire_lock(3, "x", None, None));
    send(h, &mut answered, "c3", close(3));
    assert_eq!(h.file(3), "once");
    answered
}

/// Sends `request` and keeps it with the answer it got at once.
fn send(
    h: &mut Harness,
    answered: &mut Vec<Answered>,
    request_id: &str,
    request: Request,
) -> Reply {
    let call = h.call(request_id, request.clone());
    let reply = h.reply(call).expect("answered at once");
    answered.push(Answered {
        request_id: request_id.to_owned(),
        request,
        reply: reply.clone(),
    });
    reply
}

/// Requests whose answers change no durable state: an init, a renew and a
/// close of a client that holds nothing. Returns them with their answers.
fn volatile_answers(h: &mut Harness) -> Vec<Answered> {
    let two = h.grant("", acquire(2)); // the holder re-acquires: the same grant
    let mut answered = Vec::new();
    send(h, &mut answered, "i4", init(4));
    send(h, &mut answered, "n2", renew(2, &two.token));
    send(h, &mut answered, "c4", close(4));
    answered
}

/// Sends every request again and checks it gets its first answer and
/// changes nothing.
fn check_answers_again(h: &mut Harness, answered: &[Answered]) {
    let snapshot = h.core.snapshot();
    for a in answered {
        let mark = h.records.len();
        let call = h.call(&a.request_id, a.request.clone());
        assert_eq!(h.reply(call), Some(a.reply.clone()), "{:?}", a.request);
        assert_eq!(
            h.records.len(),
            mark,
            "the retry of {:?} persisted",
            a.request
        );
    }
    assert_eq!(h.core.snapshot(), snapshot, "the retries changed the state");
    assert_eq!(h.file(3), "once");
    assert_eq!(h.holder(""), Some(2));
}

#[test]
fn idempotent_answers_survive_recovery_from_records() {
    let mut h = Harness::new();
    let answered = durable_answers(&mut h);
    let mut h = h.recovered_from_records();
    check_answers_again(&mut h, &answered);
}

#[test]
fn idempotent_answers_survive_recovery_from_snapshot() {
    let mut h = Harness::new();
    let mut answered = durable_answers(&mut h);
    answered.extend(volatile_answers(&mut h));
    let mut h = h.recovered_from_snapshot();
    check_answers_again(&mut h, &answered);
}

#[test]
fn idempotent_renew_answer_survives_recovery_from_records() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    let first = h.call("n", renew(1, &grant.token));
    assert_eq!(
        h.reply(first),
        Some(Reply::Renewed {
            lease: Millis(LEASE)
        })
    );
    h.done("r", release(1, &grant.token));

    let mut h = h.recovered_from_records();
    let retry = h.call("n", renew(1, &grant.token));
    assert_eq!(
        h.reply(retry),
        Some(Reply::Renewed {
            lease: Millis(LEASE)
        })
    );
}

#[test]
fn idempotent_client_close_answer_survives_recovery_from_records() {
    let mut h = Harness::new();
    h.done("c", close(1)); // holds nothing yet
    let grant = h.grant("a", acquire(1));

    let mut h = h.recovered_from_records();
    let mark = h.records.len();
    let late = h.call("c", close(1));
    assert_eq!(h.reply(late), Some(Reply::Done));
    assert_eq!(h.records.len(), mark, "the late close was applied again");
    assert_eq!(h.holder(""), Some(1));
    h.done("", release(1, &grant.token));
}

#[test]
fn idempotent_client_init_answer_survives_recovery_from_records() {
    let mut h = Harness::new();
    h.done("i", init(1));

    let mut h = h.recovered_from_records();
    let mark = h.records.len();
    let reused = h.call("i", acquire(1));
    assert_eq!(h.refusal(reused), RefusalCode::InvalidArgument);
    assert_eq!(h.records.len(), mark);
}

// Bad input.

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.done("p", append(1, "file_0", "ok", &grant.token));
    let named = h.grant("b", acquire_lock(2, "named", None, None));

    let long = "x".repeat(5_000);
    let oversize = "y".repeat(MAX_APPEND + 1);
    let t = &*grant.token;
    use RefusalCode::*;
    let cases: Vec<(Request, RefusalCode)> = vec![
        (append(1, "../x", "z", t), InvalidArgument),
        (append(1, "/etc/passwd", "z", t), InvalidArgument),
        (append(1, "file_100", "z", t), InvalidArgument),
        (append(1, "file_0/../../x", "z", t), InvalidArgument),
        (append(1, "", "z", t), InvalidArgument),
        (append(1, &long, "z", t), InvalidArgument),
        (append(1, "file_0", &oversize, t), InvalidArgument),
        (append(1, "file_0", "z", "garbage"), InvalidToken),
        (append(1, "file_0", "z", ""), InvalidToken),
        (append(2, "file_0", "z", t), PermissionDenied),
        (release(1, "garbage"), InvalidToken),
        (release(3, "garbage"), InvalidToken),
        (release(3, t), PermissionDenied),
        (release_lock(3, "nobody", "garbage"), LockNotHeld),
        (release_lock(1, "named", t), InvalidToken),
        (renew(1, "garbage"), InvalidToken),
        (renew_lock(1, "", t, Some(0)), InvalidArgument),
        (renew_lock(1, "", t, Some(u64::MAX)), InvalidArgument),
        (acquire_lock(3, "free", None, Some(0)), InvalidArgument),
        (
            acquire_lock(3, "free", None, Some(u64::MAX)),
            InvalidArgument,
        ),
        (
            acquire_lock(3, "free", Some(u64::MAX), None),
            InvalidArgument,
        ),
        (acquire_lock(3, "", Some(u64::MAX), None), InvalidArgument),
        (acquire_lock(3, "", None, Some(0)), InvalidArgument),
        (acquire_lock(3, "bad\nname", None, None), InvalidArgument),
        (acquire_lock(3, &long, None, None), InvalidArgument),
        (acquire_lock(3, "", Some(0), None), LockHeld),
    ];

    let durable = |s: Snapshot| (s.last_fence, s.file_lengths, s.grants);
    let snapshot = durable(h.core.snapshot());
    let status = h.status();
    let deadline = h.core.next_deadline();
    for (i, (request, code)) in cases.into_iter().enumerate() {
        for request_id in [String::new(), format!("bad{i}")] {
            let mark = h.records.len();
            let call = h.call(&request_id, request.clone());
            assert_eq!(h.refusal(call), code, "{request:?}");
            // Nothing changes: at most the answer is remembered for the
            // request id (so a replay after a restart gets it again).
            let only_answers = h.records[mark..]
                .iter()
                .flat_map(|r| r.changes.iter())
                .all(|c| matches!(c, Change::Answered { .. }));
            assert!(only_answers, "{request:?} changed durable state");
            if request_id.is_empty() || code == InvalidArgument {
                assert_eq!(h.records.len(), mark, "{request:?} persisted");
            }
            let message = match h.reply(call) {
                Some(Reply::Refused(r)) => r.message,
                _ => unreachable!(),
            };
            assert!(!message.is_empty() && message.len() < 200, "{message}");
        }
    }
    assert_eq!(durable(h.core.snapshot()), snapshot);
    assert_eq!(h.status(), status);
    assert_eq!(h.core.next_deadline(), deadline);
    assert!(h.files.iter().all(Vec::is_empty));

    h.done("", release(1, &grant.token));
    h.done("", release_lock(2, "named", &named.token));
    assert_eq!(h.file(0), "ok");
    assert_eq!(h.files.iter().map(Vec::len).sum::<usize>(), 2);
}

#[test]
fn bad_input_limits_are_inclusive() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire_lock(1, "", None, Some(10)));
    let exact = "e".repeat(MAX_APPEND);
    h.done("p", append(1, "file_99", &exact, &grant.token));
    let longest = h.call("n", renew_lock(1, "", &grant.token, Some(60_000)));
    assert_eq!(
        h.reply(longest),
        Some(Reply::Renewed {
            lease: Millis(60_000)
        })
    );
    h.done("r", release(1, &grant.token));
    assert_eq!(h.file(99), exact);
    h.grant("w", acquire_lock(2, "w", Some(60_000), None));
}

// Recovery.

#[test]
fn recovery_replay_of_all_records_reproduces_files_and_snapshot() {
    let mut h = Harness::new();
    // Critical sections on the default lock, ending every way a grant ends.
    for i in 0..9 {
        let client = ClientId::try_from(i % 3).expect("small") + 1;
        let grant = h.grant(&format!("a{i}"), acquire(client));
        for f in 0..3 {
            let file = format!("file_{}", (i * 7 + f * 31) % 100);
            let content = format!("<{i}.{f}>");
            h.done(
                &format!("p{i}.{f}"),
                append(client, &file, &content, &grant.token),
            );
        }
        match i % 3 {
            0 => h.done(&format!("r{i}"), release(client, &grant.token)),
            1 => h.advance(LEASE),
            _ => h.done(&format!("c{i}"), close(client)),
        }
        h.advance(3);
    }
    // A queued waiter granted by a release, and one granted while cut off.
    let held = h.grant("h", acquire(1));
    h.done("hp", append(1, "file_1", "first", &held.token));
    let queued = h.call("w2", acquire(2));
    let away = h.call("w3", acquire(3));
    h.drop_call(away);
    h.done("hr", release(1, &held.token));
    let two = h.granted(queued);
    h.done("2p", append(2, "file_1", "second", &two.token));
    h.done("2r", release(2, &two.token));
    // Named locks, renewed and re-acquired without request ids (their
    // answers are remembered too).
    h.advance(LEASE); // the absent client 3's grant runs out
    let job = h.grant("j", acquire_lock(5, "jobs", None, Some(5_000)));
    h.call("", renew_lock(5, "jobs", &job.token, None));
    h.call("", init(5));
    h.grant("k", acquire_lock(6, "keys", None, None));
    // A grant of the default lock still held, with staged appends.
    let last = h.grant("l", acquire(7));
    h.done("lp1", append(7, "file_42", "staged", &last.token));
    h.done("lp2", append(7, "file_0", "too", &last.token));

    let mut rebuilt = h.recovered_from_records();
    assert_eq!(rebuilt.core.snapshot(), h.core.snapshot());
    assert_eq!(rebuilt.files, h.files);
    assert_eq!(h.files.iter().filter(|f| !f.is_empty()).count(), 10);
    // Re-applying the writes onto files that already have them is exact.
    let mut again = h.files.clone();
    let mut core = Core::restore(config(), seed(9), Snapshot::default());
    for record in &h.records {
        for write in core.replay(record.clone()).expect("replays") {
            apply_write(&mut again, &write);
        }
    }
    assert_eq!(again, h.files);
    assert_eq!(core.snapshot(), h.core.snapshot());

    let mut from_snapshot = h.recovered_from_snapshot();
    assert_eq!(from_snapshot.core.snapshot(), h.core.snapshot());

    // The staged appends survive both ways, and commit alike on release.
    for copy in [&mut h, &mut rebuilt, &mut from_snapshot] {
        copy.done("lr", release(7, &last.token));
    }
    assert_eq!(rebuilt.files, h.files);
    assert_eq!(from_snapshot.files, h.files);
    assert_eq!(h.file(42), "<6.0>staged");
    assert_eq!(h.file(0), "<0.0>too");
}

#[test]
fn recovery_from_snapshot_then_records_keeps_staged_appends_in_order() {
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.done("p1", append(1, "file_9", "1", &grant.token));
    let mut h = h.recovered_from_snapshot();
    h.done("p2", append(1, "file_9", "2", &grant.token));
    let mut h = h.recovered_from_records();
    h.done("p3", append(1, "file_9", "3", &grant.token));
    assert_eq!(h.file(9), "");
    h.done("r", release(1, &grant.token));
    assert_eq!(h.file(9), "123");
    let rebuilt = h.recovered_from_records();
    assert_eq!(rebuilt.file(9), "123");
    assert_eq!(rebuilt.core.snapshot(), h.core.snapshot());
}

#[test]
fn recovery_replay_reproduces_snapshot_with_answers_to_init_renew_and_refusals() {
    let mut h = Harness::new();
    h.done("i", init(1));
    let grant = h.grant("a", acquire(1));
    h.call("n", renew(1, &grant.token));
    let busy = h.call("t", acquire_lock(2, "", Some(0), None));
    assert_eq!(h.refusal(busy), RefusalCode::LockHeld);

    let rebuilt = h.recovered_from_records();
    assert_eq!(rebuilt.core.snapshot(), h.core.snapshot());
}

#[test]
fn replay_of_record_naming_non_current_grant_returns_err() {
    let record = |change: Change| Record {
        changes: vec![change],
    };
    let granted = |lock: &str, fence: u64| {
        record(Change::Granted {
            lock: lock.into(),
            client: 1,
            token: "t".into(),
            fence: Fence(fence),
            lease: Millis(LEASE),
        })
    };
    let released = |lock: &str, fence: u64| {
        record(Change::Released {
            lock: lock.into(),
            fence: Fence(fence),
        })
    };
    let ended = |lock: &str, fence: u64| {
        record(Change::Ended {
            lock: lock.into(),
            fence: Fence(fence),
        })
    };
    let staged = |fence: u64| {
        record(Change::Staged {
            fence: Fence(fence),
            file: FileIndex::parse("file_0").expect("valid"),
            content: Bytes::from_static(b"s"),
        })
    };
    let not_current = |lock: &str, fence: u64| ReplayError::NotCurrent {
        lock: lock.into(),
        fence: Fence(fence),
    };

    let mut core = Core::restore(config(), SEED, Snapshot::default());
    // Nothing is held.
    assert_eq!(core.replay(released("", 1)), Err(not_current("", 1)));
    assert_eq!(core.replay(ended("x", 1)), Err(not_current("x", 1)));
    assert_eq!(core.replay(staged(1)), Err(not_current("", 1)));
    // Grant 1 of the default lock is current; nothing else is.
    assert_eq!(core.replay(granted("", 1)), Ok(vec![]));
    assert_eq!(core.replay(released("", 2)), Err(not_current("", 2)));
    assert_eq!(core.replay(ended("", 0)), Err(not_current("", 0)));
    assert_eq!(core.replay(ended("x", 1)), Err(not_current("x", 1)));
    assert_eq!(core.replay(staged(2)), Err(not_current("", 2)));
    assert_eq!(
        core.replay(granted("", 2)),
        Err(ReplayError::AlreadyHeld {
            lock: "".into(),
            fence: Fence(2)
        })
    );
    assert_eq!(core.replay(staged(1)).map(|w| w.len()), Ok(0));
    assert_eq!(core.replay(released("", 1)).map(|w| w.len()), Ok(1));
    assert_eq!(core.replay(released("", 1)), Err(not_current("", 1)));

    // A real log replayed with one record twice.
    let mut h = Harness::new();
    let grant = h.grant("a", acquire(1));
    h.done("p", append(1, "file_0", "x", &grant.token));
    h.done("r", release(1, &grant.token));
    let mut core = Core::restore(config(), SEED, Snapshot::default());
    for r in &h.records {
        core.replay(r.clone()).expect("the log replays once");
    }
    let last = h.records.last().expect("logged");
    assert_eq!(
        core.replay(last.clone()),
        Err(not_current("", grant.fence.0))
    );
}
