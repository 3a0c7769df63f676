//! One client call end to end: pick a server, make an attempt under a
//! deadline, classify the outcome, back off, fail over, try again.
//!
//! Owns the list of servers and which one is current. It knows nothing about
//! locks, nor about the wire: the operations in [`super`] hand it a [`Call`]
//! (one request message), [`Conn`] carries it over whichever transport the
//! client uses, and this file hands back the first reply whose dlm status is
//! `OK`, or a typed [`Error`]. Every attempt of one call carries the same
//! request id (built into the request by the caller), so the server applies
//! it once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use tokio::time::Instant;

use super::conn::{Answer, Call, Conn, Wire};
use super::error::{AttemptError, Error};
use super::retry::{Backoff, BackoffPolicy};
use crate::proto;

/// Shortest deadline given to an attempt, so that an attempt made just
/// before the budget runs out still has a chance to get through.
pub(crate) const MIN_ATTEMPT: Duration = Duration::from_millis(50);

/// Timing knobs shared by every call of a client.
#[derive(Clone, Debug)]
pub(crate) struct Timing {
    /// Deadline of one attempt of a call that does not wait.
    pub attempt_timeout: Duration,
    /// Deadline of one attempt of an acquire that may wait server-side.
    pub wait_attempt_timeout: Duration,
    /// How long a call that does not wait keeps retrying.
    pub retry_budget: Duration,
    /// Delays between retries.
    pub backoff: BackoffPolicy,
    /// Where request ids and backoff jitter come from.
    pub entropy: Entropy,
    /// If set, each attempt gets at most half the time left until then
    /// (a guard's renewal: the lease's end), so that one that hangs on a
    /// dead server leaves time to try the next.
    pub halve_before: Option<Instant>,
}

/// One server the client may talk to.
#[derive(Debug)]
struct Server {
    /// The address as given, for messages.
    addr: String,
    /// The way to it: connects on first use and reconnects after a failure.
    conn: Conn,
}

/// The servers of a client and which one is in use.
#[derive(Debug)]
pub(crate) struct Servers {
    /// In the order given; failover walks it round-robin.
    list: Vec<Server>,
    /// Index of the server calls go to; moves on when an attempt there fails.
    current: AtomicUsize,
}

