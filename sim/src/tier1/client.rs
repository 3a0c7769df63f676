//! Simulated clients that follow the client library's rules: one request id
//! per operation across all its retries, a deadline per attempt (and a
//! cancel when an attempt is abandoned, as a dropped call would), backoff
//! with full jitter, renewals at a third of the lease while holding. They
//! also misbehave: stall past their lease and crash.

use bytes::Bytes;

use dlm::core::dedup;
use dlm::core::time::Millis;
use dlm::core::types::{RefusalCode, Reply, Request};

use super::{Dir, Event, World};
use crate::history::{AppendRec, Outcome, TokenOp};

/// Deadline of one attempt of an operation that does not wait.
const ATTEMPT_MS: u64 = 300;
/// Longest attempt of a waiting acquire.
const WAIT_ATTEMPT_MS: u64 = 1_000;
/// How long an operation that does not wait keeps retrying.
const BUDGET_MS: u64 = 5_000;
const BACKOFF_BASE_MS: u64 = 10;
const BACKOFF_MAX_MS: u64 = 200;

/// What an operation is for.
#[derive(Clone, Debug)]
pub enum OpKind {
    Init,
    Acquire { lock: String },
    Append { index: usize },
    Renew,
    Release,
    Close,
}

impl OpKind {
    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Init => "init",
            OpKind::Acquire { .. } => "acquire",
            OpKind::Append { .. } => "append",
            OpKind::Renew => "renew",
            OpKind::Release => "release",
            OpKind::Close => "close",
        }
    }
}

/// An operation in progress.
pub struct Op {
    pub kind: OpKind,
    pub request_id: String,
    pub request: Request,
    pub invoked: u64,
    /// Attempts of this operation have ids from here on.
    first_attempt: u64,
    attempt: u64,
    attempt_deadline: Option<u64>,
    retry_at: Option<u64>,
    tries: u32,
    budget_end: u64,
    wait_end: Option<u64>,
}

/// A grant the client believes it holds.
pub struct Holding {
    lock: String,
    token: String,
    lease: u64,
    renewed_at: u64,
    appends_left: u32,
}

/// One simulated client.
pub struct Client {
    pub id: i32,
    lease: u64,
    pub alive: bool,
    incarnation: u64,
    seq: u64,
    next_attempt: u64,
    needs_init: bool,
    pub op: Option<Op>,
    holding: Option<Holding>,
    idle_until: u64,
    paused_until: u64,
    pub wake_at: Option<u64>,
    pub wake_generation: u64,
    pub ops_since_heal: u64,
}

impl Client {
    pub fn new(id: i32, lease: u64) -> Client {
        Client {
            id,
            lease,
            alive: true,
            incarnation: 0,
            seq: 0,
            next_attempt: 0,
            needs_init: true,
            op: None,
            holding: None,
            idle_until: 0,
            paused_until: 0,
            wake_at: None,
            wake_generation: 0,
            ops_since_heal: 0,
        }
    }
}

impl World {
    pub(super) fn client_wake_now(&mut self, i: usize) {
        self.schedule_wake(i, self.now);
    }

    fn schedule_wake(&mut self, i: usize, at: u64) {
        let client = &mut self.clients[i];
        if client.wake_at.is_some_and(|w| w <= at) {
            return;
        }
        client.wake_generation += 1;
        client.wake_at = Some(at);
        let generation = client.wake_generation;
        self.at(
            at,
            Event::ClientWake {
                client: i,
                generation,
            },
        );
    }

