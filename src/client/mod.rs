//! The dlm client library: named locks under leases, from any tokio program.
//!
//! [`Client`] speaks the protocol of `proto/lock.proto` to one server out of
//! a list, over gRPC (plain text or TLS) or QUIC ([`Transport`]). It owns the client side of the contract in the design: every
//! operation gets one request id that all its retries carry (so the server
//! applies it once), transport failures are retried with exponential backoff
//! and full jitter while failing over to the next server, long waits are cut
//! into attempts that re-attach to their place in the queue, a grant that
//! arrives late is confirmed before it is handed out, and [`LockGuard`]
//! renews a lease in the background. A refusal from the server is never
//! retried; it comes back as its [`Error`] variant (the one exception: an
//! acquire whose late grant ran out before it arrived queues again).
//!
//! It must not hold state beyond that: a [`Grant`] is plain data, and the
//! truth about who holds what is always the server's.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), dlm::client::Error> {
//! use dlm::client::{AcquireOptions, Client};
//!
//! let client = Client::builder(1).endpoint("127.0.0.1:50051").build()?;
//! client.init().await?;
//! let guard = client.lock("", AcquireOptions::default()).await?;
//! guard.append("file_0", "A").await?; // staged until the release
//! guard.release().await?; // now visible in file_0
//! # Ok(())
//! # }
//! ```
//!
//! # Files
//!
//! - `call.rs`: servers, one attempt, the retry loop and failover.
//! - `conn.rs`: one attempt over the wire, for each transport.
//! - `transport.rs`: [`Transport`] and [`Tls`], what the client speaks.
//! - `acquire.rs`: splitting a long wait into re-attaching attempts.
//! - `guard.rs`: [`LockGuard`] and its renewal task.
//! - `builder.rs`: [`ClientBuilder`] and the defaults.
//! - `report.rs`: [`StatusReport`], the server's view of its locks.
//! - `retry.rs`: backoff arithmetic. `error.rs`: [`Error`] and the mappings.

mod acquire;
mod builder;
mod call;
mod clock;
mod conn;
mod error;
mod guard;
mod report;
mod retry;
#[cfg(test)]
mod tests;
mod transport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

pub use builder::{
    ClientBuilder, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX,
    DEFAULT_RETRY_BUDGET, DEFAULT_WAIT_ATTEMPT_TIMEOUT,
};
use call::{call, Servers, Timing};
use conn::Call;
pub use error::Error;
pub use guard::LockGuard;
pub use report::{LockStatus, StatusReport, WaiterStatus};
pub use transport::{Tls, Transport};

use crate::proto;

/// A connection to a dlm service on behalf of one client id. Cheap to clone;
/// clones share their connections.
#[derive(Clone, Debug)]
pub struct Client {
    /// Shared by every clone and by the renewal tasks of its guards.
    inner: Arc<Inner>,
}

/// What the clones of a [`Client`] share.
#[derive(Debug)]
struct Inner {
    /// The id the client presents.
    client_id: i32,
    /// Where to send calls.
    servers: Servers,
    /// Deadlines, budget and backoff.
    timing: Timing,
    /// Calls to [`Client::close`] so far: an acquire that sees a close
    /// while it confirms a late grant stops instead of queueing again.
    closes: AtomicU64,
    /// The live guards' loss signals, by guard number: a release of a
    /// guard's token, or a close, through any clone of this client ends
    /// what the guard may rely on, before its next renewal would tell.
    guards: std::sync::Mutex<guard::Registry>,
}

/// How to acquire: how long to wait and what lease to ask for.
///
/// The default waits forever for the server's default lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcquireOptions {
    /// How long to wait for the lock: `None` waits forever, `Some(ZERO)`
    /// tries once and fails with [`Error::LockHeld`] if it is busy.
    pub wait: Option<Duration>,
    /// Lease to ask for; `None` takes the server's default.
    pub lease: Option<Duration>,
}

impl AcquireOptions {
    /// Wait forever (the default).
    pub fn forever() -> Self {
        AcquireOptions::default()
    }

    /// Try once; fail with [`Error::LockHeld`] if the lock is busy.
    pub fn try_once() -> Self {
        AcquireOptions::wait_for(Duration::ZERO)
    }

    /// Wait up to `wait`; fail with [`Error::WaitTimedOut`] after.
    pub fn wait_for(wait: Duration) -> Self {
        AcquireOptions {
            wait: Some(wait),
            lease: None,
        }
    }

    /// The same options asking for a lease of `lease`.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = Some(lease);
        self
    }
}

/// A lock held under a lease: plain data, nothing runs in the background.
/// Renew it before `lease` runs out, or use [`Client::lock`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Name of the lock; empty is the default lock that guards the files.
    pub lock: String,
    /// Proves the holding to the server; opaque.
    pub token: String,
    /// Fencing number: strictly increasing per lock, never reused. Pass it to
    /// anything the lock protects so it can reject a stale holder.
    pub fence: u64,
    /// Lease length the server granted.
    pub lease: Duration,
}

