//! [`LockGuard`]: a held lock whose lease a background task keeps renewing.
//!
//! The renewal task is the only background activity of the client. It
//! renews every third of the lease, and reports through a watch channel when
//! the lease is gone. It never releases: dropping the guard only stops the
//! renewals (the grant then runs out at the end of its lease), and
//! [`LockGuard::release`] releases explicitly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::acquire::Acquired;
use super::{Client, Error, Grant};

/// A held lock with a lease renewed in the background; made by
/// [`Client::lock`].
///
/// Watch [`LockGuard::lease_lost`] while acting as the holder: once it turns
/// `true` the lock may belong to someone else, and the fencing number is what
/// lets the protected resource reject this holder's late writes.
#[derive(Debug)]
pub struct LockGuard {
    /// The client the guard renews and releases through.
    client: Client,
    /// The grant as acquired (the lease may have been renewed since).
    grant: Grant,
    /// Turns `true` when the lease is known or presumed gone.
    lease_lost: watch::Receiver<bool>,
    /// This guard's number in the client's [`Registry`].
    number: u64,
    /// The latest the server's lease may run out, by this client's clock:
    /// moved on by every renewal that gets through.
    expires: Arc<Mutex<Deadline>>,
    /// The renewal task; aborted on release and on drop.
    renewal: JoinHandle<()>,
}

impl LockGuard {
    /// Starts renewing the lease of `acquired`.
    pub(crate) fn start(client: Client, acquired: Acquired) -> LockGuard {
        let (lost_tx, lease_lost) = watch::channel(false);
        let lost_tx = Arc::new(lost_tx);
        let number = client
            .guards()
            .add(acquired.grant.token.clone(), lost_tx.clone());
        // The server's deadline is no earlier than `lease_from` plus the
        // lease; renewals are scheduled from there.
        let expires = Arc::new(Mutex::new(Deadline::new(
            acquired.lease_from + acquired.grant.lease,
        )));
        let first_renewal =
            Deadline::new(acquired.lease_from + renew_interval(acquired.grant.lease));
        let renewal = tokio::spawn(renew_until_lost(
            client.clone(),
            acquired.grant.clone(),
            expires.clone(),
            first_renewal,
            lost_tx,
        ));
        LockGuard {
            client,
            grant: acquired.grant,
            lease_lost,
            number,
            expires,
            renewal,
        }
    }

    /// Marks this guard lost (its renewal task stops at its next wake-up).
    pub(crate) fn mark_lost(&self) {
        self.client.guards().lose_one(self.number);
    }

    /// The grant: lock name, token, fencing number and initial lease.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// The token that proves the holding to the server.
    pub fn token(&self) -> &str {
        &self.grant.token
    }

    /// The fencing number of the grant.
    pub fn fence(&self) -> u64 {
        self.grant.fence
    }

    /// The name of the lock (empty: the default lock).
    pub fn lock_name(&self) -> &str {
        &self.grant.lock
    }

    /// A receiver that turns `true` once the lease is gone: a renewal was
    /// refused (token stale, lock not held, session closed), no renewal
    /// got through before the lease would have run out, or the grant was
    /// released or the client closed through this client (any clone) by
    /// other means than this guard. It never turns back.
    /// Wait for it with `rx.wait_for(|lost| *lost).await`.
    pub fn lease_lost(&self) -> watch::Receiver<bool> {
        self.lease_lost.clone()
    }

    /// Whether the lease is already known or presumed gone: a renewal was
    /// refused, or the lease's latest deadline has passed by the clock now,
    /// even if the renewal task has not run since (a busy or blocked
    /// runtime, a paused process, a suspended machine). Check it right
    /// before acting as the holder.
    pub fn is_lease_lost(&self) -> bool {
        *self.lease_lost.borrow() || Instant::now() >= self.expires_at()
    }

    /// The latest instant at which the server's lease may run out, by this
    /// client's clock, as of the last renewal that got through. Time the
    /// machine has spent suspended since then is taken off: tokio's clock
    /// stands still through a suspend, while the server's lease runs on.
    pub fn expires_at(&self) -> Instant {
        self.expires
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .effective()
    }

