//! The durable log: records framed with length and CRC32C, group-committed
//! with one fdatasync, replaced by a snapshot when it grows.
//!
//! Owns: the files of the state directory — `format` (the version of
//! what follows; a directory of another version is refused, never
//! misread), `snap-G` (the durable state at the start of generation G, one
//! frame) and `log-G` (the records logged in generation G). Recovery loads
//! the newest snapshot and replays every log of its generation and later
//! ones in order, zeroes a torn tail (a write a crash cut short, see
//! [`frame`] for how it is told from damage) and refuses to start on
//! damage, naming the file and offset. Must not: interpret records (the core does)
//! or touch data files.
//!
//! A snapshot is taken in two steps so that group commits need not wait for
//! it. [`Wal::begin_snapshot`] syncs the current segment and moves the log
//! to `log-(G+1)` at once (records go on there); [`SnapshotWrite::run`],
//! on any thread, writes `snap-(G+1)` to `snap-(G+1).tmp`, syncs, renames,
//! syncs the directory, and only then removes the older generations' files.
//! A crash before the rename leaves `snap-G` with `log-G` and `log-(G+1)`,
//! which recovery replays in order; after it, `snap-(G+1)` with
//! `log-(G+1)`. Either way nothing logged is lost or replayed twice.
//!
//! Segments are preallocated: zeros are written ahead of the data and made
//! durable, so that a group commit's fdatasync only flushes data blocks and
//! never the file's size (on the bench disk 0.04–0.09 ms instead of
//! 0.13 ms). The snapshot's write also zero-fills the next generation's
//! segment ahead of time, so beginning the next snapshot costs one fdatasync
//! and no zero-filling in line; recovery keeps such a segment if it was
//! never used (and allows a torn tail just before it), so that the first
//! snapshot after a restart starts at no cost too; when there is no such
//! segment (a new directory), the server has one made on another thread at
//! start ([`Wal::segment_ahead`]; the simulations' in-line mode does not).
//! Writes go in whole
//! 4 KiB blocks from the block holding the end of the data, so the file can
//! be opened with `O_DIRECT` ([`Dir::open_direct`]); the tail block is
//! rewritten with the same bytes plus the new records, as any log that
//! appends in pages does.

pub mod frame;
pub mod read;

use std::io;
use std::sync::Arc;

use crate::core::records::{count_answers, Change, Record, Snapshot};
use crate::storage::{Dir, DirFile};

use frame::{ScanEnd, Source};
use read::SegmentReader;

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Damage that is not a torn tail: the server must not start on it.
    #[error("{file}: corrupt at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    /// The operating system refused a read, write or sync.
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: io::Error,
    },
}

/// What the checked log holds, known before its first record is handed on
/// ([`Wal::recover_each`]'s `start` gets it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogCounts {
    /// Answers ([`crate::core::records::Change::Answered`]) in the records
    /// that will be handed on, as [`count_answers`] reads them: never more
    /// than there are.
    pub answers: u64,
}

/// What a recovery that hands each record to a visitor found
/// ([`Wal::recover_each`]).
pub struct Reopened<S> {
    /// What the visitor built from the snapshot and the records.
    pub state: S,
    /// The log, ready to append after them (its
    /// [`Wal::records_since_snapshot`] counts the records handed on).
    pub wal: Wal,
    /// Bytes of torn tail that were cut off.
    pub torn_bytes: u64,
}

/// What recovery found.
pub struct Recovered {
    /// The state at the start of the current generation.
    pub snapshot: Snapshot,
    /// Records logged since, in order.
    pub records: Vec<Record>,
    /// The log, ready to append after them.
    pub wal: Wal,
    /// Bytes of torn tail that were cut off.
    pub torn_bytes: u64,
}

/// The longest record written as one (see [`Wal::append`]): far over any
/// call's own record (an append of at most 64 MiB and its answer), and far
/// under what recovery reads ([`frame::MAX_PAYLOAD`], 256 MiB). Tests and
/// simulations lower it ([`Wal::set_split_bytes`]) to split records of a
/// few changes.
pub const SPLIT_RECORD_BYTES: usize = 128 << 20;

/// The unit of log writes: every write starts and ends on a block boundary.
pub const BLOCK: u64 = 4096;

/// Default zero-filled space kept ahead of the log's data.
pub const DEFAULT_PREALLOC: u64 = 16 << 20;

fn block_floor(n: u64) -> u64 {
    n / BLOCK * BLOCK
}

