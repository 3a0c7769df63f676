//! One client call end to end: pick a server, make an attempt under a
//! deadline, classify the outcome, back off, fail over, try again.
//!
//! Owns the list of servers and which one is current. It knows nothing about
//! locks: the operations in [`super`] hand it a closure that makes one gRPC
//! attempt, and it hands back the first reply whose dlm status is `OK`, or a
//! typed [`Error`]. Every attempt of one call carries the same request id
//! (built into the request by the caller), so the server applies it once.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;

use super::error::{classify, AttemptError, Error};
use super::retry::{Backoff, BackoffPolicy};
use crate::proto;
use crate::proto::lock_service_client::LockServiceClient;

/// The generated gRPC client, over a lazily connected channel.
pub(crate) type Rpc = LockServiceClient<Channel>;

/// Shortest deadline given to an attempt, so that an attempt made just
/// before the budget runs out still has a chance to get through.
const MIN_ATTEMPT: Duration = Duration::from_millis(50);

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
}

/// One server the client may talk to.
#[derive(Debug)]
struct Server {
    /// The address as given, for messages.
    addr: String,
    /// Client over a channel that connects on first use and reconnects after
    /// a failure.
    rpc: Rpc,
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
    /// Lazily connected channels to `addrs` (`host:port`, or a full
    /// `http://` URI). Nothing is dialled yet.
    ///
    /// Must run inside a Tokio runtime (the channels spawn their workers).
    pub fn new(addrs: &[String], connect_timeout: Duration) -> Result<Servers, Error> {
        if addrs.is_empty() {
            return Err(Error::BadRequest("no server address given".into()));
        }
        let list = addrs
            .iter()
            .map(|addr| {
                let uri = if addr.contains("://") {
                    addr.clone()
                } else {
                    format!("http://{addr}")
                };
                let endpoint = tonic::transport::Endpoint::from_shared(uri)
                    .map_err(|e| Error::BadRequest(format!("bad server address {addr:?}: {e}")))?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true);
                // A file read returns the whole file, which may be large; the
                // server is trusted, so its replies are not size-capped.
                let rpc = LockServiceClient::new(endpoint.connect_lazy())
                    .max_decoding_message_size(usize::MAX);
                Ok(Server {
                    addr: addr.clone(),
                    rpc,
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Servers {
            list,
            current: AtomicUsize::new(0),
        })
    }

    /// The server to try now: its index, address and a client for it.
    fn pick(&self) -> (usize, &str, Rpc) {
        let index = self.current.load(Ordering::Relaxed) % self.list.len();
        let server = &self.list[index];
        (index, &server.addr, server.rpc.clone())
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

/// A reply that carries a dlm status.
pub(crate) trait Reply {
    /// The raw `status` field.
    fn status(&self) -> i32;
    /// The `error_message` field.
    fn error_message(&self) -> &str;
}

macro_rules! impl_reply {
    ($($t:ty),*) => {$(
        impl Reply for $t {
            fn status(&self) -> i32 {
                self.status
            }
            fn error_message(&self) -> &str {
                &self.error_message
            }
        }
    )*};
}

impl_reply!(
    proto::Response,
    proto::LockResponse,
    proto::LeaseResponse,
    proto::FileReadResponse,
    proto::StatusResponse
);

/// Wraps `message` in a request whose gRPC deadline is `timeout`, so the
/// server also gives up (and, for an acquire, keeps the waiter's place).
pub(crate) fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// A fresh request id: one per operation, kept across its retries.
pub(crate) fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// One attempt: `send` under both a gRPC deadline and a local one.
pub(crate) async fn attempt<R, F, Fut>(
    rpc: Rpc,
    timeout: Duration,
    send: F,
) -> Result<R, AttemptError>
where
    R: Reply,
    F: FnOnce(Rpc, Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    match tokio::time::timeout(timeout, send(rpc, timeout)).await {
        Err(_elapsed) => Err(AttemptError::TimedOut(format!(
            "no answer within {} ms",
            timeout.as_millis()
        ))),
        Ok(Err(status)) => Err(classify(&status)),
        Ok(Ok(response)) => {
            let reply = response.into_inner();
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
}

impl<'a> Retrier<'a> {
    /// Starts the retries of operation `op`, giving up after `budget`
    /// (never when `None`).
    pub fn new(
        servers: &'a Servers,
        timing: &Timing,
        op: &'static str,
        request_id: &'a str,
        budget: Option<Duration>,
    ) -> Retrier<'a> {
        let started = Instant::now();
        Retrier {
            servers,
            backoff: Backoff::new(timing.backoff),
            op,
            request_id,
            started,
            give_up: budget.map(|b| started + b),
            attempts: 0,
            last_failure: String::new(),
        }
    }

    /// The server for the next attempt and the deadline to give it: at most
    /// `timeout`, and no later than the give-up time.
    pub fn next_attempt(&mut self, timeout: Duration) -> (usize, Rpc, Duration) {
        self.attempts += 1;
        let (index, _, rpc) = self.servers.pick();
        let timeout = match self.give_up {
            Some(give_up) => timeout
                .min(give_up.saturating_duration_since(Instant::now()))
                .max(MIN_ATTEMPT),
            None => timeout,
        };
        (index, rpc, timeout)
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
            }
            Outcome::Failed(reason) => {
                tracing::debug!(op = self.op, request_id = self.request_id, server = addr,
                    attempt = self.attempts, %reason, "attempt failed; failing over");
                self.servers.failed(index);
                self.last_failure = format!("{addr}: {reason}");
            }
        }
        let delay = self.backoff.next_delay();
        if let Some(give_up) = self.give_up {
            if Instant::now() + delay >= give_up {
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

/// Runs one operation that does not wait server-side: attempts `send` until
/// the server answers, within the retry budget.
///
/// # Errors
///
/// The server's refusal as its [`Error`] variant, at once; or
/// [`Error::Unavailable`] when the budget runs out.
pub(crate) async fn call<R, F, Fut>(
    servers: &Servers,
    timing: &Timing,
    op: &'static str,
    request_id: &str,
    mut send: F,
) -> Result<R, Error>
where
    R: Reply,
    F: FnMut(Rpc, Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let mut retrier = Retrier::new(servers, timing, op, request_id, Some(timing.retry_budget));
    loop {
        let (index, rpc, timeout) = retrier.next_attempt(timing.attempt_timeout);
        let outcome = match attempt(rpc, timeout, &mut send).await {
            Ok(reply) => Outcome::Done(Ok(reply)),
            Err(AttemptError::Refused(error)) => Outcome::Done(Err(error)),
            Err(AttemptError::TimedOut(reason) | AttemptError::Transport(reason)) => {
                Outcome::Failed(reason)
            }
        };
        if let Some(result) = retrier.settle(index, outcome).await {
            return result;
        }
    }
}