    /// Appends `content` to `file` under this grant (default lock only);
    /// see [`Client::append`].
    ///
    /// # Errors
    ///
    /// As [`Client::append`].
    pub async fn append(&self, file: &str, content: impl Into<Bytes>) -> Result<(), Error> {
        self.client.append(&self.grant, file, content).await
    }

    /// Stops renewing and releases the lock; the default lock's staged
    /// appends become visible when this returns `Ok`.
    ///
    /// # Errors
    ///
    /// As [`Client::release`]; [`Error::LeaseLost`] means the appends were
    /// dropped.
    pub async fn release(self) -> Result<(), Error> {
        self.renewal.abort();
        self.client.release(&self.grant).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.renewal.abort();
        self.client.guards().remove(self.number);
    }
}

/// A client's live guards: each one's token and loss signal, by number.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: u64,
    live: std::collections::HashMap<u64, (String, Arc<watch::Sender<bool>>)>,
}

impl Registry {
    /// Registers a guard of `token`; returns its number.
    fn add(&mut self, token: String, lost: Arc<watch::Sender<bool>>) -> u64 {
        self.next += 1;
        self.live.insert(self.next, (token, lost));
        self.next
    }

    fn remove(&mut self, number: u64) {
        self.live.remove(&number);
    }

    /// How many guards are live.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// Marks guard `number` lost.
    fn lose_one(&self, number: u64) {
        if let Some((_, lost)) = self.live.get(&number) {
            lost.send_replace(true);
        }
    }

    /// Marks lost every guard whose token `which` picks.
    pub(crate) fn lose(&self, which: impl Fn(&str) -> bool) {
        for (token, lost) in self.live.values() {
            if which(token) {
                lost.send_replace(true);
            }
        }
    }
}

/// How long to wait between renewals of a lease of `lease`.
pub(crate) fn renew_interval(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(1))
}

/// The longest the renewal task sleeps at once: how soon after the machine
/// wakes from a suspend it notices that the lease ran out meanwhile.
const LONGEST_SLEEP: Duration = Duration::from_secs(1);

/// Renews `grant` from `next` on, every third of its lease, until a renewal
/// is refused or none gets through before `expires`; then reports the loss.
async fn renew_until_lost(
    client: Client,
    grant: Grant,
    shared_expires: Arc<Mutex<Deadline>>,
    mut next: Deadline,
    lost: Arc<watch::Sender<bool>>,
) {
    let mut expires = *shared_expires.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let wake = next.effective().min(expires.effective());
        tokio::time::sleep_until(wake.min(Instant::now() + LONGEST_SLEEP)).await;
        if *lost.borrow() {
            // Released or closed through the client: nothing to keep.
            return;
        }
        let now = Instant::now();
        if now >= expires.effective() {
            tracing::warn!(lock = %grant.lock, fence = grant.fence,
                "lease ran out (the machine was suspended?); presuming it lost");
            lost.send_replace(true);
            return;
        }
        if now < next.effective() {
            continue;
        }
        let sent = Instant::now();
        let renewed = tokio::time::timeout_at(
            expires.effective(),
            client.renew_token(&grant.lock, &grant.token, None),
        )
        .await;
        match renewed {
            Ok(Ok(lease)) => {
                // Suspended time before `sent` is in neither deadline: the
                // server's new lease starts no earlier than the renewal.
                expires = Deadline::new(sent + lease);
                *shared_expires.lock().unwrap_or_else(|e| e.into_inner()) = expires;
                next = Deadline::new(sent + renew_interval(lease));
            }
            Ok(Err(error)) if error.is_lease_gone() => {
                tracing::warn!(lock = %grant.lock, fence = grant.fence, %error, "lease lost");
                lost.send_replace(true);
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(lock = %grant.lock, fence = grant.fence, %error,
                    "lease renewal failed; trying again");
                next = Deadline::new(
                    Instant::now() + renew_interval(grant.lease).min(Duration::from_secs(1)),
                );
            }
            Err(_deadline) => {
                tracing::warn!(lock = %grant.lock, fence = grant.fence,
                    "no renewal got through before the lease ran out; presuming it lost");
                lost.send_replace(true);
                return;
            }
        }
        if Instant::now() >= expires.effective() {
            tracing::warn!(lock = %grant.lock, fence = grant.fence,
                "lease ran out before it could be renewed; presuming it lost");
            lost.send_replace(true);
            return;
        }
    }
}

