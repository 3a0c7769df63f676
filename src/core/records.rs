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
use super::types::{ClientId, Fence, LockName, Reply, RequestKind, Token};

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
    /// The answer to a request, kept for deduplication: the dedup table's
    /// own entry, shared rather than copied (on disk an `Arc` is its value,
    /// so this encodes exactly as the struct variant it replaced, with the
    /// fields client, request id, kind, reply).
    Answered(Arc<AnswerSnapshot>),
    /// The holder of grant `fence` of `lock` asked for a lease of another
    /// length (a renew or a re-acquire): a restart gives the grant a fresh
    /// lease of this length, not the first one. (Added after the others, so
    /// logs written before it still decode.)
    LeaseSet {
        lock: LockName,
        fence: Fence,
        lease: Millis,
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

/// A remembered answer as kept in the dedup table, a log record and a
/// snapshot. The request id is shared with the table's key (`Arc<str>`
/// encodes as a string).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerSnapshot {
    pub client: ClientId,
    pub request_id: Arc<str>,
    pub kind: RequestKind,
    pub reply: Reply,
}

/// The highest sequence number of a request-id prefix whose answer the
/// dedup table forgot (see `core::dedup`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloorSnapshot {
    pub client: ClientId,
    pub prefix: Arc<str>,
    pub seq: u64,
}

/// The whole durable state at one point of the log. Answers are shared with
/// the core's dedup table (`Arc` is encoded as the value it points to).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub last_fence: Fence,
    pub file_lengths: FileLengths,
    pub grants: Vec<GrantSnapshot>,
    pub answers: Vec<Arc<AnswerSnapshot>>,
    /// Added after the fields above: a snapshot written before it decodes
    /// with no floors ([`Snapshot::decode`]). In the order they would go.
    pub floors: Vec<FloorSnapshot>,
    /// Added after `floors`: whether each of them was raised since it was
    /// last looked at (the second chance it has when floors are dropped).
    /// Empty in a snapshot written before it: every floor counts as
    /// raised, the nearest a restore can come.
    pub floors_raised: Vec<bool>,
}

/// A snapshot as written after floors were kept, before their flags.
#[derive(Deserialize)]
struct SnapshotWithoutFlags {
    last_fence: Fence,
    file_lengths: FileLengths,
    grants: Vec<GrantSnapshot>,
    answers: Vec<Arc<AnswerSnapshot>>,
    floors: Vec<FloorSnapshot>,
}

/// A snapshot as written before floors were kept.
#[derive(Deserialize)]
struct SnapshotWithoutFloors {
    last_fence: Fence,
    file_lengths: FileLengths,
    grants: Vec<GrantSnapshot>,
    answers: Vec<Arc<AnswerSnapshot>>,
}