impl Client {
    /// Starts configuring a client that presents `client_id`.
    pub fn builder(client_id: i32) -> ClientBuilder {
        ClientBuilder::new(client_id)
    }

    /// The id this client presents.
    pub fn client_id(&self) -> i32 {
        self.inner.client_id
    }

    /// Says hello: registers the client id. It never releases or changes
    /// what the client already holds, so separate processes may share an id.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] if no server answers; a server refusal as its
    /// variant.
    pub async fn init(&self) -> Result<(), Error> {
        let args = proto::ClientInitArgs {
            client_id: self.inner.client_id,
            request_id: self.inner.timing.entropy.request_id(),
        };
        let request_id = args.request_id.clone();
        self.call::<proto::Response>("init", &request_id, Call::ClientInit(args))
            .await
            .map(drop)
    }

    /// Closes this client's QUIC connections (the next call opens new ones)
    /// and waits, briefly, until their closes have left. A process that
    /// exits right after its last call should do this first: otherwise it
    /// may exit before a close is sent, and the server keeps the connection
    /// until its idle timeout (a stopping server waits for it up to its
    /// drain grace). gRPC connections need nothing: the kernel closes them.
    pub async fn close_connections(&self) {
        self.inner.servers.close_connections().await;
    }

    /// Ends the session: the server releases every lock this client id
    /// holds, drops its staged appends and cancels its waits.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] if no server answers; a server refusal as its
    /// variant.
    pub async fn close(&self) -> Result<(), Error> {
        self.inner.closes.fetch_add(1, Ordering::SeqCst);
        self.guards().lose(|_| true);
        let args = proto::ClientInitArgs {
            client_id: self.inner.client_id,
            request_id: self.inner.timing.entropy.request_id(),
        };
        let request_id = args.request_id.clone();
        self.call::<proto::Response>("close", &request_id, Call::ClientClose(args))
            .await
            .map(drop)
    }

    /// Acquires `lock` (empty: the default lock), waiting as `opts` says.
    /// Waiters are granted first come, first served. Acquiring a lock this
    /// client already holds returns the same grant with a renewed lease.
    ///
    /// The grant is plain data: renew it ([`Client::renew`]) before its
    /// lease runs out, or use [`Client::lock`] to have that done.
    ///
    /// A grant comes back alive as the client's clock sees it: with at least
    /// two thirds of its lease left, counted from when the acquire was first
    /// sent, or else renewed first (a long wait in the queue, a lost reply
    /// collected by a retry, a server restart in between). If it ran out
    /// meanwhile and the lock went on, the acquire queues again rather than
    /// return a dead grant, whose fencing number would be older than one
    /// already handed out; it gives up as below when the wait is over or
    /// after three such rounds.
    ///
    /// # Errors
    ///
    /// [`Error::LockHeld`] (try-once found it busy), [`Error::WaitTimedOut`],
    /// [`Error::SessionClosed`], [`Error::BadRequest`] (name, lease or wait
    /// out of range), [`Error::Unavailable`] when a finite wait and the
    /// retry budget both ran out without an answer, [`Error::LeaseLost`]
    /// when three grants in a row ran out before they reached the client
    /// (a lease shorter than the round trips).
    pub async fn acquire(&self, lock: &str, opts: AcquireOptions) -> Result<Grant, Error> {
        self.acquire_timed(lock, opts).await.map(|a| a.grant)
    }

    /// Acquires `lock` like [`Client::acquire`] and keeps renewing its lease
    /// in the background (every third of the lease) until the guard is
    /// released or dropped. Dropping the guard does not release the lock.
    ///
    /// # Errors
    ///
    /// As [`Client::acquire`].
    pub async fn lock(&self, lock: &str, opts: AcquireOptions) -> Result<LockGuard, Error> {
        let closes = self.inner.closes.load(Ordering::SeqCst);
        let acquired = self.acquire_timed(lock, opts).await?;
        let guard = LockGuard::start(self.clone(), acquired);
        // A close that ran while the acquire was out may have ended this
        // grant (or the wait it came from) on the server, and it marked only
        // the guards registered before it. Registered first, then looked:
        // a close that this load misses marks the guard itself.
        if self.inner.closes.load(Ordering::SeqCst) != closes {
            guard.mark_lost();
        }
        Ok(guard)
    }