fn block_ceil(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// The write side of the log.
pub struct Wal {
    dir: Arc<dyn Dir>,
    generation: u64,
    segment: Box<dyn DirFile>,
    /// End of the durable-or-written data in the segment.
    offset: u64,
    /// End of the durable data in the segment: the `synced` mark of every
    /// record logged now (see [`frame`]), which tells recovery a write a
    /// crash tore from damage.
    synced: u64,
    /// The bytes of the block holding `offset`, up to `offset` (rewritten
    /// with the next write, which starts at that block's boundary).
    tail: Vec<u8>,
    /// Where the zero-filled, durable space of the segment ends.
    allocated: u64,
    /// Zero-filled space to keep ahead of the data (0: none).
    prealloc: u64,
    /// Framed records appended but not yet written.
    pending: Vec<u8>,
    /// The block-aligned buffer of the last write, kept for its capacity.
    scratch: Vec<u8>,
    /// Written but not yet synced.
    unsynced: bool,
    /// Records in the current segment (written or pending).
    records: u64,
    /// Records longer than this are written as runs of their changes.
    split_bytes: usize,
    /// The next generation's segment, zero-filled ahead of time (by the
    /// last snapshot's write, [`SnapshotWrite::run`], or a
    /// [`SegmentAhead`]), or kept by recovery.
    premade: Option<Premade>,
}

/// A zero-filled, durable segment for a generation not yet started.
pub struct Premade {
    generation: u64,
    segment: Box<dyn DirFile>,
    allocated: u64,
}

/// The rest of a snapshot whose generation the log has already started
/// ([`Wal::begin_snapshot`]): write the snapshot file, remove the older
/// generations, zero-fill the next generation's segment. Any thread may run
/// it; until it has, recovery replays the old generation's snapshot and
/// both logs, so a crash at any instant loses nothing.
pub struct SnapshotWrite {
    dir: Arc<dyn Dir>,
    generation: u64,
    snapshot: Snapshot,
    prealloc: u64,
}

/// The file that names the format of the directory's log and snapshots.
const FORMAT_FILE: &str = "format";

/// What [`FORMAT_FILE`] holds: version 2 marks every record with where the
/// durable data ended when it was logged (see [`frame`]); the logs of
/// version 1 (no format file) have no such mark and are not read.
const FORMAT: &[u8] = b"dlm log format 2\n";

/// Refuses a directory whose state another format wrote.
fn check_format(dir: &dyn Dir) -> Result<(), LogError> {
    let corrupt = |reason: String| LogError::Corrupt {
        file: dir.describe(FORMAT_FILE),
        offset: 0,
        reason,
    };
    match dir.read(FORMAT_FILE) {
        Ok(bytes) if bytes == FORMAT => Ok(()),
        Ok(bytes) => Err(corrupt(format!(
            "the state is in format {:?}, and this build reads {:?}",
            String::from_utf8_lossy(&bytes).trim(),
            String::from_utf8_lossy(FORMAT).trim(),
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(corrupt(format!(
            "missing: the state was written by an older dlm, whose log this build \
             cannot read (it reads {:?})",
            String::from_utf8_lossy(FORMAT).trim(),
        ))),
        Err(e) => Err(io_err(dir, FORMAT_FILE)(e)),
    }
}

/// Writes [`FORMAT_FILE`] and makes it and its name durable before the
/// first snapshot exists (a power loss may keep a directory's later
/// changes and not its earlier ones: the snapshot's name without this one).
fn write_format(dir: &dyn Dir) -> Result<(), LogError> {
    let mut file = dir
        .open(FORMAT_FILE, true)
        .map_err(io_err(dir, FORMAT_FILE))?;
    file.set_len(0).map_err(io_err(dir, FORMAT_FILE))?;
    file.write_at(0, FORMAT).map_err(io_err(dir, FORMAT_FILE))?;
    file.sync_data().map_err(io_err(dir, FORMAT_FILE))?;
    dir.sync().map_err(io_err(dir, "."))
}

fn snap_name(generation: u64) -> String {
    format!("snap-{generation:020}")
}

fn log_name(generation: u64) -> String {
    format!("log-{generation:020}")
}

/// The error of a failed operation on `name` in `dir`, naming the file.
fn io_err(dir: &dyn Dir, name: &str) -> impl FnOnce(io::Error) -> LogError + use<> {
    let file = dir.describe(name);
    move |source| LogError::Io { file, source }
}

/// Opens segment `name` for reading in chunks; `None` when it does not exist.
fn open_segment(dir: &dyn Dir, name: &str) -> Result<Option<SegmentReader>, LogError> {
    match dir.open(name, false).and_then(SegmentReader::new) {
        Ok(segment) => Ok(Some(segment)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(dir, name)(e)),
    }
}

/// What checking one segment found (all zero for a missing one).
#[derive(Default)]
struct CheckedSegment {
    /// Where its good records end.
    valid: u64,
    /// Where its non-zero bytes end (past `valid` only after a torn tail).
    dirty_end: u64,
    size: u64,
    /// The bytes of the block holding `valid`, up to `valid`.
    tail: Vec<u8>,
}

/// Reads segment `name` in chunks and checks its frames (the records are
/// walked again later, so memory holds a chunk, not the log). Damage is an
/// error; a torn tail is reported in the [`ScanEnd`].
fn check_segment(
    dir: &dyn Dir,
    name: &str,
    answers: &mut u64,
) -> Result<(CheckedSegment, ScanEnd), LogError> {
    let Some(mut segment) = open_segment(dir, name)? else {
        return Ok((CheckedSegment::default(), ScanEnd::Clean));
    };
    let read_err = |e| io_err(dir, name)(e);
    let count = |payload: &[u8]| *answers += count_answers(payload);
    let (valid, end) = frame::check_source_each(&mut segment, count).map_err(read_err)?;
    if let ScanEnd::Corrupt { offset, reason } = end {
        return Err(LogError::Corrupt {
            file: dir.describe(name),
            offset,
            reason,
        });
    }
    // After a clean end only zeros follow the data.
    let dirty_end = if end == ScanEnd::Clean {
        valid
    } else {
        segment.dirty_end(valid).map_err(read_err)?
    };
    let floor = block_floor(valid);
    let tail = segment
        .get(floor, (valid - floor) as usize)
        .map_err(read_err)?
        .to_vec();
    let checked = CheckedSegment {
        valid,
        dirty_end,
        size: segment.size(),
        tail,
    };
    Ok((checked, end))
}

fn generation_of(name: &str, prefix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
        // dlm counts generations up from 0, one per snapshot: a name past
        // 2^63 is none of its files (and `generation + 1` never overflows).
        .filter(|g: &u64| *g < 1 << 63)
}

impl Wal {
    /// The error of the current segment's file, named only when it happens
    /// (no allocation on the group-commit path).
    fn segment_io(&self) -> impl FnOnce(io::Error) -> LogError + '_ {
        move |source| LogError::Io {
            file: self.dir.describe(&log_name(self.generation)),
            source,
        }
    }

    fn io(&self, name: &str) -> impl FnOnce(io::Error) -> LogError + '_ {
        io_err(self.dir.as_ref(), name)
    }

    /// Opens the log in `dir`, creating generation 0 from `initial()` when the
    /// directory holds no state yet; keeps [`DEFAULT_PREALLOC`] bytes of
    /// zeros ahead of the data.
    ///
    /// # Errors
    /// [`LogError::Corrupt`] naming file and offset when the log is damaged
    /// anywhere but its tail; [`LogError::Io`] when the disk refuses.
    pub fn recover(
        dir: Box<dyn Dir>,
        initial: impl FnOnce() -> Snapshot,
    ) -> Result<Recovered, LogError> {
        Wal::recover_with(dir, DEFAULT_PREALLOC, initial)
    }

    /// [`Wal::recover`] keeping `prealloc` bytes of zeros ahead of the data
    /// (0: the file grows with every write).
    ///
    /// # Errors
    /// As [`Wal::recover`].
    pub fn recover_with(
        dir: Box<dyn Dir>,
        prealloc: u64,
        initial: impl FnOnce() -> Snapshot,
    ) -> Result<Recovered, LogError> {
        let reopened = Wal::recover_each(
            dir,
            prealloc,
            initial,
            |snapshot, _| Ok((snapshot, Vec::new())),
            |(_, records), record| {
                records.push(record);
                Ok(())
            },
        )?;
        let (snapshot, records) = reopened.state;
        Ok(Recovered {
            snapshot,
            records,
            wal: reopened.wal,
            torn_bytes: reopened.torn_bytes,
        })
    }

    /// [`Wal::recover_with`] handing the snapshot to `start`, with what the
    /// checked log holds ([`LogCounts`], known once every segment was
    /// checked, before any record is handed on), and then each
    /// record, as soon as it is decoded, to `each` (in log order), instead
    /// of collecting them: neither the log's bytes nor its decoded records
    /// are ever all in memory at once (segments are read in chunks, see
    /// [`read::SegmentReader`], once to check them and once to replay
    /// them), and a replay takes the records by value.
    ///
    /// Every segment is read and checked whole (frames, checksums, where a
    /// torn tail may be) before any record is handed on, so damage anywhere
    /// in the log stops recovery before anything is replayed. Only a record
    /// that passes its checksum but does not decode (a log written by a
    /// newer format, say), a segment that changed between the two reads, a
    /// read error, or an error of `each`, stops it after the records before
    /// it were handed on: every one of those is committed (and synced before
    /// the first was handed on), and the caller refuses to start on the
    /// error. Leftover `.tmp` files
    /// and older generations' files are removed first (a new directory gets
    /// its first snapshot and segment before `start`); the segments are only
    /// changed (torn bytes zeroed, unused ones removed, space preallocated)
    /// once every record was handed on.
    ///
    /// # Errors
    /// As [`Wal::recover`], and whatever `start` or `each` returns.
    pub fn recover_each<S, E: From<LogError>>(
        dir: Box<dyn Dir>,
        prealloc: u64,
        initial: impl FnOnce() -> Snapshot,
        start: impl FnOnce(Snapshot, LogCounts) -> Result<S, E>,
        mut each: impl FnMut(&mut S, Record) -> Result<(), E>,
    ) -> Result<Reopened<S>, E> {
        let dir: Arc<dyn Dir> = Arc::from(dir);
        let names = dir.list().map_err(io_err(dir.as_ref(), "."))?;
        for name in names.iter().filter(|n| n.ends_with(".tmp")) {
            dir.remove(name).map_err(io_err(dir.as_ref(), name))?;
        }
        let newest_snap = names.iter().filter_map(|n| generation_of(n, "snap-")).max();
        let logs: Vec<u64> = names
            .iter()
            .filter_map(|n| generation_of(n, "log-"))
            .collect();

        let Some(generation) = newest_snap else {
            // A new directory. The one log a first start can leave without
            // a snapshot is `log-0`, all zeros (it is made and zero-filled
            // before the first snapshot, and nothing is logged before that
            // snapshot is durable): it is removed. Any other log, or data in
            // it, means lost snapshots or damage: refused, never a fresh
            // start over a state that existed.
            if !logs.is_empty() {
                let name = log_name(logs[0]);
                let leftover = logs == [0]
                    && match open_segment(dir.as_ref(), &name)? {
                        Some(mut segment) => {
                            segment.zero_from(0).map_err(io_err(dir.as_ref(), &name))?
                        }
                        None => true,
                    };
                if !leftover {
                    return Err(LogError::Corrupt {
                        file: dir.describe(&name),
                        offset: 0,
                        reason: "a log without its snapshot".to_owned(),
                    }
                    .into());
                }
                dir.remove(&name).map_err(io_err(dir.as_ref(), &name))?;
            }
            write_format(dir.as_ref())?;
            let snapshot = initial();
            let segment = dir
                .open_direct(&log_name(0), true)
                .map_err(io_err(dir.as_ref(), &log_name(0)))?;
            let mut wal = Wal::over(dir, 0, segment, prealloc);
            wal.preallocate(BLOCK)?;
            write_snapshot_file(wal.dir.as_ref(), 0, &snapshot)?;
            return Ok(Reopened {
                state: start(snapshot, LogCounts::default())?,
                wal,
                torn_bytes: 0,
            });
        };

        check_format(dir.as_ref())?;
        let snap_file = snap_name(generation);
        let bytes = dir
            .read(&snap_file)
            .map_err(io_err(dir.as_ref(), &snap_file))?;
        let corrupt_snap = |offset, reason: &str| LogError::Corrupt {
            file: dir.describe(&snap_file),
            offset,
            reason: reason.to_owned(),
        };
        let payload = frame::whole(&bytes).map_err(|reason| {
            corrupt_snap(0, &format!("snapshot is not one whole record: {reason}"))
        })?;
        let snapshot = Snapshot::decode(payload)
            .map_err(|e| corrupt_snap(0, &format!("snapshot does not decode: {e}")))?;

        // Leftovers of a generation change that a crash interrupted. The
        // newest snapshot's name may not be durable yet (a process killed
        // between its rename and the directory's sync): make it so before
        // removing what it replaces, or a power loss could keep the
        // removals and lose the rename.
        let leftovers: Vec<&String> = names
            .iter()
            .filter(|name| {
                let old_snap = generation_of(name, "snap-").is_some_and(|g| g < generation);
                let old_log = generation_of(name, "log-").is_some_and(|g| g < generation);
                old_snap || old_log
            })
            .collect();
        if !leftovers.is_empty() {
            dir.sync().map_err(io_err(dir.as_ref(), "."))?;
        }
        for name in leftovers {
            dir.remove(name).map_err(io_err(dir.as_ref(), name))?;
        }

        let mut segments: Vec<u64> = logs.into_iter().filter(|g| *g >= generation).collect();
        segments.sort_unstable();
        if segments.first() != Some(&generation) {
            segments.insert(0, generation);
        }
        let mut records = 0;
        let mut torn_bytes = 0;
        // A torn tail is allowed only in the last segment that holds data:
        // segments after it can only be ones zero-filled ahead and never
        // used (the log moves to a new segment only after syncing the old).
        let mut torn: Option<(String, u64)> = None;
        // The segment the log goes on in, with its generation.
        let mut current: Option<(u64, CheckedSegment)> = None;
        // Segments after `current` with no data (generation, size): the
        // next generation's is kept as zero-filled ahead, others removed.
        let mut unused = Vec::new();
        // Segments with records, checked whole before any record is handed
        // on: name, and where its records end.
        let mut checked = Vec::new();
        // Answers in the good frames of every segment (a torn tail's are
        // not counted: only frames before it are good).
        let mut answers = 0;
        for g in &segments {
            let name = log_name(*g);
            let (seg, end) = check_segment(dir.as_ref(), &name, &mut answers)?;
            if current.is_some() && seg.valid == 0 && seg.dirty_end == 0 {
                unused.push((*g, seg.size));
                continue;
            }
            if let Some((file, offset)) = torn.take() {
                return Err(LogError::Corrupt {
                    file,
                    offset,
                    reason: "incomplete record before the end of the log".to_owned(),
                }
                .into());
            }
            unused.clear();
            // (Damage was refused when the segment was checked.)
            if end == ScanEnd::TornTail {
                torn = Some((dir.describe(&name), seg.valid));
                torn_bytes = seg.dirty_end - seg.valid;
            }
            if seg.valid > 0 {
                checked.push((name, seg.valid));
            }
            current = Some((*g, seg));
        }
        // What is read here may never have been synced: a process killed
        // between a log write and its fsync leaves the record in the page
        // cache, and recovery reads it like any other. The server answers
        // from the recovered state (a retry of the call that wrote such a
        // record is answered from its replayed dedup entry without a new log
        // write), so every record handed on must be durable first, or a
        // power failure after the start could lose what was acknowledged.
        for (name, _) in &checked {
            dir.open(name, false)
                .and_then(|mut segment| segment.sync_data())
                .map_err(io_err(dir.as_ref(), name))?;
        }
        let mut state = start(snapshot, LogCounts { answers })?;
        // Every segment's frames and checksums are good: hand the records
        // on, segment by segment, each record as soon as it is decoded.
        for (name, valid) in checked {
            let read_err = |e| E::from(io_err(dir.as_ref(), &name)(e));
            let mut segment = open_segment(dir.as_ref(), &name)?.ok_or_else(|| {
                read_err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "removed while recovery read it",
                ))
            })?;
            let changed = |offset| {
                E::from(LogError::Corrupt {
                    file: dir.describe(&name),
                    offset,
                    reason: "changed since recovery checked it".to_owned(),
                })
            };
            frame::each_payload(&mut segment, valid, read_err, changed, |offset, payload| {
                let record: Record =
                    postcard::from_bytes(payload).map_err(|e| LogError::Corrupt {
                        file: dir.describe(&name),
                        offset,
                        reason: format!("record does not decode: {e}"),
                    })?;
                each(&mut state, record)?;
                records += 1;
                Ok(())
            })?;
        }
        let (
            last,
            CheckedSegment {
                valid,
                dirty_end,
                size,
                tail,
            },
        ) = current.unwrap_or((generation, CheckedSegment::default()));
        // All zeros, so safe to write into whatever a crash left of its
        // zero-filling (a shorter file only means less space ahead).
        let mut ahead = None;
        for (g, size) in unused {
            let name = log_name(g);
            if g == last + 1 && prealloc > 0 && size > 0 {
                ahead = Some((g, size));
            } else {
                dir.remove(&name).map_err(io_err(dir.as_ref(), &name))?;
            }
        }
        let name = log_name(last);
        let segment = dir
            .open_direct(&name, true)
            .map_err(io_err(dir.as_ref(), &name))?;
        let mut wal = Wal::over(dir, last, segment, prealloc);
        if let Some((g, allocated)) = ahead {
            let name = log_name(g);
            let mut segment = wal
                .dir
                .open_direct(&name, false)
                .map_err(io_err(wal.dir.as_ref(), &name))?;
            // A crash may have cut its zero-filling short before the sync:
            // make the zeros durable now, as a segment made ahead must be.
            segment
                .sync_data()
                .map_err(io_err(wal.dir.as_ref(), &name))?;
            wal.premade = Some(Premade {
                generation: g,
                segment,
                allocated,
            });
        }
        wal.offset = valid;
        wal.synced = valid;
        wal.tail = tail;
        wal.records = records;
        wal.allocated = size;
        if dirty_end > valid {
            // Zero the torn bytes (the space stays allocated for new data):
            // the tail block rewritten, then the blocks after it in bounded
            // chunks. How far the bytes to zero reach comes from the disk
            // (a stray byte far past the tear): one buffer that long could
            // be more memory than there is.
            wal.write_blocks(block_ceil(valid))?;
            if dirty_end > block_ceil(valid) {
                zero_fill(
                    wal.segment.as_mut(),
                    block_ceil(valid),
                    block_ceil(dirty_end),
                )
                .map_err(wal.segment_io())?;
            }
            wal.sync()?;
        }
        wal.preallocate(valid)?;
        wal.dir.sync().map_err(wal.io("."))?;
        Ok(Reopened {
            state,
            wal,
            torn_bytes,
        })
    }

    fn over(dir: Arc<dyn Dir>, generation: u64, segment: Box<dyn DirFile>, prealloc: u64) -> Wal {
        Wal {
            dir,
            generation,
            segment,
            offset: 0,
            synced: 0,
            tail: Vec::new(),
            allocated: 0,
            prealloc,
            pending: Vec::new(),
            scratch: Vec::new(),
            unsynced: false,
            records: 0,
            split_bytes: SPLIT_RECORD_BYTES,
            premade: None,
        }
    }

    /// Writes records longer than `bytes` as runs of their changes
    /// ([`SPLIT_RECORD_BYTES`] unless set): for tests and simulations, which
    /// lower it so that their records of a few changes are cut too.
    pub fn set_split_bytes(&mut self, bytes: usize) {
        self.split_bytes = bytes;
    }

    /// Makes sure zero-filled, durable space reaches past `end` by at least
    /// the preallocation (in one step, so that this happens once per
    /// `prealloc` bytes of log, not once per write).
    fn preallocate(&mut self, end: u64) -> Result<(), LogError> {
        if self.prealloc == 0 || end + BLOCK <= self.allocated {
            return Ok(());
        }
        let to = block_ceil(end) + self.prealloc;
        // Above `allocated` there is no data: the file ends there.
        zero_fill(self.segment.as_mut(), self.allocated, to).map_err(self.segment_io())?;
        self.allocated = to;
        Ok(())
    }

    /// Writes the tail block and every pending record in whole blocks from
    /// the tail block's start, zero-padded to `end` (at least the next block
    /// boundary).
    fn write_blocks(&mut self, end: u64) -> Result<(), LogError> {
        let start = block_floor(self.offset);
        let data_end = self.offset + self.pending.len() as u64;
        let padded = block_ceil(data_end).max(end);
        if self.prealloc > 0 && padded > self.allocated {
            self.preallocate(padded)?;
        }
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf.extend_from_slice(&self.tail);
        buf.extend_from_slice(&self.pending);
        buf.resize((padded - start) as usize, 0);
        let written = self.segment.write_at(start, &buf);
        if let Err(e) = written {
            self.scratch = buf;
            return Err(self.segment_io()(e));
        }
        let tail_start = block_floor(data_end);
        self.tail.clear();
        self.tail
            .extend_from_slice(&buf[(tail_start - start) as usize..(data_end - start) as usize]);
        self.scratch = buf;
        self.offset = data_end;
        self.allocated = self.allocated.max(padded);
        self.pending.clear();
        self.unsynced = true;
        Ok(())
    }

    /// Adds a record to the next group commit. Not durable until [`Wal::sync`].
    ///
    /// A record whose encoding is longer than [`SPLIT_RECORD_BYTES`] (one
    /// step that ends thousands of grants: a client's close, or every
    /// lease a restart left running when its timers fire together) goes in
    /// as several records, so that none is longer than recovery reads
    /// ([`frame::MAX_PAYLOAD`]). Each is a run of the record's changes, in
    /// order, cut only before a [`Change::Ended`]: what follows an `Ended`
    /// up to the next (the grant to the next waiter and its answer; at the
    /// end, the call's own changes and its answer) stays in one record.
    /// Replay applies changes one by one, so the cuts change nothing; a
    /// power loss may keep only the first runs, as if the step had ended
    /// those grants one at a time, with no call's change kept without its
    /// answer.
    pub fn append(&mut self, record: &Record) {
        // Encoding plain data into a Vec cannot fail.
        let payload = postcard::to_allocvec(record).unwrap_or_default();
        if payload.len() <= self.split_bytes || record.changes.len() < 2 {
            self.push(&payload);
            return;
        }
        drop(payload);
        let mut run: Vec<Change> = Vec::new();
        let mut run_bytes = 0;
        // Changes from the last `Ended` on, not yet in `run`.
        let mut group: Vec<Change> = Vec::new();
        let mut group_bytes = 0;
        let changes = record.changes.iter().map(Some).chain([None]);
        for change in changes {
            if matches!(change, None | Some(Change::Ended { .. })) && !group.is_empty() {
                if !run.is_empty() && run_bytes + group_bytes > self.split_bytes {
                    self.append_whole(&Record {
                        changes: std::mem::take(&mut run),
                    });
                    run_bytes = 0;
                }
                run.append(&mut group);
                run_bytes += group_bytes;
                group_bytes = 0;
            }
            if let Some(change) = change {
                group_bytes += postcard::to_allocvec(change).map_or(0, |b| b.len());
                group.push(change.clone());
            }
        }
        self.append_whole(&Record { changes: run });
    }

    /// Adds `record` as one frame, however long.
    fn append_whole(&mut self, record: &Record) {
        self.push(&postcard::to_allocvec(record).unwrap_or_default());
    }

    /// Adds one encoded record as a frame.
    fn push(&mut self, payload: &[u8]) {
        frame::encode(payload, self.synced, &mut self.pending);
        self.records += 1;
    }

    /// True when records wait for [`Wal::sync`].
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || self.unsynced
    }

    /// Writes every pending record to the log file without making it
    /// durable (the simulation crashes between this and [`Wal::sync`]).
    ///
    /// # Errors
    /// [`LogError::Io`].
    pub fn write_pending(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.write_blocks(0)
    }

    /// Writes every pending record and makes everything written durable
    /// with one fdatasync.
    ///
    /// # Errors
    /// [`LogError::Io`]; after a failed sync the server must stop (the
    /// kernel may have dropped the dirty pages).
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.write_pending()?;
        if !self.unsynced {
            return Ok(());
        }
        self.segment.sync_data().map_err(self.segment_io())?;
        self.unsynced = false;
        self.synced = self.offset;
        Ok(())
    }

    /// Records in the current generation's log.
    pub fn records_since_snapshot(&self) -> u64 {
        self.records
    }

    /// Bytes in the current generation's log.
    pub fn bytes_since_snapshot(&self) -> u64 {
        self.offset + self.pending.len() as u64
    }

    /// Starts a new generation from `snapshot`, which must be the state after
    /// every record appended so far (and the data files must be durable up to
    /// it), and writes it; the older generations' files are removed.
    ///
    /// # Errors
    /// [`LogError::Io`].
    pub fn write_snapshot(&mut self, snapshot: Snapshot) -> Result<(), LogError> {
        let write = self.begin_snapshot(snapshot)?;
        let premade = write.run()?;
        self.adopt(premade);
        Ok(())
    }

    /// Starts a new generation whose state at its start is `snapshot` (the
    /// state after every record appended so far; the data files must be
    /// durable up to it): makes the current segment durable and moves the
    /// log to the next generation's segment — the one zero-filled ahead of
    /// time if there is one, so this costs one fdatasync at most. The
    /// snapshot itself is written by the returned [`SnapshotWrite`], here or
    /// on another thread; records appended meanwhile go to the new segment.
    ///
    /// # Errors
    /// [`LogError::Io`].
    pub fn begin_snapshot(&mut self, snapshot: Snapshot) -> Result<SnapshotWrite, LogError> {
        self.sync()?;
        let next = self.generation + 1;
        match self.premade.take() {
            Some(premade) if premade.generation == next => {
                self.segment = premade.segment;
                self.allocated = premade.allocated;
                self.generation = next;
            }
            _ => {
                let made = new_segment(self.dir.as_ref(), next, self.prealloc)
                    .map_err(self.io(&log_name(next)))?;
                self.segment = made.segment;
                self.allocated = made.allocated;
                self.generation = next;
            }
        }
        self.offset = 0;
        self.synced = 0;
        self.tail.clear();
        self.records = 0;
        Ok(SnapshotWrite {
            dir: self.dir.clone(),
            generation: next,
            snapshot,
            prealloc: self.prealloc,
        })
    }

    /// The zero-fill of the next generation's segment, to run on another
    /// thread, when there is none yet (a new directory, or the last
    /// snapshot's zero-fill failed) and the log preallocates: hand its
    /// result to [`Wal::adopt`], and the next snapshot starts at no cost
    /// instead of zero-filling in line. `None` when there is nothing to do.
    ///
    /// Run it before the next [`Wal::begin_snapshot`] (the server's
    /// persister takes no snapshot while it runs): once the log has moved
    /// into that generation the file holds records, and `run` then leaves
    /// it alone.
    pub fn segment_ahead(&self) -> Option<SegmentAhead> {
        if self.prealloc == 0 || self.premade.is_some() {
            return None;
        }
        Some(SegmentAhead {
            dir: self.dir.clone(),
            generation: self.generation + 1,
            prealloc: self.prealloc,
        })
    }

    /// Keeps a segment zero-filled by [`SnapshotWrite::run`] or
    /// [`SegmentAhead::run`] for the next generation (ignored if the log has
    /// moved past it).
    pub fn adopt(&mut self, premade: Option<Premade>) {
        self.premade = premade.filter(|p| p.generation == self.generation + 1);
    }
}