impl Snapshot {
    /// Decodes a snapshot, of this shape or of one before it (without the
    /// floors' flags, or without floors). Each added field is at the end,
    /// so an older snapshot is cut short for a newer shape: it is taken as
    /// an older shape only if that shape is the whole of the bytes (a new
    /// snapshot cut short is not an old one).
    ///
    /// # Errors
    /// The bytes are none of them.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot, postcard::Error> {
        let e = match postcard::from_bytes::<Snapshot>(bytes) {
            Ok(snapshot) => return Ok(snapshot),
            Err(e) => e,
        };
        if let Ok((old, [])) = postcard::take_from_bytes::<SnapshotWithoutFlags>(bytes) {
            return Ok(Snapshot {
                last_fence: old.last_fence,
                file_lengths: old.file_lengths,
                grants: old.grants,
                answers: old.answers,
                floors: old.floors,
                floors_raised: Vec::new(),
            });
        }
        match postcard::take_from_bytes::<SnapshotWithoutFloors>(bytes) {
            Ok((old, [])) => Ok(Snapshot {
                last_fence: old.last_fence,
                file_lengths: old.file_lengths,
                grants: old.grants,
                answers: old.answers,
                floors: Vec::new(),
                floors_raised: Vec::new(),
            }),
            Ok(_) | Err(_) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::types::{GrantInfo, RequestId};

    /// `Change` as it was before answers were shared: logs written then
    /// must read the same now.
    #[derive(Serialize, Deserialize)]
    #[allow(dead_code)]
    enum OldChange {
        Granted {
            lock: LockName,
            client: ClientId,
            token: Token,
            fence: Fence,
            lease: Millis,
        },
        Released {
            lock: LockName,
            fence: Fence,
        },
        Ended {
            lock: LockName,
            fence: Fence,
        },
        Staged {
            fence: Fence,
            file: FileIndex,
            content: Bytes,
        },
        Answered {
            client: ClientId,
            request_id: RequestId,
            kind: RequestKind,
            reply: Reply,
        },
    }

    /// A snapshot's answer as it was before ids were shared.
    #[derive(Serialize)]
    struct OldAnswer {
        client: ClientId,
        request_id: RequestId,
        kind: RequestKind,
        reply: Reply,
    }

    #[derive(Serialize)]
    struct OldSnapshot {
        last_fence: Fence,
        file_lengths: FileLengths,
        grants: Vec<GrantSnapshot>,
        answers: Vec<OldAnswer>,
    }

    #[test]
    fn a_snapshot_of_shared_answers_encodes_as_before() {
        let new = Snapshot {
            last_fence: Fence(4),
            answers: vec![Arc::new(AnswerSnapshot {
                client: 7,
                request_id: "r-9".into(),
                kind: RequestKind::Release,
                reply: Reply::Done,
            })],
            ..Snapshot::default()
        };
        let old = OldSnapshot {
            last_fence: Fence(4),
            file_lengths: new.file_lengths.clone(),
            grants: Vec::new(),
            answers: vec![OldAnswer {
                client: 7,
                request_id: "r-9".into(),
                kind: RequestKind::Release,
                reply: Reply::Done,
            }],
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        // The same bytes, then the (empty) floors and flags added since.
        let mut with_floors = bytes.clone();
        with_floors.extend([0, 0]);
        assert_eq!(postcard::to_allocvec(&new).unwrap(), with_floors);
        assert_eq!(
            Snapshot::decode(&bytes).unwrap(),
            new,
            "a snapshot written before floors still decodes"
        );
        assert_eq!(Snapshot::decode(&with_floors).unwrap(), new);
    }

    #[test]
    fn a_snapshot_keeps_its_floors_and_bad_bytes_do_not_decode() {
        let snapshot = Snapshot {
            last_fence: Fence(2),
            floors: vec![FloorSnapshot {
                client: 3,
                prefix: "6f1c2e0a-5d3b-4f7e-9a2b-1c3d4e5f6a7b".into(),
                seq: 41,
            }],
            ..Snapshot::default()
        };
        let bytes = postcard::to_allocvec(&snapshot).unwrap();
        assert_eq!(Snapshot::decode(&bytes).unwrap(), snapshot);
        // Cut inside the floors: neither shape.
        assert!(Snapshot::decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(Snapshot::decode(&[0xff; 3]).is_err());
        // With the flags, in order.
        let flagged = Snapshot {
            floors_raised: vec![false],
            ..snapshot.clone()
        };
        let flagged_bytes = postcard::to_allocvec(&flagged).unwrap();
        assert_eq!(Snapshot::decode(&flagged_bytes).unwrap(), flagged);
        // Written before the flags (the bytes end after the floors): the
        // floors without flags.
        let unflagged = &bytes[..bytes.len() - 1];
        assert_eq!(Snapshot::decode(unflagged).unwrap(), snapshot);
    }

    #[test]
    fn a_shared_answer_encodes_as_the_struct_variant_it_replaced() {
        let reply = Reply::Granted(GrantInfo {
            lock: "l".into(),
            token: "t0k3n".into(),
            fence: Fence(9),
            lease: Millis(5000),
        });
        let new = vec![Change::Answered(Arc::new(AnswerSnapshot {
            client: -3,
            request_id: "req-1".into(),
            kind: RequestKind::Acquire,
            reply: reply.clone(),
        }))];
        let old = vec![OldChange::Answered {
            client: -3,
            request_id: "req-1".into(),
            kind: RequestKind::Acquire,
            reply,
        }];
        let bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(postcard::to_allocvec(&new).unwrap(), bytes);
        let back: Vec<Change> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, new);
    }
}
