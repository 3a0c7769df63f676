//! The persistence side of the server: group commit, then file writes, then replies.
//!
//! Owns: the log and the data files while the server runs. It takes jobs in
//! the order the core produced them, writes every record that is waiting,
//! makes them durable with one fdatasync (group commit: all requests that
//! arrived during the previous sync share the next one), applies the file
//! writes they committed, and only then releases the replies. Reads and
//! snapshots are ordered with the writes: a snapshot moves the log to a new
//! generation in line, and its file is written on a thread of its own (one
//! at a time; a snapshot due while the last is still being written is
//! skipped, the log just grows until the next). Must not: decide anything;
//! it carries out the core's outputs in order.

use std::io;

use tokio::sync::oneshot;

use crate::core::records::{Record, Snapshot};
use crate::core::staging::{FileIndex, FileWrite};
use crate::core::types::Reply;
use crate::files::DataFiles;
use crate::log::{LogError, Premade, Wal};

/// The outputs of one core step, to be carried out in order.
#[derive(Default)]
pub struct Batch {
    pub records: Vec<Record>,
    pub writes: Vec<FileWrite>,
    pub replies: Vec<(oneshot::Sender<Reply>, Reply)>,
}

impl Batch {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.writes.is_empty() && self.replies.is_empty()
    }
}

/// Work for the writer.
pub enum Job {
    /// Persist, write, reply.
    Batch(Batch),
    /// Replace the log by this snapshot (the state after every earlier job).
    Snapshot(Box<Snapshot>),
    /// Say how long a data file is after every earlier write: the caller
    /// reads that much itself, outside the writer ([`crate::files::read_prefix`]),
    /// so that a large read does not hold up the group commits behind it.
    Read {
        file: FileIndex,
        reply: oneshot::Sender<io::Result<u64>>,
    },
}

/// A storage failure: the server must stop (fail-stop), since after a failed
/// fsync the kernel may have dropped the data.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("data file: {0}")]
    Data(#[from] io::Error),
}

/// A snapshot being written on its own thread (or, at start, the next
/// generation's segment being zero-filled): its result is that zero-filled
/// segment. Dropped unjoined (a persister dropped
/// without [`Persister::finish`], or after a storage failure), it still
/// waits for the thread, so that nothing writes to the directory after the
/// persister is gone.
struct SnapshotThread(Option<std::thread::JoinHandle<Result<Option<Premade>, LogError>>>);

impl SnapshotThread {
    fn is_finished(&self) -> bool {
        self.0.as_ref().is_none_or(|t| t.is_finished())
    }

    /// The thread's result (`None`: already taken).
    fn join(mut self) -> Option<std::thread::Result<Result<Option<Premade>, LogError>>> {
        self.0.take().map(|t| t.join())
    }
}

impl Drop for SnapshotThread {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

/// The log and the data files, used by one writer.
pub struct Persister {
    wal: Wal,
    files: DataFiles,
    /// Fsyncs done (each served a whole group).
    pub syncs: u64,
    /// Write snapshots on a thread of their own (production) rather than
    /// in line (the deterministic simulation).
    background: bool,
    /// The snapshot being written in the background, if any (or, at
    /// start, the next segment being zero-filled ahead).
    snapshot: Option<SnapshotThread>,
}

impl Persister {
    /// A persister over a recovered log and opened data files; snapshots
    /// are written in line until [`Persister::write_snapshots_in_background`].
    pub fn new(wal: Wal, files: DataFiles) -> Persister {
        Persister {
            wal,
            files,
            syncs: 0,
            background: false,
            snapshot: None,
        }
    }

    /// The data directory, for reads outside the writer.
    pub fn data_dir(&self) -> std::sync::Arc<dyn crate::storage::Dir> {
        self.files.dir()
    }

    /// Writes snapshots on a thread of their own: the group commits that
    /// follow a snapshot do not wait for it (only the switch to the new log
    /// segment is in line, one fdatasync).
    ///
    /// A log without a segment zero-filled ahead for the next generation
    /// (a new directory) gets one now, on the same kind of thread: the
    /// first snapshot then starts as cheaply as the later ones. A snapshot
    /// due before that thread is done is skipped, like one due while the
    /// last is still being written.
    pub fn write_snapshots_in_background(&mut self) {
        self.background = true;
        if self.snapshot.is_some() {
            return;
        }
        if let Some(ahead) = self.wal.segment_ahead() {
            // Without a thread the first snapshot zero-fills in line.
            self.start_background("dlm-segment", move || Ok(ahead.run()));
        }
    }