/// The next generation's segment, to be zero-filled ahead of time
/// ([`Wal::segment_ahead`]). Until the log moves to that generation,
/// recovery keeps the file (all zeros, or cut short by a crash: it grows
/// as it is used), or removes it if a crash left it empty.
pub struct SegmentAhead {
    dir: Arc<dyn Dir>,
    generation: u64,
    prealloc: u64,
}

impl SegmentAhead {
    /// Zero-fills the segment and makes it durable. A failure is only
    /// logged (`None`): the next snapshot makes its segment in line. A file
    /// of that name with anything in it is left alone (`None`): it can only
    /// be a segment the log already writes to, which a zero-fill would wipe.
    pub fn run(self) -> Option<Premade> {
        let dir = self.dir.as_ref();
        let name = log_name(self.generation);
        if let Ok(file) = dir.open(&name, false) {
            if file.size().map_or(true, |n| n > 0) {
                let file = dir.describe(&name);
                tracing::error!(%file, "not zero-filling a log segment that already holds data");
                return None;
            }
        }
        match new_segment(dir, self.generation, self.prealloc) {
            Ok(premade) => Some(premade),
            Err(error) => {
                let file = dir.describe(&log_name(self.generation));
                tracing::warn!(%file, %error, "could not zero-fill the next log segment ahead");
                None
            }
        }
    }
}

