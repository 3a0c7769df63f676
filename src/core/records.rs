//! What the core asks the driver to persist, and the snapshot that replaces a
//! prefix of the log.
//!
//! Owns: the durable vocabulary. A record lists the changes one input made
//! to durable state; replaying all records of a log in order onto the last
//! snapshot rebuilds the durable state exactly. Leases are deliberately not
//! durable: after a restart every surviving grant gets a fresh lease.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::staging::{FileIndex, FileLengths};
use super::time::Millis;
use super::types::{ClientId, Fence, LockName, Reply, RequestId, RequestKind, Token};

/// One change to durable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// `lock` was granted to `client`.
    Granted {
        lock: LockName,
        client: ClientId,
        token: Token,
        fence: Fence,
        lease: Millis,
    },
    /// The grant `fence` of `lock` was released: its staged appends are committed.
    Released { lock: LockName, fence: Fence },
    /// The grant `fence` of `lock` ended otherwise (lease ran out, session
    /// closed): its staged appends are dropped.
    Ended { lock: LockName, fence: Fence },
    /// An append staged under the default lock's grant `fence`.
    Staged {
        fence: Fence,
        file: FileIndex,
        content: Bytes,
    },
    /// The answer to a request, kept for deduplication.
    Answered {
        client: ClientId,
        request_id: RequestId,
        kind: RequestKind,
        reply: Reply,
    },
}

/// The durable effect of one input: made durable before any reply that follows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub changes: Vec<Change>,
}

/// A grant as kept in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSnapshot {
    pub lock: LockName,
    pub client: ClientId,
    pub token: Token,
    pub fence: Fence,
    pub lease: Millis,
    pub staged: Vec<(FileIndex, Bytes)>,
}

/// A remembered answer as kept in a snapshot, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerSnapshot {
    pub client: ClientId,
    pub request_id: RequestId,
    pub kind: RequestKind,
    pub reply: Reply,
}

/// The whole durable state at one point of the log. Answers are shared with
/// the core's dedup table (`Arc` is encoded as the value it points to).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub last_fence: Fence,
    pub file_lengths: FileLengths,
    pub grants: Vec<GrantSnapshot>,
    pub answers: Vec<Arc<AnswerSnapshot>>,
}
