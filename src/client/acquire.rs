//! Acquire: the one call that may wait server-side for a long time.
//!
//! A wait is split into attempts of bounded length. Each attempt tells the
//! server how much of the caller's wait is left; when an attempt is cut off
//! (our deadline, the server's deadline, a dropped connection) the next
//! one carries the **same request id**, which re-attaches it to its place in
//! the server's queue, or collects the grant made meanwhile. This file owns
//! that plan and loop; it does not renew leases (see [`super::guard`]).

use std::time::Duration;

use tokio::time::Instant;

use super::call::{attempt, Outcome, Retrier, Servers, Timing};
use super::clock::Stamp;
use super::conn::Call;
use super::error::{AttemptError, Error};
use super::guard::renew_interval;
use super::{millis_ceil, AcquireOptions, Grant};
use crate::proto;

/// What one acquire attempt asks for and how long it may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AttemptPlan {
    /// The `wait_timeout_ms` to send: the caller's remaining wait, absent
    /// for "forever", 0 for "try once".
    pub wait_ms: Option<u64>,
    /// Deadline of the attempt.
    pub timeout: Duration,
}

impl AttemptPlan {
    /// Whether the server may legitimately hold this attempt, so that being
    /// cut off at its deadline is routine rather than a failure.
    pub fn may_wait(&self) -> bool {
        self.wait_ms != Some(0)
    }
}