impl Servers {
    /// Connections to `addrs` over `wire` that connect on first use.
    /// Nothing is dialled yet.
    ///
    /// Must run inside a Tokio runtime (the channels spawn their workers).
    pub fn new(addrs: &[String], wire: &Wire, connect_timeout: Duration) -> Result<Servers, Error> {
        if addrs.is_empty() {
            return Err(Error::BadRequest("no server address given".into()));
        }
        let list = addrs
            .iter()
            .map(|addr| {
                Ok(Server {
                    addr: addr.clone(),
                    conn: Conn::new(addr, wire, connect_timeout)?,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Servers {
            list,
            current: AtomicUsize::new(0),
        })
    }

    /// Closes every QUIC connection (see [`crate::client::Client::close_connections`]).
    pub async fn close_connections(&self) {
        for server in &self.list {
            if let Conn::Quic(connector) = &server.conn {
                connector.close(Duration::from_millis(100)).await;
            }
        }
    }

    /// One server reached through a ready-made gRPC `channel` (a simulated
    /// network, a custom connector): it reconnects as the channel does.
    pub fn from_channel(channel: tonic::transport::Channel) -> Servers {
        let rpc = crate::proto::lock_service_client::LockServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX);
        Servers {
            list: vec![Server {
                addr: "the given channel".to_owned(),
                conn: Conn::Grpc { rpc, probe: None },
            }],
            current: AtomicUsize::new(0),
        }
    }

    /// The server to try now: its index and the way to it.
    fn pick(&self) -> (usize, &Conn) {
        let index = self.current.load(Ordering::Relaxed) % self.list.len();
        (index, &self.list[index].conn)
    }

    /// Fails over from server `index` to the next one, unless another call
    /// already moved on.
    fn failed(&self, index: usize) {
        let next = (index + 1) % self.list.len();
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// A reply that carries a dlm status: the response message of one method.
pub(crate) trait Reply: Sized {
    /// The raw `status` field.
    fn status(&self) -> i32;
    /// The `error_message` field.
    fn error_message(&self) -> &str;
    /// The reply inside `answer`, if it has this type.
    fn from_answer(answer: Answer) -> Option<Self>;
}

macro_rules! impl_reply {
    ($($t:ty => $($variant:ident)|+;)*) => {$(
        impl Reply for $t {
            fn status(&self) -> i32 {
                self.status
            }
            fn error_message(&self) -> &str {
                &self.error_message
            }
            fn from_answer(answer: Answer) -> Option<Self> {
                match answer {
                    $(Answer::$variant(reply))|+ => Some(reply),
                    _ => None,
                }
            }
        }
    )*};
}

impl_reply!(
    proto::Response => ClientInit | FileAppend | ClientClose;
    proto::LockResponse => LockAcquire | LockRelease;
    proto::LeaseResponse => RenewLease;
    proto::FileReadResponse => FileRead;
    proto::StatusResponse => LockStatus;
);

/// The client's randomness: request ids and backoff jitter. From the
/// operating system by default; from a seed for a deterministic simulation.
///
/// Request ids are `UUID#SEQ`: a random UUID per client (lowercase,
/// hyphenated: the one spelling the server keeps floors for) and a number
/// counting up from 1, one per operation, kept across its retries.
/// The server uses the form to refuse, rather than apply a second time, a
/// late retry whose answer it has forgotten (`REQUEST_EXPIRED`).
#[derive(Clone, Debug)]
pub(crate) struct Entropy {
    /// The seeded source shared by every call, if the client was given a seed.
    seeded: Option<Arc<Mutex<ChaCha8Rng>>>,
    /// This client's request ids.
    ids: Arc<IdSequence>,
}

/// The prefix and the next number of a client's request ids.
#[derive(Debug)]
struct IdSequence {
    prefix: String,
    next: AtomicU64,
}

impl IdSequence {
    fn new(prefix: uuid::Uuid) -> Arc<IdSequence> {
        Arc::new(IdSequence {
            prefix: prefix.to_string(),
            next: AtomicU64::new(1),
        })
    }
}

impl Default for Entropy {
    fn default() -> Entropy {
        Entropy {
            seeded: None,
            ids: IdSequence::new(uuid::Uuid::new_v4()),
        }
    }
}

impl Entropy {
    /// Randomness drawn from `seed` only.
    pub fn seeded(seed: u64) -> Entropy {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        Entropy {
            seeded: Some(Arc::new(Mutex::new(rng))),
            ids: IdSequence::new(uuid::Builder::from_random_bytes(bytes).into_uuid()),
        }
    }

    /// A fresh request id: `UUID#SEQ`.
    pub fn request_id(&self) -> String {
        let seq = self.ids.next.fetch_add(1, Ordering::Relaxed);
        format!("{}#{seq}", self.ids.prefix)
    }

    /// The backoff of one operation.
    pub fn backoff(&self, policy: BackoffPolicy) -> Backoff {
        match &self.seeded {
            None => Backoff::new(policy),
            Some(rng) => Backoff::seeded(
                policy,
                rng.lock().unwrap_or_else(|e| e.into_inner()).next_u64(),
            ),
        }
    }
}

/// One attempt: `call` over `conn` under a deadline of `timeout`, which the
/// server is told as well.
pub(crate) async fn attempt<R: Reply>(
    conn: &Conn,
    timeout: Duration,
    call: Call,
) -> Result<R, AttemptError> {
    match tokio::time::timeout(timeout, conn.send(call, timeout)).await {
        Err(_elapsed) => Err(AttemptError::TimedOut(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
        Ok(Err(error)) => Err(error),
        Ok(Ok(answer)) => {
            let reply = R::from_answer(answer).ok_or_else(|| {
                AttemptError::Refused(Error::Server("the answer of another call".into()))
            })?;
            if reply.status() == proto::Status::RequestExpired as i32 {
                return Err(AttemptError::Expired(reply.error_message().to_owned()));
            }
            match Error::from_reply(reply.status(), reply.error_message()) {
                None => Ok(reply),
                Some(refusal) => Err(AttemptError::Refused(refusal)),
            }
        }
    }
}

/// How an attempt of a retried call ended, for the loop driving it.
pub(crate) enum Outcome<R> {
    /// Done: return this.
    Done(Result<R, Error>),
    /// The attempt was cut off at the end of a long server-side wait: retry
    /// at once, on the same server (where the waiter's place is kept).
    CutOff(String),
    /// The attempt failed: fail over and retry after a backoff.
    Failed(String),
    /// The server answered that it forgot the request id, and the
    /// operation was given a new one: retry at once, on the same server
    /// (it answered; nothing is wrong with it).
    Renumbered(String),
}

/// Retry state of one operation: its backoff, how many attempts it made and
/// why the last one failed.
pub(crate) struct Retrier<'a> {
    /// The client's servers.
    servers: &'a Servers,
    /// Delays between attempts.
    backoff: Backoff,
    /// Name of the operation, for messages and traces.
    op: &'static str,
    /// Request id of the operation, for traces.
    request_id: &'a str,
    /// When the operation started.
    started: Instant,
    /// When it stops retrying; `None` retries until it succeeds.
    give_up: Option<Instant>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Why the last attempt failed, with the server it went to.
    last_failure: String,
    /// How many times the operation was given a new request id.
    renumbered: u32,
    /// [`Timing::halve_before`].
    halve_before: Option<Instant>,
}

impl<'a> Retrier<'a> {
    /// Starts the retries of operation `op`, begun at `started` (an
    /// operation of several rounds passes its own start, so that each round
    /// goes on with what is left), giving up `budget` after it (never when
    /// `None`).
    pub fn new(
        servers: &'a Servers,
        timing: &Timing,
        op: &'static str,
        request_id: &'a str,
        started: Instant,
        budget: Option<Duration>,
    ) -> Retrier<'a> {
        Retrier {
            servers,
            backoff: timing.entropy.backoff(timing.backoff),
            op,
            request_id,
            started,
            // A budget too long to count is no limit.
            give_up: budget.and_then(|b| started.checked_add(b)),
            attempts: 0,
            last_failure: String::new(),
            renumbered: 0,
            halve_before: timing.halve_before,
        }
    }

    /// The server for the next attempt and the deadline to give it: at most
    /// `timeout`, and no later than the give-up time.
    pub fn next_attempt(&mut self, timeout: Duration) -> (usize, &'a Conn, Duration) {
        self.attempts += 1;
        let (index, conn) = self.servers.pick();
        let timeout = match self.give_up {
            Some(give_up) => timeout
                .min(give_up.saturating_duration_since(Instant::now()))
                .max(MIN_ATTEMPT),
            None => timeout,
        };
        let timeout = match self.halve_before {
            Some(end) => timeout
                .min(end.saturating_duration_since(Instant::now()) / 2)
                .max(MIN_ATTEMPT),
            None => timeout,
        };
        (index, conn, timeout)
    }

    /// Takes the outcome of the attempt that went to server `index`: returns
    /// the result once there is one, or sleeps before the next attempt.
    pub async fn settle<R>(
        &mut self,
        index: usize,
        outcome: Outcome<R>,
    ) -> Option<Result<R, Error>> {
        let addr = self.servers.list[index].addr.as_str();
        match outcome {
            Outcome::Done(result) => return Some(result),
            Outcome::CutOff(reason) => {
                tracing::debug!(op = self.op, request_id = self.request_id, server = addr, %reason,
                    "attempt cut off while waiting; re-attaching");
                self.backoff.reset();
                self.last_failure = format!("{addr}: {reason}");
                // At once, without a backoff: the server keeps the waiter's
                // place only for its lease (which may be a few ms), and the
                // attempt waited at least half its timeout, so this is no
                // busy loop.
                let past = self
                    .give_up
                    .is_some_and(|give_up| Instant::now() >= give_up);
                return past.then(|| Err(self.exhausted()));
            }
            Outcome::Failed(reason) => {
                tracing::debug!(op = self.op, request_id = self.request_id, server = addr,
                    attempt = self.attempts, %reason, "attempt failed; failing over");
                self.servers.failed(index);
                self.last_failure = format!("{addr}: {reason}");
            }
            Outcome::Renumbered(reason) => {
                tracing::debug!(op = self.op, request_id = self.request_id, server = addr,
                    %reason, "request id forgotten; again under a new one");
                self.last_failure = format!("{addr}: {reason}");
                self.renumbered += 1;
                // At once the first time; a server that keeps answering so
                // is asked again after the backoff (still the same server).
                if self.renumbered == 1 {
                    let past = self
                        .give_up
                        .is_some_and(|give_up| Instant::now() >= give_up);
                    return past.then(|| Err(self.exhausted()));
                }
            }
        }
        let delay = self.backoff.next_delay();
        if let Some(give_up) = self.give_up {
            if Instant::now()
                .checked_add(delay)
                .is_none_or(|at| at >= give_up)
            {
                return Some(Err(self.exhausted()));
            }
        }
        tokio::time::sleep(delay).await;
        None
    }

    /// The error when retries ran out.
    fn exhausted(&self) -> Error {
        Error::Unavailable(format!(
            "{} gave up after {} attempts in {} ms; last failure: {}",
            self.op,
            self.attempts,
            self.started.elapsed().as_millis(),
            self.last_failure
        ))
    }
}

/// Runs one operation that does not wait server-side: attempts `call` until
/// the server answers, within the retry budget.
///
/// # Errors
///
/// The server's refusal as its [`Error`] variant, at once; or
/// [`Error::Unavailable`] when the budget runs out.
pub(crate) async fn call<R: Reply>(
    servers: &Servers,
    timing: &Timing,
    op: &'static str,
    request_id: &str,
    mut call: Call,
) -> Result<R, Error> {
    let budget = Some(timing.retry_budget);
    let mut retrier = Retrier::new(servers, timing, op, request_id, Instant::now(), budget);
    loop {
        let (index, conn, timeout) = retrier.next_attempt(timing.attempt_timeout);
        let outcome = match attempt(conn, timeout, call.clone()).await {
            Ok(reply) => Outcome::Done(Ok(reply)),
            Err(AttemptError::Refused(error)) => Outcome::Done(Err(error)),
            Err(AttemptError::Expired(reason)) => {
                if renumber(&mut call, timing.entropy.request_id()) {
                    Outcome::Renumbered(reason)
                } else {
                    Outcome::Done(Err(Error::Unavailable(reason)))
                }
            }
            Err(AttemptError::TimedOut(reason) | AttemptError::Transport(reason)) => {
                Outcome::Failed(reason)
            }
        };
        if let Some(result) = retrier.settle(index, outcome).await {
            return result;
        }
    }
}

/// Gives `call` the request id `id` if it may be repeated as a new
/// operation with the same effect (a hello, a renew, an acquire: an acquire
/// by the holder gets its grant back); returns false for one that may not
/// (a release, an append, a close).
pub(crate) fn renumber(call: &mut Call, id: String) -> bool {
    match call {
        Call::ClientInit(args) => args.request_id = id,
        Call::RenewLease(args) => args.request_id = id,
        Call::LockAcquire(args) => args.request_id = id,
        _ => return false,
    }
    true
}
