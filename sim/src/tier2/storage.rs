//! dlm's storage seam over turmoil's simulated disk, with power cuts.
//!
//! [`TurmoilDir`] implements [`dlm::storage::Dir`] with
//! `turmoil::fs::shim::std::fs`, the way [`dlm::storage::FsDir`] does with
//! `std::fs`: writes stay pending until `sync_data`, creations, renames and
//! removals until the directory is synced, and a power loss (`Sim::crash`)
//! drops what was pending, tearing unsynced writes in blocks. The disk
//! belongs to the server host, so it survives crashes and restarts.
//!
//! It also aims power cuts at the two instants of a group commit that
//! matter: when armed, the next fsync of a log file either fails before
//! syncing (the records were written, not synced) or syncs and then fails
//! (durable, but no reply will leave); the disk then refuses everything and
//! the driver cuts the power. And it keeps a journal of unsynced writes so
//! that the next boot can count what a power loss lost or tore.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dlm::storage::{Dir, DirFile};
use turmoil::fs::shim::std::fs;

use super::{Shared, SERVER_HOST};

/// Where an armed power cut strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cut {
    /// Between the log write and its fsync.
    BeforeFsync,
    /// Between the fsync and the replies.
    BeforeReply,
}

/// One write not yet synced.
#[derive(Clone, Debug)]
pub(crate) struct Unsynced {
    path: PathBuf,
    offset: u64,
    data: Vec<u8>,
}

/// The driver's view of the server's disk.
#[derive(Debug, Default)]
pub(crate) struct DiskState {
    /// A power cut waiting for the next log fsync.
    pub armed: Option<Cut>,
    /// A power cut that struck; the driver cuts the power after this step.
    pub fired: Option<Cut>,
    /// Set while the server recovers: a cut that strikes then is a power
    /// cut during recovery, whatever it was aimed at.
    pub recovering: bool,
    /// The cut in `fired` struck during recovery.
    pub fired_in_recovery: bool,
    /// After a cut the disk refuses everything until the next boot.
    dead: bool,
    /// Planted bug: fsyncs of the log do nothing, so replies leave before
    /// their records are durable.
    lying_fsync: bool,
    /// Writes not yet synced, oldest first.
    unsynced: Vec<Unsynced>,
    /// The unsynced writes at the last power loss, for the next boot to count.
    at_power_loss: Vec<Unsynced>,
}

impl DiskState {
    /// A disk; `lying_fsync` plants the reply-before-fsync bug.
    pub fn new(lying_fsync: bool) -> DiskState {
        DiskState {
            lying_fsync,
            ..DiskState::default()
        }
    }

    /// The power went: what was unsynced is now lost, torn or (flushed in
    /// the background) kept; the next boot finds out which.
    pub fn power_lost(&mut self) {
        self.at_power_loss.append(&mut self.unsynced);
    }
}

/// A directory on the server host's simulated disk.
pub(crate) struct TurmoilDir {
    path: PathBuf,
    shared: Arc<Shared>,
}

fn power_cut() -> io::Error {
    io::Error::other("power cut: the disk is gone")
}

impl TurmoilDir {
    /// Opens (creating if needed) the directory at `path`, as `FsDir::open`.
    ///
    /// # Errors
    /// I/O errors of the simulated disk.
    pub fn open(path: impl AsRef<Path>, shared: Arc<Shared>) -> io::Result<TurmoilDir> {
        let path = path.as_ref().to_path_buf();
        fs::create_dir_all(&path)?;
        Ok(TurmoilDir { path, shared })
    }

    fn alive(&self) -> io::Result<()> {
        alive(&self.shared)
    }
}

fn alive(shared: &Shared) -> io::Result<()> {
    if shared.with(|s| s.disk.dead) {
        Err(power_cut())
    } else {
        Ok(())
    }
}

/// At boot, before recovery reads anything: the disk works again, and the
/// writes that were unsynced at the last power loss are sorted into kept,
/// torn and lost. Returns (torn, lost).
pub(crate) fn boot(shared: &Shared) -> (u64, u64) {
    let pending = shared.with(|s| {
        s.disk.dead = false;
        std::mem::take(&mut s.disk.at_power_loss)
    });
    let (mut torn, mut lost) = (0, 0);
    for write in &pending {
        let mut found = vec![0u8; write.data.len()];
        let read = fs::File::open(&write.path).and_then(|f| f.read_at(&mut found, write.offset));
        let n = read.unwrap_or(0);
        let kept = found[..n]
            .iter()
            .zip(&write.data)
            .take_while(|(a, b)| a == b)
            .count();
        if kept == write.data.len() {
            continue;
        }
        if kept > 0 {
            torn += 1;
        } else {
            lost += 1;
        }
    }
    (torn, lost)
}

impl Dir for TurmoilDir {
    fn list(&self) -> io::Result<Vec<String>> {
        self.alive()?;
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_owned());
                }
            }
        }
        // turmoil lists in hash order; dlm wants (and the replay needs) order.
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.alive()?;
        fs::read(self.path.join(name))
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn DirFile>> {
        self.alive()?;
        let path = self.path.join(name);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&path)?;
        Ok(Box::new(TurmoilFile {
            file,
            is_log: name.starts_with("log-"),
            path,
            shared: self.shared.clone(),
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.alive()?;
        fs::rename(self.path.join(from), self.path.join(to))?;
        if to.starts_with("snap-") {
            self.shared.with(|s| s.faults.snapshots += 1);
        }
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.alive()?;
        fs::remove_file(self.path.join(name))
    }

    fn sync(&self) -> io::Result<()> {
        self.alive()?;
        fs::sync_dir(&self.path)
    }

    fn describe(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

/// An open file of a [`TurmoilDir`].
struct TurmoilFile {
    file: fs::File,
    path: PathBuf,
    /// A log segment: where power cuts strike and fsyncs may lie.
    is_log: bool,
    shared: Arc<Shared>,
}

impl TurmoilFile {
    fn synced(&self) {
        self.shared
            .with(|s| s.disk.unsynced.retain(|w| w.path != self.path));
    }
}

impl DirFile for TurmoilFile {
    fn size(&self) -> io::Result<u64> {
        alive(&self.shared)?;
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        alive(&self.shared)?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        Ok(done)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        alive(&self.shared)?;
        self.file.write_all_at(data, offset)?;
        self.shared.with(|s| {
            s.disk.unsynced.push(Unsynced {
                path: self.path.clone(),
                offset,
                data: data.to_vec(),
            })
        });
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        alive(&self.shared)?;
        self.file.set_len(len)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        alive(&self.shared)?;
        if self.is_log {
            let (armed, lying) = self
                .shared
                .with(|s| (s.disk.armed.take(), s.disk.lying_fsync));
            if let Some(cut) = armed {
                if cut == Cut::BeforeReply {
                    self.file.sync_data()?;
                    self.synced();
                }
                self.shared.with(|s| {
                    s.disk.dead = true;
                    s.disk.fired = Some(cut);
                    s.disk.fired_in_recovery = s.disk.recovering;
                    // The power is off: the host's network falls silent too.
                    s.crashing.insert(SERVER_HOST.to_owned());
                });
                return Err(power_cut());
            }
            if lying {
                return Ok(());
            }
        }
        self.file.sync_data()?;
        self.synced();
        Ok(())
    }
}
