//! The persistence side of the server: group commit, then file writes, then replies.
//!
//! Owns: the log and the data files while the server runs. It takes jobs in
//! the order the core produced them, writes every record that is waiting,
//! makes them durable with one fdatasync (group commit: all requests that
//! arrived during the previous sync share the next one), applies the file
//! writes they committed, and only then releases the replies. Reads and
//! snapshots are ordered with the writes. Must not: decide anything; it
//! carries out the core's outputs in order.

use std::io;

use tokio::sync::oneshot;

use crate::core::records::{Record, Snapshot};
use crate::core::staging::{FileIndex, FileWrite};
use crate::core::types::Reply;
use crate::files::DataFiles;
use crate::log::{LogError, Wal};

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
    /// Read a data file after every earlier write.
    Read {
        file: FileIndex,
        reply: oneshot::Sender<io::Result<Vec<u8>>>,
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

/// The log and the data files, used by one writer.
pub struct Persister {
    wal: Wal,
    files: DataFiles,
    /// Fsyncs done (each served a whole group).
    pub syncs: u64,
}

impl Persister {
    /// A persister over a recovered log and opened data files.
    pub fn new(wal: Wal, files: DataFiles) -> Persister {
        Persister {
            wal,
            files,
            syncs: 0,
        }
    }

    /// The log and the data files, for a driver that sequences them itself
    /// (the simulation).
    pub fn into_parts(self) -> (Wal, DataFiles) {
        (self.wal, self.files)
    }

    /// Carries out `jobs` in order with as few fsyncs as the order allows.
    ///
    /// # Errors
    /// [`WriterError`] on any storage failure; replies not yet sent are dropped.
    pub fn run_jobs(&mut self, jobs: Vec<Job>) -> Result<(), WriterError> {
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
                    self.files.sync()?;
                    self.wal.write_snapshot(&snapshot)?;
                }
                Job::Read { file, reply } => {
                    self.flush(&mut waiting)?;
                    let _ = reply.send(self.files.read(file));
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