    /// Runs `work` on a thread of its own as the background job (a
    /// snapshot's write, or a segment's zero-fill), collected later. With
    /// no thread to be had the work is skipped: it is only ever a speed-up
    /// or can wait for the next snapshot.
    fn start_background(
        &mut self,
        name: &str,
        work: impl FnOnce() -> Result<Option<Premade>, LogError> + Send + 'static,
    ) {
        match std::thread::Builder::new().name(name.into()).spawn(work) {
            Ok(thread) => self.snapshot = Some(SnapshotThread(Some(thread))),
            Err(error) => {
                tracing::warn!(%error, thread = name, "no thread for background work; skipped")
            }
        }
    }

    /// The log and the data files, for a driver that sequences them itself
    /// (the simulation).
    pub fn into_parts(self) -> (Wal, DataFiles) {
        (self.wal, self.files)
    }

    /// Waits for a snapshot still being written (before the node stops, so
    /// that its directory is not written to after).
    ///
    /// # Errors
    /// [`WriterError`] if writing the snapshot failed.
    pub fn finish(&mut self) -> Result<(), WriterError> {
        self.collect_snapshot(true)
    }

    /// Takes the result of the background snapshot if it is done (or, with
    /// `wait`, once it is).
    fn collect_snapshot(&mut self, wait: bool) -> Result<(), WriterError> {
        match &self.snapshot {
            Some(thread) if wait || thread.is_finished() => {}
            _ => return Ok(()),
        }
        let Some(thread) = self.snapshot.take() else {
            return Ok(());
        };
        match thread.join() {
            Some(Ok(result)) => {
                self.wal.adopt(result?);
                Ok(())
            }
            Some(Err(_panic)) => Err(WriterError::Data(io::Error::other(
                "the snapshot (or segment zero-fill) thread panicked",
            ))),
            None => Ok(()),
        }
    }

    /// Starts a snapshot: data files durable, the log on a new generation,
    /// the snapshot written here or on its own thread. Skipped (the log just
    /// grows until the next one) while the previous one is still being
    /// written.
    fn snapshot(&mut self, snapshot: Snapshot) -> Result<(), WriterError> {
        self.collect_snapshot(false)?;
        if self.snapshot.is_some() {
            tracing::debug!("snapshot skipped: the previous one is still being written");
            return Ok(());
        }
        self.files.sync()?;
        let write = self.wal.begin_snapshot(snapshot)?;
        if self.background {
            // Safe to go without: until a later snapshot is written,
            // recovery replays the older one and every log since.
            self.start_background("dlm-snapshot", move || write.run());
        } else {
            self.wal.adopt(write.run()?);
        }
        Ok(())
    }

    /// Carries out `jobs` in order with as few fsyncs as the order allows.
    ///
    /// # Errors
    /// [`WriterError`] on any storage failure; replies not yet sent are dropped.
    pub fn run_jobs(&mut self, jobs: Vec<Job>) -> Result<(), WriterError> {
        self.collect_snapshot(false)?;
        let mut waiting: Vec<Batch> = Vec::new();
        for job in jobs {
            match job {
                Job::Batch(batch) => {
                    for record in &batch.records {
                        self.wal.append(record);
                    }
                    waiting.push(batch);
                }
                Job::Snapshot(snapshot) => {
                    self.flush(&mut waiting)?;
                    self.snapshot(*snapshot)?;
                }
                Job::Read { file, reply } => {
                    self.flush(&mut waiting)?;
                    let _ = reply.send(self.files.len(file));
                }
            }
        }
        self.flush(&mut waiting)
    }

    fn flush(&mut self, waiting: &mut Vec<Batch>) -> Result<(), WriterError> {
        if self.wal.has_pending() {
            self.wal.sync()?;
            self.syncs += 1;
        }
        for batch in waiting.drain(..) {
            for write in &batch.writes {
                self.files.apply(write)?;
            }
            for (to, reply) in batch.replies {
                // The caller may have gone; its answer is kept for a retry.
                let _ = to.send(reply);
            }
        }
        Ok(())
    }
}
