//! The dlm client library: named locks under leases, from any tokio program.
//!
//! [`Client`] speaks the gRPC protocol of `proto/lock.proto` to one server out
//! of a list. It owns the client side of the contract in the design: every
//! operation gets one request id that all its retries carry (so the server
//! applies it once), transport failures are retried with exponential backoff
//! and full jitter while failing over to the next server, long waits are cut
//! into attempts that re-attach to their place in the queue, and
//! [`LockGuard`] renews a lease in the background. A refusal from the server
//! is never retried; it comes back as its [`Error`] variant.
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
//! - `acquire.rs`: splitting a long wait into re-attaching attempts.
//! - `guard.rs`: [`LockGuard`] and its renewal task.
//! - `retry.rs`: backoff arithmetic. `error.rs`: [`Error`] and the mappings.

mod acquire;
mod call;
mod error;
mod guard;
mod retry;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use call::{call, new_request_id, request, Servers, Timing};
pub use error::Error;
pub use guard::LockGuard;
use retry::BackoffPolicy;

use crate::proto;

/// Deadline of one attempt of a call that does not wait.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest single attempt of an acquire that waits server-side.
pub const DEFAULT_WAIT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call that does not wait keeps retrying.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(60);
/// Ceiling of the first retry's delay.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(20);
/// Largest ceiling of a retry's delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Configures a [`Client`]; made by [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    /// The id the client presents; the server keys grants and sessions by it.
    client_id: i32,
    /// Server addresses in failover order.
    endpoints: Vec<String>,
    /// Deadlines, budget and backoff.
    timing: Timing,
}

impl ClientBuilder {
    /// Adds a server address: `host:port` (plain-text gRPC is assumed), or a
    /// full `http://` or `https://` URI.
    #[must_use]
    pub fn endpoint(mut self, addr: impl Into<String>) -> Self {
        self.endpoints.push(addr.into());
        self
    }

    /// Adds several server addresses, tried in this order on failover.
    #[must_use]
    pub fn endpoints<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// Deadline of one attempt of a call that does not wait, and of
    /// connecting (default 5 s). It is sent to the server as the gRPC
    /// deadline as well.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.timing.attempt_timeout = timeout;
        self
    }

    /// Longest single attempt of an acquire that waits (default 10 s). A
    /// longer wait is made of several attempts that re-attach to the same
    /// place in the queue; a shorter value notices a dead server sooner.
    #[must_use]
    pub fn wait_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.timing.wait_attempt_timeout = timeout;
        self
    }

    /// How long a call that does not wait keeps retrying before it fails with
    /// [`Error::Unavailable`] (default 60 s). An acquire with a finite wait
    /// retries for the wait or this, whichever is longer; one that waits
    /// forever retries forever.
    #[must_use]
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.timing.retry_budget = budget;
        self
    }

    /// Backoff between retries: the delay before retry `n` is drawn
    /// uniformly from `0..=min(base · 2^n, max)` (defaults 20 ms and 1 s).
    #[must_use]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.timing.backoff = BackoffPolicy { base, max };
        self
    }

    /// Makes the client. Connections are made on first use, so this
    /// succeeds while the servers are still down.
    ///
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] when no address was given or one is malformed.
    pub fn build(self) -> Result<Client, Error> {
        let servers = Servers::new(&self.endpoints, self.timing.attempt_timeout)?;
        Ok(Client {
            inner: Arc::new(Inner {
                client_id: self.client_id,
                servers,
                timing: self.timing,
            }),
        })
    }
}

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

/// The server's view of its locks, from [`Client::status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    /// Every lock that is held or waited for.
    pub locks: Vec<LockStatus>,
    /// The highest fencing number handed out so far.
    pub last_fence: u64,
}

/// One lock in a [`StatusReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockStatus {
    /// Name of the lock; empty is the default lock.
    pub name: String,
    /// Client holding it; `None` when nobody does (fencing number 0).
    pub holder: Option<i32>,
    /// Fencing number of the current grant (0 when not held).
    pub fence: u64,
    /// Time left on the current lease.
    pub lease_left: Duration,
    /// Waiters in the order they will be granted.
    pub waiters: Vec<WaiterStatus>,
    /// Appends staged under the current grant (default lock only).
    pub staged_appends: u64,
}

/// One waiter in a [`LockStatus`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaiterStatus {
    /// The waiting client.
    pub client_id: i32,
    /// Its call was cut off; its place is kept for a retry for a while.
    pub detached: bool,
}

