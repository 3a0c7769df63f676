//! The vocabulary shared by the core, the log and the transports: identities,
//! requests the core accepts and replies it gives.
//!
//! Nothing here does anything; these are plain values. Transports convert
//! their wire messages to and from these types.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::time::Millis;

/// Identity of a client, as chosen by the client (the original protocol's int32).
pub type ClientId = i32;

/// A request id chosen by the client; the same across the retries of one
/// operation. Empty means "no request id": served, but not deduplicated.
pub type RequestId = String;

/// Name of a lock. The empty name is the default lock, which also guards the files.
///
/// Shared, not copied: one grant's name sits in the lock table, its lease
/// timer, its record, its reply and its remembered answer at once.
pub type LockName = Arc<str>;

/// The opaque secret that proves a grant (hex, unguessable in production).
/// Shared like [`LockName`].
pub type Token = Arc<str>;

/// Fencing number of a grant: strictly increasing, never reused.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Fence(pub u64);

/// A call in flight, numbered by the driver; replies are addressed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CallId(pub u64);

/// The name of the default lock.
pub const DEFAULT_LOCK: &str = "";

/// What a client asks of the core. A token here is only compared with the
/// grant's, so it stays the caller's string; a lock name may become a key of
/// the lock table, so it is already shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Hello: registers the client; never changes what it holds.
    ClientInit { client: ClientId },
    /// Ends the session: releases what the client holds (dropping staged
    /// appends) and cancels its waits.
    ClientClose { client: ClientId },
    /// Acquire `lock`, waiting up to `wait` (`None`: forever; zero: try once).
    Acquire {
        client: ClientId,
        lock: LockName,
        wait: Option<Millis>,
        lease: Option<Millis>,
    },
    /// End the grant proven by `token`; commits staged appends on the default lock.
    Release {
        client: ClientId,
        lock: LockName,
        token: String,
    },
    /// Extend the lease of the grant proven by `token`.
    Renew {
        client: ClientId,
        lock: LockName,
        token: String,
        lease: Option<Millis>,
    },
    /// Stage an append to `file` under the default lock's grant.
    Append {
        client: ClientId,
        file: String,
        content: Bytes,
        token: String,
    },
    /// A read-only view of the lock table.
    Status,
}

/// The kind of a request, remembered with its answer so that a request id
/// reused for another operation is noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestKind {
    ClientInit,
    ClientClose,
    Acquire,
    Release,
    Renew,
    Append,
    Status,
}

impl Request {
    /// The kind of this request.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::ClientInit { .. } => RequestKind::ClientInit,
            Request::ClientClose { .. } => RequestKind::ClientClose,
            Request::Acquire { .. } => RequestKind::Acquire,
            Request::Release { .. } => RequestKind::Release,
            Request::Renew { .. } => RequestKind::Renew,
            Request::Append { .. } => RequestKind::Append,
            Request::Status => RequestKind::Status,
        }
    }

    /// The client that sent it, if the request names one.
    pub fn client(&self) -> Option<ClientId> {
        match self {
            Request::ClientInit { client }
            | Request::ClientClose { client }
            | Request::Acquire { client, .. }
            | Request::Release { client, .. }
            | Request::Renew { client, .. }
            | Request::Append { client, .. } => Some(*client),
            Request::Status => None,
        }
    }
}

/// A grant as its holder sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub lock: LockName,
    pub token: Token,
    pub fence: Fence,
    pub lease: Millis,
}

/// Why a request was refused. A refusal changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    /// Generic failure.
    Error,
    /// A try-acquire found the lock held by another client.
    LockHeld,
    /// The lock is not held at all.
    LockNotHeld,
    /// The token is not the current grant's (stale, run out, or garbage).
    InvalidToken,
    /// The token is current but belongs to another client.
    PermissionDenied,
    /// The acquire's wait timeout passed.
    WaitTimeout,
    /// A malformed argument.
    InvalidArgument,
    /// The client's session was closed while it waited.
    SessionClosed,
    /// The request id's answer was forgotten: the outcome is unknown.
    /// (Added after the others, so logs written before it still decode.)
    RequestExpired,
    /// An append past the most bytes one grant may stage. Sent as
    /// INVALID_ARGUMENT, but unlike a malformed argument it depends on the
    /// grant, so it is remembered: a retry gets it again, also after the
    /// grant ended. (Added last, for the same reason.)
    StagedLimit,
}

/// A refused request: the code and a one-line reason for humans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
}

/// One lock as the status call shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockView {
    pub lock: LockName,
    pub holder: Option<ClientId>,
    pub fence: Fence,
    pub lease_left: Millis,
    /// Waiters in grant order: (client, cut off and kept for a retry).
    pub waiters: Vec<(ClientId, bool)>,
    pub staged_appends: u64,
}

/// The core's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Init, close, release and append succeeded.
    Done,
    /// Acquire succeeded.
    Granted(GrantInfo),
    /// Renew succeeded; the lease now in force.
    Renewed { lease: Millis },
    /// The status view.
    Status {
        locks: Vec<LockView>,
        last_fence: Fence,
    },
    /// Refused; nothing changed.
    Refused(Refusal),
}

impl Reply {
    /// A refusal with `code` and `message`.
    pub fn refused(code: RefusalCode, message: impl Into<String>) -> Reply {
        Reply::Refused(Refusal {
            code,
            message: message.into(),
        })
    }
}