    /// Decides what the client does next, and when it wakes again.
    pub(super) fn client_step(&mut self, i: usize) {
        let now = self.now;
        if !self.clients[i].alive {
            return;
        }
        if self.clients[i].paused_until > now {
            let until = self.clients[i].paused_until;
            self.schedule_wake(i, until);
            return;
        }
        if let Some(op) = &self.clients[i].op {
            if op.retry_at.is_some_and(|t| t <= now) {
                self.send_attempt(i);
            } else if op.attempt_deadline.is_some_and(|t| t <= now) {
                self.attempt_timed_out(i);
            }
            self.reschedule(i);
            return;
        }
        let client = &self.clients[i];
        if client.needs_init {
            let request = Request::ClientInit { client: client.id };
            self.start_op(i, OpKind::Init, request);
        } else if let Some(holding) = &client.holding {
            let (lock, token, lease, renewed_at, appends_left) = (
                holding.lock.clone(),
                holding.token.clone(),
                holding.lease,
                holding.renewed_at,
                holding.appends_left,
            );
            let id = client.id;
            if !self.healed && self.rng.chance(self.scenario.pause) {
                let stall = lease * self.rng.between(15, 30) / 10;
                self.clients[i].paused_until = now + stall;
                self.faults.client_pauses += 1;
                self.log(|| format!("c{id} stalls {stall} ms (lease {lease})"));
            } else if now >= renewed_at + lease / 3 {
                let request = Request::Renew {
                    client: id,
                    lock: lock.into(),
                    token,
                    lease: Some(Millis(lease)),
                };
                self.start_op(i, OpKind::Renew, request);
            } else if appends_left > 0 {
                let file = self.rng.between(0, 4) as usize;
                let seq = self.clients[i].seq;
                let marker = format!("<{id}.{}.{seq}>", self.clients[i].incarnation);
                let index = self.history.appends.len();
                self.history.appends.push(AppendRec {
                    token: token.clone(),
                    file,
                    marker: marker.clone(),
                    outcome: Outcome::Unknown,
                });
                let request = Request::Append {
                    client: id,
                    file: format!("file_{file}"),
                    content: Bytes::from(marker),
                    token,
                };
                self.start_op(i, OpKind::Append { index }, request);
            } else if self.rng.chance(0.05) {
                self.start_op(i, OpKind::Close, Request::ClientClose { client: id });
            } else {
                let request = Request::Release {
                    client: id,
                    lock: lock.into(),
                    token,
                };
                self.start_op(i, OpKind::Release, request);
            }
        } else if now >= client.idle_until {
            let id = client.id;
            let lease = client.lease;
            let lock = if self.rng.chance(0.7) { "" } else { "x" }.to_owned();
            let wait = self.rng.chance(0.25).then(|| self.rng.between(50, 2_000));
            let request = Request::Acquire {
                client: id,
                lock: lock.as_str().into(),
                wait: wait.map(Millis),
                lease: Some(Millis(lease)),
            };
            self.start_op(i, OpKind::Acquire { lock }, request);
            if let (Some(op), Some(wait)) = (&mut self.clients[i].op, wait) {
                op.wait_end = Some(now + wait);
            }
        }
        self.reschedule(i);
    }

