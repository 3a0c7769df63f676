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
use super::types::{ClientId, Fence, LockName, LockView, RefusalCode, Reply, RequestKind, Token};

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
/// snapshot (the table and the record share the one `Arc`). The request id
/// is the caller's `String` moved in, not copied (`Box<str>` encodes as a
/// string, as the `Arc<str>` it replaced did).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerSnapshot {
    pub client: ClientId,
    pub request_id: Box<str>,
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

/// How many [`Change::Answered`] changes the encoded record `payload`
/// holds, read without building the record: strings and bytes are
/// borrowed, nothing is allocated (except for a status reply, which no
/// log holds today). Recovery counts a log's answers this way while it
/// checks the log, before the replay (see `Core::plan_replay`); 0 when the
/// bytes are not a whole record of this shape, which is safe there (a
/// count too low only plans less).
pub fn count_answers(payload: &[u8]) -> u64 {
    match postcard::take_from_bytes::<RecordShape>(payload) {
        Ok((record, [])) => record.changes.0,
        Ok(_) | Err(_) => 0,
    }
}

/// [`Record`] as [`count_answers`] reads it. Each `*Shape` type below has
/// the fields of the type it mirrors, in the same order and encoding, with
/// strings and bytes borrowed (the test `shapes_read_every_change_as_it_is`
/// holds them to it).
#[derive(Deserialize)]
struct RecordShape {
    changes: AnswersIn,
}

/// A `Vec<Change>` read element by element, counting the answers.
struct AnswersIn(u64);