impl Client {
    /// Starts configuring a client that presents `client_id`.
    pub fn builder(client_id: i32) -> ClientBuilder {
        ClientBuilder {
            client_id,
            endpoints: Vec::new(),
            timing: Timing {
                attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
                wait_attempt_timeout: DEFAULT_WAIT_ATTEMPT_TIMEOUT,
                retry_budget: DEFAULT_RETRY_BUDGET,
                backoff: BackoffPolicy {
                    base: DEFAULT_BACKOFF_BASE,
                    max: DEFAULT_BACKOFF_MAX,
                },
            },
        }
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
            request_id: new_request_id(),
        };
        self.call("init", &args.request_id, |mut rpc, timeout| {
            let request = request(args.clone(), timeout);
            async move { rpc.client_init(request).await }
        })
        .await
        .map(drop)
    }

    /// Ends the session: the server releases every lock this client id
    /// holds, drops its staged appends and cancels its waits.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] if no server answers; a server refusal as its
    /// variant.
    pub async fn close(&self) -> Result<(), Error> {
        let args = proto::ClientInitArgs {
            client_id: self.inner.client_id,
            request_id: new_request_id(),
        };
        self.call("close", &args.request_id, |mut rpc, timeout| {
            let request = request(args.clone(), timeout);
            async move { rpc.client_close(request).await }
        })
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
    /// # Errors
    ///
    /// [`Error::LockHeld`] (try-once found it busy), [`Error::WaitTimedOut`],
    /// [`Error::SessionClosed`], [`Error::BadRequest`] (name, lease or wait
    /// out of range), [`Error::Unavailable`] when a finite wait and the
    /// retry budget both ran out without an answer.
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
        let acquired = self.acquire_timed(lock, opts).await?;
        Ok(LockGuard::start(self.clone(), acquired))
    }

    async fn acquire_timed(
        &self,
        lock: &str,
        opts: AcquireOptions,
    ) -> Result<acquire::Acquired, Error> {
        let inner = &*self.inner;
        acquire::acquire(&inner.servers, &inner.timing, inner.client_id, lock, opts).await
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
        let args = proto::LockArgs {
            client_id: self.inner.client_id,
            token: token.to_owned(),
            request_id: new_request_id(),
            lock_name: lock.to_owned(),
            wait_timeout_ms: None,
            lease_ms: None,
        };
        self.call("release", &args.request_id, |mut rpc, timeout| {
            let request = request(args.clone(), timeout);
            async move { rpc.lock_release(request).await }
        })
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
        let args = proto::LeaseArgs {
            client_id: self.inner.client_id,
            token: token.to_owned(),
            request_id: new_request_id(),
            lock_name: lock.to_owned(),
            lease_ms: lease.map(millis_ceil),
        };
        let reply = self
            .call("renew", &args.request_id, |mut rpc, timeout| {
                let request = request(args.clone(), timeout);
                async move { rpc.renew_lease(request).await }
            })
            .await?;
        Ok(Duration::from_millis(reply.lease_ms))
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
            request_id: new_request_id(),
        };
        self.call("append", &args.request_id, |mut rpc, timeout| {
            let request = request(args.clone(), timeout);
            async move { rpc.file_append(request).await }
        })
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
        let reply = self
            .call("read", "", |mut rpc, timeout| {
                let request = request(args.clone(), timeout);
                async move { rpc.file_read(request).await }
            })
            .await?;
        Ok(reply.content)
    }

    /// The server's view of every lock that is held or waited for.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`]; [`Error::Server`] from a server without the
    /// status call.
    pub async fn status(&self) -> Result<StatusReport, Error> {
        let reply = self
            .call("status", "", |mut rpc, timeout| async move {
                rpc.lock_status(request(proto::StatusArgs {}, timeout)).await
            })
            .await?;
        let locks = reply
            .locks
            .into_iter()
            .map(|info| LockStatus {
                holder: (info.fencing_token != 0).then_some(info.holder_client_id),
                name: info.lock_name,
                fence: info.fencing_token,
                lease_left: Duration::from_millis(info.lease_left_ms),
                waiters: info
                    .waiters
                    .into_iter()
                    .map(|w| WaiterStatus {
                        client_id: w.client_id,
                        detached: w.detached,
                    })
                    .collect(),
                staged_appends: info.staged_appends,
            })
            .collect();
        Ok(StatusReport {
            locks,
            last_fence: reply.last_fencing_token,
        })
    }

    /// Runs one call that does not wait, with retries and failover.
    async fn call<R, F, Fut>(&self, op: &'static str, request_id: &str, send: F) -> Result<R, Error>
    where
        R: call::Reply,
        F: FnMut(call::Rpc, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        call(&self.inner.servers, &self.inner.timing, op, request_id, send).await
    }
}

/// `d` in whole milliseconds, rounded up so that a positive duration never
/// becomes 0 (which means "try once" for a wait).
pub(crate) fn millis_ceil(d: Duration) -> u64 {
    let whole = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
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