impl SnapshotWrite {
    /// The generation this snapshot starts.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes `snap-G` (to `snap-G.tmp`, synced, renamed, directory synced),
    /// then removes every older generation's files, then zero-fills
    /// `log-(G+1)` for the next snapshot to start at no cost (a failure of
    /// that last step is only logged: the snapshot is in place).
    ///
    /// # Errors
    /// [`LogError::Io`]; nothing is removed unless the snapshot is durable.
    pub fn run(self) -> Result<Option<Premade>, LogError> {
        let dir = self.dir.as_ref();
        write_snapshot_file(dir, self.generation, &self.snapshot)?;
        drop(self.snapshot);
        let names = dir.list().map_err(io_err(dir, "."))?;
        let older = |name: &str| {
            generation_of(name, "snap-")
                .or_else(|| generation_of(name, "log-"))
                .is_some_and(|g| g < self.generation)
        };
        for name in names.iter().filter(|n| older(n)) {
            match dir.remove(name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(dir, name)(e)),
            }
        }
        dir.sync().map_err(io_err(dir, "."))?;
        if self.prealloc == 0 {
            return Ok(None);
        }
        // Only a speed-up from here on: a failure leaves the next snapshot
        // to make its segment in line (and recovery keeps a partial one).
        let ahead = SegmentAhead {
            dir: self.dir.clone(),
            generation: self.generation + 1,
            prealloc: self.prealloc,
        };
        Ok(ahead.run())
    }
}