    async fn acquire_timed(
        &self,
        lock: &str,
        opts: AcquireOptions,
    ) -> Result<acquire::Acquired, Error> {
        // Rounds of acquire + confirmation: a grant that ran out before it
        // reached us is followed by a fresh acquire, a few times at most (a
        // lease shorter than the round trips would repeat it forever).
        const ROUNDS: u32 = 3;
        let inner = &*self.inner;
        let started = Instant::now();
        let closes = inner.closes.load(Ordering::SeqCst);
        for _ in 0..ROUNDS {
            let acquired = acquire::acquire(
                &inner.servers,
                &inner.timing,
                inner.client_id,
                lock,
                opts,
                started,
                || inner.closes.load(Ordering::SeqCst) != closes,
            )
            .await?;
            if let Some(confirmed) = self.confirm(acquired).await? {
                return Ok(confirmed);
            }
            // Gone: the lock went on to others meanwhile. Queue again (a new
            // request id), as a fresh acquire would, unless the caller's
            // wait is over, the session was closed meanwhile (closing
            // cancels the client's waits) or the rounds are used up.
            if inner.closes.load(Ordering::SeqCst) != closes {
                return Err(Error::SessionClosed);
            }
            match opts.wait {
                Some(Duration::ZERO) => return Err(Error::LockHeld),
                Some(wait) if started.elapsed() >= wait => return Err(Error::WaitTimedOut),
                _ => {}
            }
        }
        Err(Error::LeaseLost)
    }

    /// `Some(acquired)` once it is known to be alive: as it is if its lease
    /// certainly has most of its length left, else after a renewal (for the
    /// lease it was granted with) that says it is still ours and whose
    /// answer came back within that lease, which starts a lease the client
    /// can time. `None` if it ran out before it reached us, or if no
    /// renewal's answer came back within the lease.
    async fn confirm(
        &self,
        mut acquired: acquire::Acquired,
    ) -> Result<Option<acquire::Acquired>, Error> {
        // An answer that comes back after the lease it granted proves
        // nothing; a network that slow for this lease gets a few more tries.
        const RENEWALS: u32 = 3;
        if !acquired.needs_confirming(Instant::now()) {
            return Ok(Some(acquired));
        }
        let grant = &acquired.grant;
        for _ in 0..RENEWALS {
            let sent = clock::Stamp::now();
            match self
                .renew_token(&grant.lock, &grant.token, Some(grant.lease))
                .await
            {
                Ok(lease) if Instant::now() < guard::lease_end(sent, lease).effective() => {
                    acquired.grant.lease = lease;
                    acquired.lease_from = sent;
                    return Ok(Some(acquired));
                }
                Ok(_late) => {}
                Err(error) if error.is_lease_gone() => {
                    tracing::debug!(lock = grant.lock, fence = grant.fence, %error,
                        "the grant ran out before it reached the client");
                    return Ok(None);
                }
                Err(error) => return Err(error),
            }
        }
        tracing::debug!(
            lock = grant.lock,
            fence = grant.fence,
            "no renewal came back within the lease; the grant cannot be timed"
        );
        Ok(None)
    }

    /// The registry of this client's live guards.
    pub(crate) fn guards(&self) -> std::sync::MutexGuard<'_, guard::Registry> {
        self.inner.guards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases `grant`. If it guards the default lock, its staged appends
    /// become visible in the files, in order, when this returns `Ok`.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] (the grant already ended; its appends were
    /// dropped), [`Error::NotHeld`], [`Error::PermissionDenied`],
    /// [`Error::Unavailable`].
    pub async fn release(&self, grant: &Grant) -> Result<(), Error> {
        self.release_token(&grant.lock, &grant.token).await
    }

    /// Releases `lock` given only its token (as the CLI keeps it).
    ///
    /// # Errors
    ///
    /// As [`Client::release`].
    pub async fn release_token(&self, lock: &str, token: &str) -> Result<(), Error> {
        // Whatever the outcome, a guard of this grant can no longer count on
        // it (an unknown outcome may be a release).
        self.guards().lose(|held| held == token);
        let args = proto::LockArgs {
            client_id: self.inner.client_id,
            token: token.to_owned(),
            request_id: self.inner.timing.entropy.request_id(),
            lock_name: lock.to_owned(),
            wait_timeout_ms: None,
            lease_ms: None,
        };
        let request_id = args.request_id.clone();
        self.call::<proto::LockResponse>("release", &request_id, Call::LockRelease(args))
            .await
            .map(drop)
    }

    /// Extends the lease of `grant` to `lease` from now (`None`: its own
    /// lease length) and returns the lease now in force.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] (too late: the grant ran out), [`Error::NotHeld`],
    /// [`Error::PermissionDenied`], [`Error::BadRequest`] (lease out of
    /// range), [`Error::Unavailable`].
    pub async fn renew(&self, grant: &Grant, lease: Option<Duration>) -> Result<Duration, Error> {
        self.renew_token(&grant.lock, &grant.token, lease).await
    }

