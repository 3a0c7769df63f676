//! [`StatusReport`]: the server's view of its locks, as plain data.
//!
//! Owns the translation of the status reply; asks nothing of the network.

use std::time::Duration;

use crate::proto;

/// The server's view of its locks, from [`Client::status`](super::Client::status).
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

impl From<proto::StatusResponse> for StatusReport {
    fn from(reply: proto::StatusResponse) -> StatusReport {
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
        StatusReport {
            locks,
            last_fence: reply.last_fencing_token,
        }
    }
}
