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
use super::clock::Stamp;
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
    expires: Arc<Mutex<Stamp>>,
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
        // lease (less the margin); renewals are scheduled from there.
        let expires = Arc::new(Mutex::new(lease_end(
            acquired.lease_from,
            acquired.grant.lease,
        )));
        let first_renewal = acquired
            .lease_from
            .plus(renew_interval(acquired.grant.lease));
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

    /// The instant by this client's clock after which the server's lease may
    /// have run out, as of the last renewal that got through: the lease
    /// counted from when that renewal was sent, less [`lease_margin`]. Time the
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

/// Where this client takes a lease of `lease` that started no earlier than
/// `from` to end: [`lease_margin`] before `from + lease`.
pub(crate) fn lease_end(from: Stamp, lease: Duration) -> Stamp {
    from.plus(lease.saturating_sub(lease_margin(lease)))
}

/// How much sooner than the server this client takes a lease to end: 2 ms,
/// plus 0.1 % of the lease. The server counts time in whole milliseconds, so
/// its deadline may fall up to 1 ms before `from + lease` (a request that
/// reached it within the millisecond it was sent), and the two machines'
/// clocks may run at rates a little apart (0.1 % is ten times what a
/// quartz clock drifts). Without it, `is_lease_lost` could say "held" for a
/// moment after the server gave the lock to the next waiter. A lease of
/// 2 ms or less (only with a server's `--min-lease-ms` below 3) is taken as
/// over at once: a guard of it is lost as soon as it starts.
pub(crate) fn lease_margin(lease: Duration) -> Duration {
    Duration::from_millis(2) + lease / 1000
}

/// How long to wait between renewals of a lease of `lease`.
pub(crate) fn renew_interval(lease: Duration) -> Duration {
    (lease / 3).max(Duration::from_millis(1))
}

/// The longest the renewal task sleeps at once: how soon after the machine
/// wakes from a suspend it notices that the lease ran out meanwhile.
const LONGEST_SLEEP: Duration = Duration::from_secs(1);

/// Renews `grant`, unless `expires` comes first (`Err`): checked at least
/// every [`LONGEST_SLEEP`], so that a suspend during the call is noticed
/// soon after the machine wakes, not when tokio's clock reaches the
/// deadline.
async fn renew_before(
    client: &Client,
    grant: &Grant,
    expires: Stamp,
) -> Result<Result<Duration, Error>, ()> {
    let renew = client.renew_before(&grant.lock, &grant.token, expires.effective());
    tokio::pin!(renew);
    loop {
        let check = expires.effective().min(Instant::now() + LONGEST_SLEEP);
        // `biased`: a fixed order (an answer that is ready wins), so that a
        // simulation replays from its seed.
        tokio::select! {
            biased;
            renewed = &mut renew => return Ok(renewed),
            () = tokio::time::sleep_until(check) => {
                if Instant::now() >= expires.effective() {
                    return Err(());
                }
            }
        }
    }
}

/// Renews `grant` from `next` on, every third of its lease, until a renewal
/// is refused or none gets through before `expires`; then reports the loss.
async fn renew_until_lost(
    client: Client,
    grant: Grant,
    shared_expires: Arc<Mutex<Stamp>>,
    mut next: Stamp,
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
        // Also right after a renewal whose answer came too late: the
        // deadline has passed, and the sleep above returned at once.
        let now = Instant::now();
        if now >= expires.effective() {
            tracing::warn!(lock = %grant.lock, fence = grant.fence,
                "lease ran out before it could be renewed (a slow network, a busy runtime, \
                 a suspended machine); presuming it lost");
            lost.send_replace(true);
            return;
        }
        if now < next.effective() {
            continue;
        }
        let sent = Stamp::now();
        let renewed = renew_before(&client, &grant, expires).await;
        match renewed {
            Ok(Ok(lease)) => {
                // From when the renewal was sent (with the suspended time
                // then): the server's new lease starts no earlier.
                expires = lease_end(sent, lease);
                *shared_expires.lock().unwrap_or_else(|e| e.into_inner()) = expires;
                next = sent.plus(renew_interval(lease));
            }
            Ok(Err(error)) if error.is_lease_gone() => {
                tracing::warn!(lock = %grant.lock, fence = grant.fence, %error, "lease lost");
                lost.send_replace(true);
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(lock = %grant.lock, fence = grant.fence, %error,
                    "lease renewal failed; trying again");
                next = Stamp::now().plus(renew_interval(grant.lease).min(Duration::from_secs(1)));
            }
            Err(_deadline) => {
                tracing::warn!(lock = %grant.lock, fence = grant.fence,
                    "no renewal got through before the lease ran out; presuming it lost");
                lost.send_replace(true);
                return;
            }
        }
    }
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
}