/// An instant on tokio's monotonic clock, which stands still while the
/// machine is suspended, with how long the machine had been suspended when
/// it was set: a lease's deadline moves earlier by every suspend since.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    at: Instant,
    suspended: Duration,
}

impl Deadline {
    fn new(at: Instant) -> Deadline {
        Deadline {
            at,
            suspended: suspended(),
        }
    }

    /// The instant, moved earlier by the machine's suspends since it was set.
    fn effective(self) -> Instant {
        self.effective_with(suspended())
    }

    /// [`Deadline::effective`] with `suspended_now` as the suspended time.
    /// Less than [`SUSPEND_NOISE`] counts as none: the two clocks read a
    /// moment apart.
    fn effective_with(self, suspended_now: Duration) -> Instant {
        let slept = suspended_now.saturating_sub(self.suspended);
        if slept < SUSPEND_NOISE {
            return self.at;
        }
        // Earlier than the clock's origin: long past.
        self.at.checked_sub(slept).unwrap_or_else(Instant::now)
    }
}

/// Differences in [`suspended`] below this are the time between its two
/// clock readings, not a suspend.
const SUSPEND_NOISE: Duration = Duration::from_millis(1);

/// How long the machine has been suspended since it booted: Linux's
/// `CLOCK_BOOTTIME` counts suspended time and `CLOCK_MONOTONIC` (tokio's and
/// std's `Instant`) does not. Boot time is read first, so the result is
/// never more than the truth (by the moment between the readings at most
/// less). Zero where there is no such clock.
#[cfg(target_os = "linux")]
fn suspended() -> Duration {
    fn read(clock: libc::clockid_t) -> Option<Duration> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec for the call to write.
        if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
            return None;
        }
        Some(Duration::new(
            u64::try_from(now.tv_sec).ok()?,
            u32::try_from(now.tv_nsec).ok()?,
        ))
    }
    match (read(libc::CLOCK_BOOTTIME), read(libc::CLOCK_MONOTONIC)) {
        (Some(boot), Some(monotonic)) => boot.saturating_sub(monotonic),
        _ => Duration::ZERO,
    }
}

/// See the Linux version: elsewhere suspends are not counted.
#[cfg(not(target_os = "linux"))]
fn suspended() -> Duration {
    Duration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_come_three_times_per_lease() {
        assert_eq!(
            renew_interval(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            renew_interval(Duration::from_millis(90)),
            Duration::from_millis(30)
        );
    }

    #[test]
    fn a_tiny_lease_still_gets_a_positive_interval() {
        assert_eq!(renew_interval(Duration::ZERO), Duration::from_millis(1));
    }

    /// A deadline moves earlier by the time the machine spent suspended
    /// since it was set (tokio's clock stood still meanwhile), and not by
    /// the noise of reading two clocks.
    #[test]
    fn a_suspend_brings_a_deadline_forward() {
        let at = Instant::now() + Duration::from_secs(30);
        let deadline = Deadline {
            at,
            suspended: Duration::from_secs(100),
        };
        assert_eq!(deadline.effective_with(Duration::from_secs(100)), at);
        assert_eq!(
            deadline.effective_with(Duration::from_secs(100) + SUSPEND_NOISE / 2),
            at
        );
        assert_eq!(
            deadline.effective_with(Duration::from_secs(112)),
            at - Duration::from_secs(12)
        );
        // A clock that went back (it cannot) moves nothing.
        assert_eq!(deadline.effective_with(Duration::from_secs(90)), at);
        // A suspend longer than the clock has run: long past.
        let long = deadline.effective_with(Duration::MAX);
        assert!(long <= Instant::now());
    }

    /// Read twice in a row, the suspended time is the same but for the
    /// moment between the readings.
    #[test]
    fn the_suspended_time_is_steady_while_awake() {
        let first = suspended();
        let second = suspended();
        assert!(
            second.abs_diff(first) < SUSPEND_NOISE,
            "{first:?} {second:?}"
        );
    }
}