impl<'de> Deserialize<'de> for AnswersIn {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Count;
        impl<'de> serde::de::Visitor<'de> for Count {
            type Value = u64;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a sequence of changes")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
                let mut answers = 0;
                while let Some(change) = seq.next_element::<ChangeShape<'de>>()? {
                    answers += u64::from(matches!(change, ChangeShape::Answered(_)));
                }
                Ok(answers)
            }
        }
        deserializer.deserialize_seq(Count).map(AnswersIn)
    }
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum ChangeShape<'a> {
    Granted {
        lock: &'a str,
        client: ClientId,
        token: &'a str,
        fence: Fence,
        lease: Millis,
    },
    Released {
        lock: &'a str,
        fence: Fence,
    },
    Ended {
        lock: &'a str,
        fence: Fence,
    },
    Staged {
        fence: Fence,
        file: FileIndex,
        content: &'a [u8],
    },
    Answered(#[serde(borrow)] AnswerShape<'a>),
    LeaseSet {
        lock: &'a str,
        fence: Fence,
        lease: Millis,
    },
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct AnswerShape<'a> {
    client: ClientId,
    request_id: &'a str,
    kind: RequestKind,
    #[serde(borrow)]
    reply: ReplyShape<'a>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum ReplyShape<'a> {
    Done,
    Granted {
        lock: &'a str,
        token: &'a str,
        fence: Fence,
        lease: Millis,
    },
    Renewed {
        lease: Millis,
    },
    Status {
        locks: Vec<LockView>,
        last_fence: Fence,
    },
    Refused {
        code: RefusalCode,
        message: &'a str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::staging::FileIndex;
    use crate::core::types::{GrantInfo, RequestId};

    /// `Change` as it was before answers, lock names and tokens were
    /// shared: logs written then must read the same now.
    #[derive(Serialize, Deserialize)]
    #[allow(dead_code)]
    enum OldChange {
        Granted {
            lock: String,
            client: ClientId,
            token: String,
            fence: Fence,
            lease: Millis,
        },
        Released {
            lock: String,
            fence: Fence,
        },
        Ended {
            lock: String,
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

    #[test]
    fn shared_names_and_tokens_encode_as_the_strings_they_were() {
        #[derive(Serialize)]
        struct OldGrantInfo {
            lock: String,
            token: String,
            fence: Fence,
            lease: Millis,
        }
        let new = vec![
            Change::Granted {
                lock: "jobs".into(),
                client: 2,
                token: "0badc0de".into(),
                fence: Fence(7),
                lease: Millis(30_000),
            },
            Change::Released {
                lock: "jobs".into(),
                fence: Fence(7),
            },
            Change::Ended {
                lock: "".into(),
                fence: Fence(8),
            },
        ];
        let old = vec![
            OldChange::Granted {
                lock: "jobs".into(),
                client: 2,
                token: "0badc0de".into(),
                fence: Fence(7),
                lease: Millis(30_000),
            },
            OldChange::Released {
                lock: "jobs".into(),
                fence: Fence(7),
            },
            OldChange::Ended {
                lock: String::new(),
                fence: Fence(8),
            },
        ];
        let bytes = postcard::to_allocvec(&old).unwrap();
        assert_eq!(postcard::to_allocvec(&new).unwrap(), bytes);
        let back: Vec<Change> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, new);
        let info = GrantInfo {
            lock: "jobs".into(),
            token: "0badc0de".into(),
            fence: Fence(7),
            lease: Millis(1),
        };
        let old_info = OldGrantInfo {
            lock: "jobs".into(),
            token: "0badc0de".into(),
            fence: Fence(7),
            lease: Millis(1),
        };
        assert_eq!(
            postcard::to_allocvec(&info).unwrap(),
            postcard::to_allocvec(&old_info).unwrap()
        );
    }

    /// One of each change, with an answer of each reply. A match with no
    /// catch-all below makes a new variant fail to compile here until it
    /// is added to this list and to the shapes.
    fn every_change() -> Vec<Change> {
        let answer = |reply| {
            Change::Answered(Arc::new(AnswerSnapshot {
                client: -7,
                request_id: "6f1c2e0a-5d3b-4f7e-9a2b-1c3d4e5f6a7b#12".into(),
                kind: RequestKind::Acquire,
                reply,
            }))
        };
        let replies = vec![
            Reply::Done,
            Reply::Granted(GrantInfo {
                lock: "jobs".into(),
                token: "0badc0de".into(),
                fence: Fence(300),
                lease: Millis(30_000),
            }),
            Reply::Renewed {
                lease: Millis(1 << 40),
            },
            Reply::Status {
                locks: vec![LockView {
                    lock: "x".into(),
                    holder: Some(4),
                    fence: Fence(2),
                    lease_left: Millis(9),
                    waiters: vec![(5, true), (-6, false)],
                    staged_appends: 3,
                }],
                last_fence: Fence(u64::MAX),
            },
            Reply::refused(RefusalCode::RequestExpired, "gone"),
            Reply::refused(RefusalCode::StagedLimit, "full"),
        ];
        for reply in &replies {
            match reply {
                Reply::Done
                | Reply::Granted(_)
                | Reply::Renewed { .. }
                | Reply::Status { .. }
                | Reply::Refused(_) => {}
            }
        }
        let mut changes = vec![
            Change::Granted {
                lock: "".into(),
                client: i32::MIN,
                token: "t".into(),
                fence: Fence(1),
                lease: Millis(10),
            },
            Change::Released {
                lock: "a lock".into(),
                fence: Fence(2),
            },
            Change::Ended {
                lock: "\u{e9}".into(),
                fence: Fence(3),
            },
            Change::Staged {
                fence: Fence(4),
                file: FileIndex::parse("file_99").unwrap(),
                content: Bytes::from_static(&[0, 1, 2, 255]),
            },
            Change::LeaseSet {
                lock: "l".into(),
                fence: Fence(5),
                lease: Millis(77),
            },
        ];
        changes.extend(replies.into_iter().map(answer));
        for change in &changes {
            match change {
                Change::Granted { .. }
                | Change::Released { .. }
                | Change::Ended { .. }
                | Change::Staged { .. }
                | Change::Answered(_)
                | Change::LeaseSet { .. } => {}
            }
        }
        changes
    }

    #[test]
    fn shapes_read_every_change_as_it_is() {
        let changes = every_change();
        let answers = |changes: &[Change]| {
            changes
                .iter()
                .filter(|c| matches!(c, Change::Answered(_)))
                .count() as u64
        };
        let all = Record {
            changes: changes.clone(),
        };
        let bytes = postcard::to_allocvec(&all).unwrap();
        assert_eq!(count_answers(&bytes), 6);
        assert_eq!(count_answers(&bytes), answers(&all.changes));
        // Each change alone, and every pair in both orders: a shape that
        // read one field too many or too few would misplace the next.
        for a in &changes {
            for b in &changes {
                let record = Record {
                    changes: vec![a.clone(), b.clone()],
                };
                let bytes = postcard::to_allocvec(&record).unwrap();
                assert_eq!(
                    count_answers(&bytes),
                    answers(&record.changes),
                    "{record:?}"
                );
            }
        }
        assert_eq!(
            count_answers(&postcard::to_allocvec(&Record::default()).unwrap()),
            0
        );
        // Not a whole record: counted as none (a count too low is safe).
        assert_eq!(count_answers(&bytes[..bytes.len() - 1]), 0);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(count_answers(&longer), 0);
        assert_eq!(count_answers(&[]), 0);
        assert_eq!(count_answers(&[0xff; 9]), 0);
    }
}