/// Creates (or empties) `log-G`, zero-fills `prealloc` bytes past its first
/// block and makes that and its directory entry durable.
fn new_segment(dir: &dyn Dir, generation: u64, prealloc: u64) -> io::Result<Premade> {
    let mut segment = dir.open_direct(&log_name(generation), true)?;
    segment.set_len(0)?;
    let allocated = if prealloc == 0 { 0 } else { BLOCK + prealloc };
    if allocated > 0 {
        zero_fill(segment.as_mut(), 0, allocated)?;
    }
    dir.sync()?;
    Ok(Premade {
        generation,
        segment,
        allocated,
    })
}

/// Writes zeros over `[from, to)` of `file` and makes them durable.
fn zero_fill(file: &mut dyn DirFile, from: u64, to: u64) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64);
        file.write_at(at, &zeros[..n as usize])?;
        at += n;
    }
    file.sync_data()
}

/// Writes `snap-G` durably: to a temporary name, synced, renamed, and the
/// directory synced.
fn write_snapshot_file(
    dir: &dyn Dir,
    generation: u64,
    snapshot: &Snapshot,
) -> Result<(), LogError> {
    let payload = postcard::to_allocvec(snapshot).unwrap_or_default();
    // A frame's length is 32 bits: refuse (a storage failure, with every
    // older generation still in place) rather than write one that cannot
    // be read back.
    if payload.is_empty() || u32::try_from(payload.len()).is_err() {
        return Err(LogError::Io {
            file: dir.describe(&snap_name(generation)),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a snapshot of {} bytes does not fit a frame", payload.len()),
            ),
        });
    }
    let mut bytes = Vec::with_capacity(payload.len() + frame::HEADER);
    frame::encode(&payload, 0, &mut bytes);
    let tmp = format!("{}.tmp", snap_name(generation));
    let mut file = dir.open(&tmp, true).map_err(io_err(dir, &tmp))?;
    file.set_len(0).map_err(io_err(dir, &tmp))?;
    file.write_at(0, &bytes).map_err(io_err(dir, &tmp))?;
    file.sync_data().map_err(io_err(dir, &tmp))?;
    dir.rename(&tmp, &snap_name(generation))
        .map_err(io_err(dir, &tmp))?;
    dir.sync().map_err(io_err(dir, "."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::records::{AnswerSnapshot, Change};
    use crate::core::types::{Fence, Reply, RequestKind};
    use crate::storage::FsDir;

    fn record(n: u64) -> Record {
        Record {
            changes: vec![Change::Ended {
                lock: format!("l{n}").into(),
                fence: Fence(n),
            }],
        }
    }

    fn open(path: &std::path::Path) -> Result<Recovered, LogError> {
        Wal::recover(Box::new(FsDir::open(path).unwrap()), Snapshot::default)
    }

    /// A name no dlm would write (a generation past 2^63) is not taken for
    /// one: `generation + 1` must never overflow on what a disk holds.
    #[test]
    fn a_file_named_for_the_last_generation_is_none_of_the_logs() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.append(&record(1));
        r.wal.sync().unwrap();
        drop(r);
        for name in ["snap-18446744073709551615", "log-18446744073709551615"] {
            std::fs::write(tmp.path().join(name), b"not dlm's").unwrap();
        }
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.records, [record(1)]);
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        assert_eq!(
            generation_of("snap-09223372036854775807", "snap-"),
            Some(i64::MAX as u64)
        );
        assert_eq!(generation_of("snap-09223372036854775808", "snap-"), None);
    }

    /// A record longer than the split size (4 KiB here) is
    /// logged as several, with its changes in order, cut only before an
    /// `Ended` (a call's change and its answer stay together); a short one
    /// stays whole.
    #[test]
    fn a_long_record_is_logged_as_runs_of_its_changes() {
        use crate::core::records::AnswerSnapshot;
        use crate::core::types::{Reply, RequestKind};
        const SPLIT_RECORD_BYTES: usize = 4 << 10;
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.set_split_bytes(SPLIT_RECORD_BYTES);
        let ended = |n: u64| Change::Ended {
            lock: format!("{n:0>200}").into(),
            fence: Fence(n),
        };
        let answered = |n: u64| {
            Change::Answered(Arc::new(AnswerSnapshot {
                client: 1,
                request_id: format!("{n:0>100}").into(),
                kind: RequestKind::Append,
                reply: Reply::Done,
            }))
        };
        let staged = |len: usize| Change::Staged {
            fence: Fence(7),
            file: crate::core::staging::FileIndex::parse("file_1").unwrap(),
            content: bytes::Bytes::from(vec![1; len]),
        };
        // Expiries (an `Ended` each, some with the next holder's grant and
        // answer), then a call's append and its answer.
        let mut long = Record::default();
        for n in 0..60 {
            long.changes.push(ended(n));
            if n % 3 == 0 {
                long.changes.push(Change::Granted {
                    lock: format!("{n:0>200}").into(),
                    client: 2,
                    token: "t".repeat(40).into(),
                    fence: Fence(1000 + n),
                    lease: crate::core::time::Millis(30_000),
                });
                long.changes.push(answered(n));
            }
        }
        long.changes.push(staged(3000));
        long.changes.push(answered(99));
        // A change longer than a run may be: alone but for its answer.
        let alone = Record {
            changes: vec![ended(1), staged(SPLIT_RECORD_BYTES * 2), answered(2)],
        };
        r.wal.append(&record(1));
        r.wal.append(&long);
        r.wal.append(&alone);
        r.wal.sync().unwrap();
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records[0], record(1));
        let changes: Vec<Change> = r.records[1..]
            .iter()
            .flat_map(|record| record.changes.clone())
            .collect();
        let mut expected = long.changes.clone();
        expected.extend(alone.changes.clone());
        assert_eq!(changes, expected);
        assert!(r.records.len() > 1 + 3 + 2, "{} records", r.records.len());
        for (i, record) in r.records[1..].iter().enumerate() {
            // Every run after the first of a record starts at an `Ended`.
            assert!(
                matches!(record.changes[0], Change::Ended { .. }),
                "record {i} starts with {:?}",
                record.changes[0]
            );
            let len = postcard::to_allocvec(record).unwrap().len();
            let big_staged = record
                .changes
                .iter()
                .any(|c| matches!(c, Change::Staged { content, .. } if content.len() > 4000));
            assert!(
                len <= SPLIT_RECORD_BYTES + 8 || big_staged,
                "{len} bytes in {} changes",
                record.changes.len()
            );
        }
        // The call's append and its answer are in one record.
        let last_of_long = r.records.iter().rev().nth(1).unwrap();
        let tail = &last_of_long.changes[last_of_long.changes.len() - 2..];
        assert_eq!(tail, &[staged(3000), answered(99)]);
    }

    #[test]
    fn records_survive_reopen_and_snapshots_replace_them() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        for n in 0..5 {
            r.wal.append(&record(n));
        }
        r.wal.sync().unwrap();
        drop(r);
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.records, (0..5).map(record).collect::<Vec<_>>());
        let snap = Snapshot {
            last_fence: Fence(9),
            ..Snapshot::default()
        };
        r.wal.write_snapshot(snap).unwrap();
        r.wal.append(&record(7));
        r.wal.sync().unwrap();
        let files = || {
            let mut files = FsDir::open(tmp.path()).unwrap().list().unwrap();
            files.sort();
            files
        };
        assert_eq!(
            files(),
            [
                FORMAT_FILE.to_owned(),
                log_name(1),
                log_name(2),
                snap_name(1)
            ],
            "old generation removed, the next one's segment zero-filled ahead"
        );
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.snapshot.last_fence, Fence(9));
        assert_eq!(r.records, vec![record(7)]);
        assert_eq!(
            files(),
            [
                FORMAT_FILE.to_owned(),
                log_name(1),
                log_name(2),
                snap_name(1)
            ],
            "recovery keeps the segment zero-filled ahead for the next snapshot"
        );
        assert!(
            r.wal.premade.as_ref().is_some_and(|p| p.generation == 2),
            "the next snapshot will start in it without zero-filling"
        );
        let mut r = r;
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(8));
        r.wal.sync().unwrap();
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(8)]);
    }

    #[test]
    fn a_new_directory_gets_its_next_segment_ahead_and_a_crash_after_it_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        assert!(
            r.wal.premade.is_none(),
            "a new directory has no segment ahead"
        );
        let ahead = r.wal.segment_ahead().expect("one to make");
        r.wal.append(&record(1));
        r.wal.sync().unwrap();
        // Zero-filled (on another thread in the server) while records go on.
        let premade = ahead.run();
        r.wal.append(&record(2));
        r.wal.sync().unwrap();
        r.wal.adopt(premade);
        assert!(r.wal.premade.as_ref().is_some_and(|p| p.generation == 1));
        assert!(r.wal.segment_ahead().is_none(), "nothing more to make");
        // A crash here: the log and the kept segment ahead read back.
        drop(r);
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(1), record(2)]);
        assert!(r.wal.premade.as_ref().is_some_and(|p| p.generation == 1));
        // The first snapshot moves into it; its records survive a restart.
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(3));
        r.wal.sync().unwrap();
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(3)]);
    }

    #[test]
    fn a_segment_ahead_run_too_late_leaves_the_live_segment_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        let late = r.wal.segment_ahead().expect("one to make");
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(5));
        r.wal.sync().unwrap();
        assert!(late.run().is_none(), "log-1 is the live segment now");
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(5)]);
    }

    #[test]
    fn a_segment_ahead_whose_zero_fill_a_crash_cut_short_is_kept_and_grows() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(1));
        r.wal.sync().unwrap();
        drop(r);
        // The crash hit the zero-filling of log-2 after its first block.
        let ahead = tmp.path().join(log_name(2));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&ahead)
            .unwrap();
        file.set_len(BLOCK).unwrap();
        drop(file);
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(1)]);
        assert!(r
            .wal
            .premade
            .as_ref()
            .is_some_and(|p| p.generation == 2 && p.allocated == BLOCK));
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        let many: Vec<Record> = (10..400).map(record).collect();
        for record in &many {
            r.wal.append(record);
        }
        r.wal.sync().unwrap();
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(
            r.records, many,
            "written past the kept block, all read back"
        );
    }

    /// A torn tail with a stray byte far after it (damage, or a crafted
    /// file) is zeroed up to that byte in bounded writes, not with one
    /// buffer as long as the distance.
    #[test]
    fn torn_bytes_reaching_far_are_zeroed_in_bounded_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(1));
        // Long enough to hold whole 64-byte units.
        let long = Record {
            changes: vec![Change::Ended {
                lock: "x".repeat(300).into(),
                fence: Fence(2),
            }],
        };
        r.wal.append(&long);
        r.wal.sync().unwrap();
        drop(r);
        let path = tmp.path().join(log_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        let mut one = Vec::new();
        frame::encode(&postcard::to_allocvec(&record(1)).unwrap(), 0, &mut one);
        // A unit of the second record reads as never written: a torn write.
        let unit = (one.len() + 64).div_ceil(64) * 64;
        bytes[unit..unit + 64].fill(0);
        let far = (16 << 20) + 12_345;
        bytes.resize(far + 1, 0);
        bytes[far] = 7;
        std::fs::write(&path, &bytes).unwrap();
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(1)]);
        assert!(r.torn_bytes as usize > far - one.len());
        assert!(
            r.wal.scratch.capacity() <= 1 << 20,
            "a buffer of {} bytes",
            r.wal.scratch.capacity()
        );
        drop(r);
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[one.len()..].iter().all(|b| *b == 0), "all zeroed");
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(1)]);
        r.wal.append(&record(3));
        r.wal.sync().unwrap();
        drop(r);
        assert_eq!(
            open(tmp.path()).unwrap().records,
            vec![record(1), record(3)]
        );
    }

    #[test]
    fn a_torn_tail_followed_only_by_a_segment_zero_filled_ahead_is_cut() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(1));
        r.wal.append(&record(2));
        r.wal.sync().unwrap();
        drop(r);
        // Tear the second record of log-1 while log-2 (zero-filled ahead)
        // exists: the crash hit log-1's last write.
        let path = tmp.path().join(log_name(1));
        let mut bytes = std::fs::read(&path).unwrap();
        let mut one = Vec::new();
        frame::encode(&postcard::to_allocvec(&record(1)).unwrap(), 0, &mut one);
        bytes[one.len() + frame::HEADER] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let premade = tmp.path().join(log_name(2));
        std::fs::write(&premade, vec![0u8; 8192]).unwrap();
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(1)]);
        assert!(r.torn_bytes > 0);
        assert!(
            premade.exists(),
            "the unused segment is kept for the next snapshot"
        );
        r.wal.append(&record(3));
        r.wal.sync().unwrap();
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(1), record(3)]);

        // The same tear with data after it in a later segment is damage.
        let mut r = r;
        r.wal.write_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(4));
        r.wal.sync().unwrap();
        r.wal.begin_snapshot(Snapshot::default()).unwrap();
        r.wal.append(&record(5));
        r.wal.sync().unwrap();
        drop(r);
        let path = tmp.path().join(log_name(2));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[frame::HEADER] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let error = open(tmp.path()).err().expect("damage before the end");
        assert!(
            error.to_string().contains(&log_name(2)) && error.to_string().contains("incomplete"),
            "names the damaged segment: {error}"
        );
    }

    #[test]
    fn records_logged_while_a_snapshot_is_written_survive_a_crash_at_any_step() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.append(&record(1));
        r.wal.sync().unwrap();
        let snap = |fence| Snapshot {
            last_fence: Fence(fence),
            ..Snapshot::default()
        };
        // Generation 1 begun, its snapshot not written: a crash now
        // replays snapshot 0 and both logs.
        let write = r.wal.begin_snapshot(snap(1)).unwrap();
        assert_eq!(write.generation(), 1);
        r.wal.append(&record(2));
        r.wal.sync().unwrap();
        drop(write);
        drop(r);
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.snapshot.last_fence, Fence(0));
        assert_eq!(r.records, vec![record(1), record(2)]);

        // Recovery went on in generation 1's log; the next snapshot (2)
        // covers both logs and removes them once it is durable.
        let write = r.wal.begin_snapshot(snap(2)).unwrap();
        r.wal.append(&record(3));
        r.wal.sync().unwrap();
        let premade = write.run().unwrap();
        r.wal.adopt(premade);
        r.wal.append(&record(4));
        r.wal.sync().unwrap();
        // Generation 3 starts in the segment zero-filled ahead.
        let write = r.wal.begin_snapshot(snap(3)).unwrap();
        r.wal.append(&record(5));
        r.wal.sync().unwrap();
        drop(write);
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.snapshot.last_fence, Fence(2));
        assert_eq!(r.records, vec![record(3), record(4), record(5)]);
        let mut files = FsDir::open(tmp.path()).unwrap().list().unwrap();
        files.sort();
        assert_eq!(
            files,
            [
                FORMAT_FILE.to_owned(),
                log_name(2),
                log_name(3),
                snap_name(2)
            ]
        );
    }

    #[test]
    fn without_preallocation_the_log_grows_in_blocks_and_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = || Box::new(FsDir::open(tmp.path()).unwrap());
        let mut r = Wal::recover_with(dir(), 0, Snapshot::default).unwrap();
        for n in 0..300 {
            r.wal.append(&record(n));
            if n % 7 == 0 {
                r.wal.sync().unwrap();
            }
        }
        r.wal.sync().unwrap();
        let len = std::fs::metadata(tmp.path().join(log_name(0)))
            .unwrap()
            .len();
        assert_eq!(len % BLOCK, 0, "whole blocks");
        drop(r);
        let r = Wal::recover_with(dir(), 0, Snapshot::default).unwrap();
        assert_eq!(r.records, (0..300).map(record).collect::<Vec<_>>());
    }

    #[test]
    fn torn_tail_is_cut_and_middle_damage_is_refused_with_file_and_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        for n in 0..3 {
            r.wal.append(&record(n));
        }
        r.wal.sync().unwrap();
        drop(r);
        let log = tmp.path().join(log_name(0));
        let mut bytes = std::fs::read(&log).unwrap();
        assert_eq!(bytes.len() as u64, BLOCK + DEFAULT_PREALLOC, "preallocated");
        // A crash that wrote only part of the last record: the rest is zeros.
        let end = frame::scan(&bytes).valid_len as usize;
        bytes[end - 3..end].fill(0);
        std::fs::write(&log, &bytes).unwrap();
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.torn_bytes, end as u64 - 3 - r.wal.offset);
        // The torn bytes are zeroed; new records follow the good ones.
        r.wal.append(&record(9));
        r.wal.sync().unwrap();
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(0), record(1), record(9)]);
        assert_eq!(r.torn_bytes, 0);
        drop(r);
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[frame::HEADER + 2] ^= 0x55;
        std::fs::write(&log, &bytes).unwrap();
        let err = open(tmp.path()).err().expect("must refuse");
        let text = err.to_string();
        assert!(
            text.contains("log-00000000000000000000") && text.contains("offset 0"),
            "{text}"
        );
    }

    #[test]
    fn a_state_directory_of_another_format_is_refused_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.append(&record(0));
        r.wal.sync().unwrap();
        drop(r);
        assert_eq!(std::fs::read(tmp.path().join("format")).unwrap(), FORMAT);
        let log = std::fs::read(tmp.path().join(log_name(0))).unwrap();
        // What a dlm before the format file left: no `format`.
        std::fs::remove_file(tmp.path().join("format")).unwrap();
        let text = open(tmp.path()).err().expect("refused").to_string();
        assert!(
            text.contains("format") && text.contains("older dlm"),
            "{text}"
        );
        std::fs::write(tmp.path().join("format"), b"dlm log format 3\n").unwrap();
        let text = open(tmp.path()).err().expect("refused").to_string();
        assert!(text.contains("\"dlm log format 3\""), "{text}");
        assert_eq!(std::fs::read(tmp.path().join(log_name(0))).unwrap(), log);
        std::fs::write(tmp.path().join("format"), FORMAT).unwrap();
        assert_eq!(open(tmp.path()).unwrap().records, vec![record(0)]);
    }

    /// A power loss on a device that writes sectors in any order (a
    /// volatile cache, no FUA) can keep the end of the unsynced write and
    /// lose its start. That write was never acknowledged: it is cut like a
    /// tail torn short, not refused as damage, and the log goes on.
    #[test]
    fn an_unsynced_write_whose_later_sectors_alone_reached_the_disk_is_cut() {
        let long = |n: u64| Record {
            changes: vec![Change::Ended {
                lock: format!("{n}-{}", "x".repeat(300)).into(),
                fence: Fence(n),
            }],
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.append(&record(0));
        r.wal.append(&record(1));
        r.wal.sync().unwrap();
        let durable = r.wal.offset as usize;
        for n in 2..8 {
            r.wal.append(&long(n));
        }
        r.wal.write_pending().unwrap();
        drop(r);
        let log = tmp.path().join(log_name(0));
        let written = std::fs::read(&log).unwrap();
        let end = frame::scan(&written).valid_len as usize;
        assert!(end > durable + 1500, "the write spans several sectors");
        // Every way of losing the write's first sectors and keeping the
        // rest (512-byte sectors, the first one holding the durable data's
        // end too, whose bytes the write rewrote unchanged).
        let first_sector = durable / 512 * 512;
        for lost_to in (first_sector + 512..end).step_by(512) {
            let mut bytes = written.clone();
            bytes[durable..lost_to].fill(0);
            std::fs::write(&log, &bytes).unwrap();
            let r = open(tmp.path()).unwrap_or_else(|e| panic!("lost to {lost_to}: {e}"));
            assert_eq!(r.records, vec![record(0), record(1)], "lost to {lost_to}");
            assert!(r.torn_bytes > 0);
        }
        // The cut bytes were zeroed: the log goes on from the durable end.
        let mut r = open(tmp.path()).unwrap();
        assert_eq!(r.torn_bytes, 0);
        r.wal.append(&record(9));
        r.wal.sync().unwrap();
        drop(r);
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, vec![record(0), record(1), record(9)]);

        // Had that write been synced before the next one, the same loss
        // would be damage: refused, naming where.
        drop(r);
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.append(&record(0));
        r.wal.sync().unwrap();
        let first = r.wal.offset as usize;
        r.wal.append(&long(1));
        r.wal.sync().unwrap();
        r.wal.append(&long(2));
        r.wal.sync().unwrap();
        drop(r);
        let log = tmp.path().join(log_name(0));
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[first..first + 16].fill(0);
        std::fs::write(&log, &bytes).unwrap();
        let text = open(tmp.path()).err().expect("refused").to_string();
        assert!(
            text.contains(&format!("offset {first}")) && text.contains("logged after"),
            "{text}"
        );
    }

    /// The records `recover_each` handed on, and how many it counted (or
    /// why it refused).
    ///
    /// `start` is told how many answers the records hold: checked here
    /// against the records handed on, whenever all of them were.
    fn streamed(path: &std::path::Path) -> (Vec<Record>, Result<u64, LogError>) {
        let mut seen = Vec::new();
        let mut counted = None;
        let result = Wal::recover_each(
            Box::new(FsDir::open(path).unwrap()),
            0,
            Snapshot::default,
            |_snapshot, counts| {
                counted = Some(counts.answers);
                Ok(())
            },
            |(), record| {
                seen.push(record);
                Ok::<_, LogError>(())
            },
        )
        .map(|r| r.wal.records_since_snapshot());
        if result.is_ok() {
            let answers = seen
                .iter()
                .flat_map(|r| &r.changes)
                .filter(|c| matches!(c, Change::Answered(_)))
                .count() as u64;
            assert_eq!(counted, Some(answers));
        }
        (seen, result)
    }

    #[test]
    fn records_are_handed_on_in_order_and_none_of_a_damaged_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Wal::recover_with(
            Box::new(FsDir::open(tmp.path()).unwrap()),
            0,
            Snapshot::default,
        )
        .unwrap();
        // Each record its own write: damage in one is not a write a crash
        // tore, as the later ones were logged after it was durable.
        for n in 0..4 {
            r.wal.append(&record(n));
            r.wal.sync().unwrap();
        }
        drop(r);
        let (seen, count) = streamed(tmp.path());
        assert_eq!(seen, (0..4).map(record).collect::<Vec<_>>());
        assert_eq!(count.unwrap(), 4);

        // Damage in the second of four records: not a torn tail (whole
        // records logged after it follow it), so the segment is refused before any of its
        // records, the first one included, is handed on.
        let log = tmp.path().join(log_name(0));
        let mut bytes = std::fs::read(&log).unwrap();
        let frames: Vec<u64> = frame::scan(&bytes).frames.iter().map(|f| f.0).collect();
        bytes[frames[1] as usize + frame::HEADER] ^= 0x55;
        std::fs::write(&log, &bytes).unwrap();
        let (seen, count) = streamed(tmp.path());
        let text = count
            .expect_err("damage in the middle is refused")
            .to_string();
        assert!(
            text.contains(&format!("offset {}", frames[1])) && text.contains("checksum"),
            "{text}"
        );
        assert!(seen.is_empty(), "nothing of the damaged segment: {seen:?}");
    }

    #[test]
    fn a_first_start_cut_short_leaves_a_zeroed_log_that_the_next_start_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        // What a crash can leave of a first start: the first segment, made
        // and zero-filled, with the snapshot's rename never made durable.
        std::fs::write(tmp.path().join(log_name(0)), vec![0u8; 3 * BLOCK as usize]).unwrap();
        std::fs::write(tmp.path().join("snap-00000000000000000000.tmp"), b"half").unwrap();
        let mut r = open(tmp.path()).unwrap();
        assert!(r.records.is_empty());
        r.wal.append(&record(1));
        r.wal.sync().unwrap();
        drop(r);
        assert_eq!(open(tmp.path()).unwrap().records, vec![record(1)]);

        // A zeroed log of a later generation without a snapshot means the
        // snapshots were lost: refused, not a fresh start.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(log_name(3)), vec![0u8; BLOCK as usize]).unwrap();
        let text = open(tmp.path()).err().expect("refused").to_string();
        assert!(text.contains("a log without its snapshot"), "{text}");

        // A log with data and no snapshot at all is damage, not a leftover.
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        frame::encode(b"x", 0, &mut bytes);
        std::fs::write(tmp.path().join(log_name(0)), &bytes).unwrap();
        let text = open(tmp.path()).err().expect("refused").to_string();
        assert!(text.contains("a log without its snapshot"), "{text}");
        assert_eq!(std::fs::read(tmp.path().join(log_name(0))).unwrap(), bytes);
    }

    #[test]
    fn damage_in_a_later_segment_stops_recovery_before_any_record_is_handed_on() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        r.wal.append(&record(0));
        r.wal.sync().unwrap();
        // A snapshot begun but never written (a crash before its rename):
        // recovery replays log-0 and then log-1.
        let write = r.wal.begin_snapshot(Snapshot::default()).unwrap();
        drop(write);
        for n in 1..4 {
            r.wal.append(&record(n));
            r.wal.sync().unwrap();
        }
        drop(r);
        let (seen, count) = streamed(tmp.path());
        assert_eq!(seen, (0..4).map(record).collect::<Vec<_>>());
        assert_eq!(count.unwrap(), 4);

        let log = tmp.path().join(log_name(1));
        let mut bytes = std::fs::read(&log).unwrap();
        let first = frame::scan(&bytes).frames[0].0 as usize;
        bytes[first + frame::HEADER] ^= 0x55;
        std::fs::write(&log, &bytes).unwrap();
        let (seen, count) = streamed(tmp.path());
        let text = count
            .expect_err("damage in the middle is refused")
            .to_string();
        assert!(text.contains("log-00000000000000000001"), "{text}");
        assert!(seen.is_empty(), "not even log-0's record: {seen:?}");
    }

    /// Zeroes the last 3 bytes of `log-0`'s last record, as a crash that
    /// wrote only part of it leaves it; returns the segment's path.
    fn tear_last_record(dir: &std::path::Path) -> std::path::PathBuf {
        let log = dir.join(log_name(0));
        let mut bytes = std::fs::read(&log).unwrap();
        let end = frame::scan(&bytes).valid_len as usize;
        bytes[end - 3..end].fill(0);
        std::fs::write(&log, &bytes).unwrap();
        log
    }

    /// `start` is told how many answers the records to be handed on hold:
    /// those of a torn tail, cut off, are not counted.
    #[test]
    fn the_answers_counted_are_those_of_the_records_handed_on() {
        let answered = |n: u64, answers: u64| Record {
            changes: std::iter::once(Change::Ended {
                lock: format!("l{n}").into(),
                fence: Fence(n),
            })
            .chain((0..answers).map(|i| {
                Change::Answered(Arc::new(AnswerSnapshot {
                    client: 1,
                    request_id: format!("r{n}.{i}").into(),
                    kind: RequestKind::Release,
                    reply: Reply::Done,
                }))
            }))
            .collect(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let mut r = Wal::recover_with(
            Box::new(FsDir::open(tmp.path()).unwrap()),
            0,
            Snapshot::default,
        )
        .unwrap();
        let logged = [answered(0, 2), answered(1, 0), answered(2, 3)];
        for record in &logged {
            r.wal.append(record);
        }
        r.wal.sync().unwrap();
        r.wal.append(&answered(3, 4));
        r.wal.sync().unwrap();
        drop(r);
        tear_last_record(tmp.path());
        // (`streamed` checks the count against the records handed on: 5.)
        let (seen, count) = streamed(tmp.path());
        assert_eq!(seen, logged);
        assert_eq!(count.unwrap(), 3);
    }

    #[test]
    fn a_torn_tail_before_a_segment_with_data_stops_recovery_before_any_record_is_handed_on() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        for n in 0..3 {
            r.wal.append(&record(n));
        }
        r.wal.sync().unwrap();
        let write = r.wal.begin_snapshot(Snapshot::default()).unwrap();
        drop(write);
        r.wal.append(&record(3));
        r.wal.sync().unwrap();
        drop(r);
        // log-0's last record cut short, with log-1's data after it.
        tear_last_record(tmp.path());
        let (seen, count) = streamed(tmp.path());
        let text = count.expect_err("refused").to_string();
        assert!(text.contains("incomplete record before the end"), "{text}");
        assert!(seen.is_empty(), "not even log-0's whole records: {seen:?}");
    }

    #[test]
    fn a_visitor_error_stops_recovery_before_the_log_is_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut r = open(tmp.path()).unwrap();
        for n in 0..3 {
            r.wal.append(&record(n));
        }
        r.wal.sync().unwrap();
        drop(r);
        // A torn tail, which a recovery that got to the end would zero.
        let log = tear_last_record(tmp.path());
        let before = std::fs::read(&log).unwrap();
        let mut handed = 0;
        let result = Wal::recover_each(
            Box::new(FsDir::open(tmp.path()).unwrap()),
            DEFAULT_PREALLOC,
            Snapshot::default,
            |_snapshot, _| Ok(()),
            |(), _record| {
                handed += 1;
                if handed == 2 {
                    return Err(LogError::Corrupt {
                        file: "visitor".to_owned(),
                        offset: 0,
                        reason: "refused".to_owned(),
                    });
                }
                Ok(())
            },
        );
        assert!(result.is_err());
        assert_eq!(handed, 2, "stops at the first error");
        assert_eq!(
            std::fs::read(&log).unwrap(),
            before,
            "the torn tail is left as it was"
        );
        let r = open(tmp.path()).unwrap();
        assert_eq!(r.records, (0..2).map(record).collect::<Vec<_>>());
        assert!(r.torn_bytes > 0, "cut by the recovery that got to the end");
        drop(r);
        assert_ne!(std::fs::read(&log).unwrap(), before);
    }
}