    fn reschedule(&mut self, i: usize) {
        let now = self.now;
        let client = &self.clients[i];
        if !client.alive {
            return;
        }
        let at = if client.paused_until > now {
            client.paused_until
        } else if let Some(op) = &client.op {
            match (op.retry_at, op.attempt_deadline) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
                (None, None) => return,
            }
        } else if client.holding.is_some() {
            now + self.rng.between(1, 20)
        } else {
            client.idle_until.max(now + 1)
        };
        self.schedule_wake(i, at);
    }

    fn start_op(&mut self, i: usize, kind: OpKind, request: Request) {
        let now = self.now;
        let client = &mut self.clients[i];
        client.seq += 1;
        // UUID#SEQ, as the client library sends (a UUID per incarnation):
        // the server can tell a late retry whose answer it forgot.
        let prefix = (u128::from(client.id as u32) << 64) | u128::from(client.incarnation);
        let request_id = format!("{}#{}", dedup::format_uuid(prefix), client.seq);
        client.op = Some(Op {
            kind,
            request_id,
            request,
            invoked: now,
            first_attempt: client.next_attempt,
            attempt: client.next_attempt,
            attempt_deadline: None,
            retry_at: Some(now),
            tries: 0,
            budget_end: now + BUDGET_MS,
            wait_end: None,
        });
        self.send_attempt(i);
    }

    fn send_attempt(&mut self, i: usize) {
        let now = self.now;
        let client = &mut self.clients[i];
        let incarnation = client.incarnation;
        let attempt = client.next_attempt;
        client.next_attempt += 1;
        let id = client.id;
        let Some(op) = &mut client.op else {
            return;
        };
        op.attempt = attempt;
        op.tries += 1;
        op.retry_at = None;
        let mut request = op.request.clone();
        let deadline = match (&mut request, op.wait_end) {
            (Request::Acquire { wait, .. }, Some(end)) => {
                let left = end.saturating_sub(now);
                *wait = Some(Millis(left));
                now + (left + 200).min(WAIT_ATTEMPT_MS)
            }
            (Request::Acquire { .. }, None) => now + WAIT_ATTEMPT_MS,
            _ => now + ATTEMPT_MS,
        };
        op.attempt_deadline = Some(deadline);
        let request_id = op.request_id.clone();
        let name = op.kind.name();
        self.log(|| format!("c{id} -> #{attempt} {name} {request_id}"));
        self.send(
            Dir::Up(i),
            Event::ToServer {
                client: i,
                incarnation,
                attempt,
                request_id,
                request,
            },
        );
    }

    /// The attempt's deadline passed: drop the call (the server may keep the
    /// waiter's place for the request id) and retry after a jittered backoff.
    fn attempt_timed_out(&mut self, i: usize) {
        let now = self.now;
        let incarnation = self.clients[i].incarnation;
        let Some(op) = &mut self.clients[i].op else {
            return;
        };
        let attempt = op.attempt;
        op.attempt_deadline = None;
        let ceiling = (BACKOFF_BASE_MS << op.tries.min(10)).min(BACKOFF_MAX_MS);
        let is_acquire = matches!(op.kind, OpKind::Acquire { .. });
        let wait_over = op.wait_end.is_some_and(|end| end <= now);
        let budget_over = !is_acquire && now >= op.budget_end;
        self.send(
            Dir::Up(i),
            Event::Cancel {
                client: i,
                incarnation,
                attempt,
            },
        );
        if wait_over || budget_over {
            self.op_unknown(i);
            return;
        }
        let backoff = self.rng.between(1, ceiling);
        if let Some(op) = &mut self.clients[i].op {
            op.retry_at = Some(now + backoff);
        }
    }

    pub(super) fn client_reply(&mut self, i: usize, incarnation: u64, attempt: u64, reply: Reply) {
        let client = &self.clients[i];
        if !client.alive || client.incarnation != incarnation {
            return;
        }
        let Some(op) = &client.op else {
            return;
        };
        if attempt < op.first_attempt {
            return; // an answer to an earlier operation
        }
        let Some(op) = self.clients[i].op.take() else {
            return;
        };
        let id = self.clients[i].id;
        self.log(|| format!("c{id} <- {} {reply:?}", op.kind.name()));
        // An expired refusal is no progress: a server that refused
        // everything so would otherwise pass the liveness check.
        if self.healed && !is_expired(&reply) {
            self.clients[i].ops_since_heal += 1;
        }
        self.finish_op(i, op, reply);
        let think = self.rng.between(0, 20);
        self.schedule_wake(i, self.now + think);
    }

    fn finish_op(&mut self, i: usize, op: Op, reply: Reply) {
        if is_expired(&reply) {
            // The server forgot this id's answer: the outcome is unknown.
            self.forget_op(i, op);
            self.clients[i].idle_until = self.now + self.rng.between(0, 100);
            return;
        }
        let now = self.now;
        let id = self.clients[i].id;
        let token = self.clients[i]
            .holding
            .as_ref()
            .map(|h| h.token.clone())
            .unwrap_or_default();
        let ok = !matches!(reply, Reply::Refused(_));
        if ok
            && matches!(
                op.kind,
                OpKind::Append { .. } | OpKind::Renew | OpKind::Release
            )
        {
            self.history.token_ops.push(TokenOp {
                token: token.clone(),
                what: op.kind.name(),
                invoked: op.invoked,
                acked: now,
            });
        }
        match (op.kind, reply) {
            (OpKind::Init, _) => self.clients[i].needs_init = false,
            (OpKind::Acquire { lock }, Reply::Granted(grant)) => {
                self.history
                    .grant_acked(id, &lock, &grant.token, grant.fence.0);
                let appends_left = if lock.is_empty() {
                    self.rng.between(0, 3) as u32
                } else {
                    0
                };
                self.clients[i].holding = Some(Holding {
                    lock,
                    token: grant.token.to_string(),
                    lease: grant.lease.0,
                    renewed_at: now,
                    appends_left,
                });
            }
            (OpKind::Acquire { .. }, _) => {
                self.clients[i].idle_until = now + self.rng.between(0, 50)
            }
            (OpKind::Append { index }, reply) => {
                self.history.appends[index].outcome =
                    if ok { Outcome::Ok } else { Outcome::Refused };
                match (&mut self.clients[i].holding, reply) {
                    (Some(holding), Reply::Done) => {
                        holding.appends_left = holding.appends_left.saturating_sub(1)
                    }
                    _ => self.clients[i].holding = None,
                }
            }
            (OpKind::Renew, Reply::Renewed { .. }) => {
                if let Some(holding) = &mut self.clients[i].holding {
                    holding.renewed_at = op.invoked;
                }
            }
            (OpKind::Renew, _) => self.clients[i].holding = None,
            (OpKind::Release, reply) => {
                let outcome = if matches!(reply, Reply::Done) {
                    Outcome::Ok
                } else {
                    Outcome::Refused
                };
                if let Some(grant) = self.history.grants.get_mut(&token) {
                    grant.releases.push(outcome);
                }
                self.clients[i].holding = None;
                self.clients[i].idle_until = now + self.rng.between(0, 100);
            }
            (OpKind::Close, _) => self.clients[i].holding = None,
        }
    }

    /// No answer, and no more retries: the outcome stays unknown.
    fn op_unknown(&mut self, i: usize) {
        let Some(op) = self.clients[i].op.take() else {
            return;
        };
        self.forget_op(i, op);
        self.clients[i].idle_until = self.now + self.rng.between(0, 100);
    }

    fn forget_op(&mut self, i: usize, op: Op) {
        let token = self.clients[i]
            .holding
            .as_ref()
            .map(|h| h.token.clone())
            .unwrap_or_default();
        match op.kind {
            OpKind::Init => self.clients[i].needs_init = false,
            OpKind::Acquire { .. } => {}
            OpKind::Append { .. } | OpKind::Renew | OpKind::Close => self.clients[i].holding = None,
            OpKind::Release => {
                if let Some(grant) = self.history.grants.get_mut(&token) {
                    grant.releases.push(Outcome::Unknown);
                }
                self.clients[i].holding = None;
            }
        }
    }

    /// Ends the run for this client: an operation in flight stays unknown.
    pub(super) fn client_abandon(&mut self, i: usize) {
        if let Some(op) = self.clients[i].op.take() {
            self.forget_op(i, op);
        }
    }

    pub(super) fn client_crash(&mut self, i: usize) {
        if !self.clients[i].alive {
            return;
        }
        let id = self.clients[i].id;
        self.log(|| format!("c{id} CRASH"));
        self.faults.client_crashes += 1;
        if let Some(op) = self.clients[i].op.take() {
            self.forget_op(i, op);
        }
        let client = &mut self.clients[i];
        client.alive = false;
        client.holding = None;
        client.paused_until = 0;
        client.wake_at = None;
        client.wake_generation += 1;
        if !self.healed {
            let down = self.rng.between(100, 2_000);
            self.at(self.now + down, Event::ClientRestart { client: i });
        }
    }

    pub(super) fn client_restart(&mut self, i: usize) {
        let client = &mut self.clients[i];
        if client.alive {
            return;
        }
        client.alive = true;
        client.incarnation += 1;
        client.needs_init = true;
        client.idle_until = self.now;
        self.client_wake_now(i);
    }
}

/// The server forgot the answer to the request's id (`REQUEST_EXPIRED`).
fn is_expired(reply: &Reply) -> bool {
    matches!(reply, Reply::Refused(r) if r.code == RefusalCode::RequestExpired)
}