    /// Renews `lock` given only its token (as the CLI keeps it).
    ///
    /// # Errors
    ///
    /// As [`Client::renew`].
    pub async fn renew_token(
        &self,
        lock: &str,
        token: &str,
        lease: Option<Duration>,
    ) -> Result<Duration, Error> {
        self.renew_with(&self.inner.timing, lock, token, lease)
            .await
    }

    /// A guard's renewal of `lock`, whose lease may end at `expires`: each
    /// attempt gets at most half the time then left (and at least the
    /// shortest attempt), so that one that hangs on a dead server leaves
    /// time to try the next before the lease is presumed lost.
    pub(crate) async fn renew_before(
        &self,
        lock: &str,
        token: &str,
        expires: Instant,
    ) -> Result<Duration, Error> {
        let mut timing = self.inner.timing.clone();
        timing.halve_before = Some(expires);
        self.renew_with(&timing, lock, token, None).await
    }

    async fn renew_with(
        &self,
        timing: &call::Timing,
        lock: &str,
        token: &str,
        lease: Option<Duration>,
    ) -> Result<Duration, Error> {
        let args = proto::LeaseArgs {
            client_id: self.inner.client_id,
            token: token.to_owned(),
            request_id: self.inner.timing.entropy.request_id(),
            lock_name: lock.to_owned(),
            lease_ms: lease.map(millis_ceil),
        };
        let request_id = args.request_id.clone();
        let reply: proto::LeaseResponse = call(
            &self.inner.servers,
            timing,
            "renew",
            &request_id,
            Call::RenewLease(args),
        )
        .await?;
        Ok(acquire::lease_of_reply(reply.lease_ms))
    }

    /// Appends `content` to `file` (`file_0` … `file_99`) under `grant`,
    /// which must be a grant of the default lock. The append is staged: it
    /// becomes visible when the grant is released, never if its lease runs
    /// out first.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] (not the default lock, unknown file, content too
    /// large), [`Error::LeaseLost`], [`Error::NotHeld`],
    /// [`Error::PermissionDenied`], [`Error::Unavailable`].
    pub async fn append(
        &self,
        grant: &Grant,
        file: &str,
        content: impl Into<Bytes>,
    ) -> Result<(), Error> {
        if !grant.lock.is_empty() {
            return Err(Error::BadRequest(format!(
                "appends need a grant of the default lock, not of lock {:?}",
                grant.lock
            )));
        }
        self.append_token(&grant.token, file, content).await
    }

    /// Appends under the default lock's `token` (as the CLI keeps it).
    ///
    /// # Errors
    ///
    /// As [`Client::append`].
    pub async fn append_token(
        &self,
        token: &str,
        file: &str,
        content: impl Into<Bytes>,
    ) -> Result<(), Error> {
        let args = proto::FileArgs {
            client_id: self.inner.client_id,
            filename: file.to_owned(),
            content: Vec::from(content.into()),
            token: token.to_owned(),
            request_id: self.inner.timing.entropy.request_id(),
        };
        let request_id = args.request_id.clone();
        self.call::<proto::Response>("append", &request_id, Call::FileAppend(args))
            .await
            .map(drop)
    }

    /// Reads the committed content of `file` (`file_0` … `file_99`).
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] (unknown file), [`Error::Unavailable`].
    pub async fn read(&self, file: &str) -> Result<Vec<u8>, Error> {
        let args = proto::FileReadArgs {
            filename: file.to_owned(),
        };
        let reply: proto::FileReadResponse = self.call("read", "", Call::FileRead(args)).await?;
        Ok(reply.content)
    }

    /// The server's view of every lock that is held or waited for.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`]; [`Error::Server`] from a server without the
    /// status call.
    pub async fn status(&self) -> Result<StatusReport, Error> {
        let reply: proto::StatusResponse = self
            .call("status", "", Call::LockStatus(proto::StatusArgs {}))
            .await?;
        Ok(StatusReport::from(reply))
    }

    /// Runs one call that does not wait, with retries and failover.
    async fn call<R: call::Reply>(
        &self,
        op: &'static str,
        request_id: &str,
        request: Call,
    ) -> Result<R, Error> {
        call(
            &self.inner.servers,
            &self.inner.timing,
            op,
            request_id,
            request,
        )
        .await
    }
}

/// `d` in whole milliseconds, rounded up so that a positive duration never
/// becomes 0 (which means "try once" for a wait).
pub(crate) fn millis_ceil(d: Duration) -> u64 {
    let whole = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(whole).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod millis_tests {
    use super::*;

    #[test]
    fn millis_round_up_and_saturate() {
        assert_eq!(millis_ceil(Duration::ZERO), 0);
        assert_eq!(millis_ceil(Duration::from_nanos(1)), 1);
        assert_eq!(millis_ceil(Duration::from_millis(1500)), 1500);
        assert_eq!(millis_ceil(Duration::from_micros(1500)), 2);
        assert_eq!(millis_ceil(Duration::MAX), u64::MAX);
    }
}