/// The longest lease a reply is taken at its word for (ten years): longer
/// is no different for a client, and an absurd value from a server must not
/// overflow the deadlines computed from it.
const LONGEST_LEASE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The lease taken when a reply names none (`lease_ms` 0, which dlm never
/// sends: the original Go service's messages have no such field). Short on
/// purpose: a lease presumed shorter than the server's is only renewed more
/// often than needed (a guard renews every third of it), while one presumed
/// longer would let a holder trust a grant the server had let go.
pub(crate) const UNKNOWN_LEASE: Duration = Duration::from_secs(3);

/// The lease a server's reply gives, in milliseconds, capped.
pub(crate) fn lease_of_reply(ms: u64) -> Duration {
    if ms == 0 {
        return UNKNOWN_LEASE;
    }
    Duration::from_millis(ms).min(LONGEST_LEASE)
}

/// Plans the next attempt given the caller's remaining wait (`None`: wait
/// forever). A waiting attempt lasts up to `wait_attempt_timeout`, or the
/// remaining wait plus one ordinary attempt's time for the answer to come
/// back, whichever is shorter.
pub(crate) fn plan_attempt(timing: &Timing, remaining_wait: Option<Duration>) -> AttemptPlan {
    let longest = timing.wait_attempt_timeout.max(timing.attempt_timeout);
    match remaining_wait {
        None => AttemptPlan {
            wait_ms: None,
            timeout: longest,
        },
        Some(wait) if wait.is_zero() => AttemptPlan {
            wait_ms: Some(0),
            timeout: timing.attempt_timeout,
        },
        Some(wait) => AttemptPlan {
            wait_ms: Some(millis_ceil(wait)),
            timeout: wait.saturating_add(timing.attempt_timeout).min(longest),
        },
    }
}

/// A grant and what the client knows of its lease.
pub(crate) struct Acquired {
    /// The grant.
    pub grant: Grant,
    /// The server's lease deadline is no earlier than this plus the lease:
    /// when the first attempt was sent, since the grant cannot be older (a
    /// grant made while an earlier attempt was cut off is collected by a
    /// later one; a grant made after a long wait in the queue arrives long
    /// after it was asked for), or when a renewal that confirmed it was sent.
    /// Stamped with the machine's suspended time then: a suspend since
    /// brings the deadline forward.
    pub lease_from: Stamp,
}

impl Acquired {
    /// Whether the grant must be confirmed with a renewal before it is handed
    /// out: a third of the lease (the renewal interval) has passed since
    /// [`Acquired::lease_from`], so the lease left is unknown and may be
    /// none. A grant that took longer than its lease to come back (its reply
    /// was lost and the retry collected the remembered answer, or the
    /// client was cut off from the server for that long) may have run out
    /// already and the lock gone to the next waiter: handing it out would
    /// give the caller a fencing number older than one already granted.
    pub fn needs_confirming(&self, now: Instant) -> bool {
        now >= self
            .lease_from
            .plus(renew_interval(self.grant.lease))
            .effective()
    }
}

/// Acquires `lock` for `client_id`, retrying with one request id until the
/// grant, a refusal, or the end of the wait.
///
/// The caller's wait is counted from `started`, when its acquire began (a
/// fresh acquire after a late grant ran out goes on with the same wait). A
/// finite wait gives up after the wait plus the retry budget or one
/// attempt's timeout, whichever is longer: once the wait is over, attempts
/// only collect the server's answer (a grant made meanwhile, or that the
/// wait ran out), which arrives after the wait. An infinite wait (or one too
/// long to count) never gives up.
pub(crate) async fn acquire(
    servers: &Servers,
    timing: &Timing,
    client_id: i32,
    lock: &str,
    opts: AcquireOptions,
    started: Instant,
    closed: impl Fn() -> bool,
) -> Result<Acquired, Error> {
    let request_id = timing.entropy.request_id();
    let wait = opts
        .wait
        .filter(|wait| started.checked_add(*wait).is_some());
    let wait_until = wait.map(|wait| started + wait);
    let budget =
        wait.map(|wait| wait.saturating_add(timing.retry_budget.max(timing.attempt_timeout)));
    // From `started`: a round after a grant that ran out on its way goes
    // on with what is left, not with a whole budget of its own.
    let mut retrier = Retrier::new(servers, timing, "acquire", &request_id, started, budget);
    // The id sent: `request_id` until the server says it forgot it.
    let mut current_id = request_id.clone();
    // Kept across a new id: a grant handed back may be that of the first.
    let mut first_sent = None;
    loop {
        let remaining = wait_until.map(|until| until.saturating_duration_since(Instant::now()));
        let plan = plan_attempt(timing, remaining);
        let (index, conn, timeout) = retrier.next_attempt(plan.timeout);
        let args = proto::LockArgs {
            client_id,
            token: String::new(),
            request_id: current_id.clone(),
            lock_name: lock.to_owned(),
            wait_timeout_ms: plan.wait_ms,
            lease_ms: opts.lease.map(millis_ceil),
        };
        let sent = Instant::now();
        let lease_from = *first_sent.get_or_insert_with(Stamp::now);
        let result = attempt::<proto::LockResponse>(conn, timeout, Call::LockAcquire(args)).await;
        let outcome = match result {
            Ok(reply) => Outcome::Done(Ok(Acquired {
                grant: Grant {
                    lock: lock.to_owned(),
                    token: reply.token,
                    fence: reply.fencing_token,
                    lease: lease_of_reply(reply.lease_ms),
                },
                lease_from,
            })),
            // Only the attempts after the caller's wait ran out try once.
            Err(AttemptError::Refused(Error::LockHeld)) if opts.wait != Some(Duration::ZERO) => {
                Outcome::Done(Err(Error::WaitTimedOut))
            }
            Err(AttemptError::Refused(error)) => Outcome::Done(Err(error)),
            // The server forgot this id (a place given up, a restart, a
            // full dedup table): queue again under a new one. The grant,
            // if one was made meanwhile, comes back to its holder. Unless
            // this client closed its session meanwhile: what was forgotten
            // may be that the close cancelled the wait, and a new one would
            // queue after the close.
            Err(AttemptError::Expired(_)) if closed() => Outcome::Done(Err(Error::SessionClosed)),
            Err(AttemptError::Expired(reason)) => {
                current_id = timing.entropy.request_id();
                Outcome::Renumbered(reason)
            }
            Err(AttemptError::TimedOut(reason))
                if plan.may_wait() && sent.elapsed() >= timeout / 2 =>
            {
                Outcome::CutOff(reason)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::retry::BackoffPolicy;

    fn timing() -> Timing {
        Timing {
            attempt_timeout: Duration::from_secs(5),
            wait_attempt_timeout: Duration::from_secs(10),
            retry_budget: Duration::from_secs(60),
            backoff: BackoffPolicy {
                base: Duration::from_millis(20),
                max: Duration::from_secs(1),
            },
            entropy: crate::client::call::Entropy::default(),
            halve_before: None,
        }
    }

    #[test]
    fn forever_sends_no_wait_and_polls_at_the_long_deadline() {
        let plan = plan_attempt(&timing(), None);
        assert_eq!(plan.wait_ms, None);
        assert_eq!(plan.timeout, Duration::from_secs(10));
        assert!(plan.may_wait());
    }

    #[test]
    fn try_once_sends_zero_with_an_ordinary_deadline() {
        let plan = plan_attempt(&timing(), Some(Duration::ZERO));
        assert_eq!(plan.wait_ms, Some(0));
        assert_eq!(plan.timeout, Duration::from_secs(5));
        assert!(!plan.may_wait());
    }

    #[test]
    fn a_short_wait_gets_the_wait_plus_slack() {
        let plan = plan_attempt(&timing(), Some(Duration::from_millis(1500)));
        assert_eq!(plan.wait_ms, Some(1500));
        assert_eq!(plan.timeout, Duration::from_millis(6500));
    }

    #[test]
    fn a_long_wait_is_cut_into_attempts_carrying_the_remaining_wait() {
        let plan = plan_attempt(&timing(), Some(Duration::from_secs(3600)));
        assert_eq!(plan.wait_ms, Some(3_600_000));
        assert_eq!(plan.timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_sub_millisecond_remainder_still_waits() {
        let plan = plan_attempt(&timing(), Some(Duration::from_micros(300)));
        assert_eq!(plan.wait_ms, Some(1));
    }
}
