//! A simulated disk behind dlm's storage seam: what was written but not
//! synced is lost on a crash, optionally leaving a torn part of it (a
//! prefix, or any of its sectors).
//!
//! Every file (an inode) has the bytes a reader sees (`current`) and the
//! bytes that survive a crash (`durable`); `sync_data` copies one to the
//! other. A directory has the names a reader sees and the names that survive
//! a crash: creating, renaming and removing change the first at once, and
//! only [`Dir::sync`] of that directory makes them durable. A crash keeps
//! some of each directory's changes since its last sync: a random prefix
//! (a journaled filesystem writes its metadata in order) or a random subset
//! (one without a journal may have written any of them); a rename is kept
//! whole or not at all. A file no surviving name points to is gone.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use dlm::storage::{Dir, DirFile};

use crate::rng::SimRng;

#[derive(Default, Clone)]
struct SimFile {
    current: Vec<u8>,
    durable: Vec<u8>,
}

type Inode = u64;

/// A directory change not yet made durable.
#[derive(Clone, Debug)]
enum DirChange {
    Link(String, Inode),
    Unlink(String, Inode),
    /// rename(2) of `inode`: atomic, so a crash keeps both halves or
    /// neither.
    Rename {
        from: String,
        to: String,
        inode: Inode,
    },
}

#[derive(Default)]
struct SimDirState {
    /// Names a reader sees.
    current: BTreeMap<String, Inode>,
    /// Names that survive a crash.
    durable: BTreeMap<String, Inode>,
    /// The changes from `durable` to `current`, in order.
    unsynced: Vec<DirChange>,
}

impl SimDirState {
    fn change(&mut self, change: DirChange) {
        apply(&mut self.current, &change);
        self.unsynced.push(change);
    }
}

fn apply(names: &mut BTreeMap<String, Inode>, change: &DirChange) {
    match change {
        DirChange::Link(name, inode) => {
            names.insert(name.clone(), *inode);
        }
        // By inode, not by name: a change kept without an earlier one (a
        // filesystem without a journal) must not act on another file that
        // had the same name.
        DirChange::Unlink(name, inode) => {
            if names.get(name) == Some(inode) {
                names.remove(name);
            }
        }
        DirChange::Rename { from, to, inode } => {
            if names.get(from) == Some(inode) {
                names.remove(from);
            }
            names.insert(to.clone(), *inode);
        }
    }
}

#[derive(Default)]
struct Disk {
    inodes: BTreeMap<Inode, SimFile>,
    dirs: BTreeMap<String, SimDirState>,
    next_inode: Inode,
    /// Changes made so far (writes, size changes, syncs, directory changes).
    changes: u64,
    /// The power fails once this many changes were made: later ones are
    /// lost, as if the machine had stopped there.
    power_fails_at: Option<u64>,
    /// A change was lost to the power failure.
    dropped: bool,
}

impl Disk {
    /// Counts a change; false once the power has failed (the change is
    /// then lost, though the caller is told it succeeded).
    fn change(&mut self) -> bool {
        if self.power_fails_at.is_some_and(|at| self.changes >= at) {
            self.dropped = true;
            return false;
        }
        self.changes += 1;
        true
    }

    fn inode_of(&self, dir: &str, name: &str) -> Option<Inode> {
        self.dirs.get(dir)?.current.get(name).copied()
    }

    /// The bytes a reader of `dir/name` sees.
    fn read(&self, dir: &str, name: &str) -> Option<Vec<u8>> {
        let inode = self.inode_of(dir, name)?;
        self.inodes.get(&inode).map(|f| f.current.clone())
    }
}

/// A disk shared by the directories made from it.
#[derive(Clone, Default)]
pub struct SimDisk {
    disk: Arc<Mutex<Disk>>,
}

/// What a crash did to the disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrashLoss {
    /// Files that lost unsynced bytes.
    pub files_hit: u64,
    /// Of them, files left with a torn part (a prefix or some sectors) of
    /// the lost bytes.
    pub torn: u64,
    /// Directory changes (create, rename, remove) lost: not synced, and
    /// not among those the crash kept.
    pub names_lost: u64,
}

impl SimDisk {
    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A directory named `dir` on this disk.
    pub fn dir(&self, dir: &str) -> SimDir {
        self.lock().dirs.entry(dir.to_owned()).or_default();
        SimDir {
            disk: self.clone(),
            dir: dir.to_owned(),
        }
    }

    /// Changes (writes, size changes, syncs, directory changes) made so far.
    pub fn changes(&self) -> u64 {
        self.lock().changes
    }

    /// Makes the power fail once `changes` changes were made in all: every
    /// later one is lost until [`SimDisk::crash`]. For tests that stop a
    /// sequence of storage operations at each point in turn.
    pub fn power_fails_at(&self, changes: u64) {
        self.lock().power_fails_at = Some(changes);
    }

    /// Whether a change has been lost to the power failure (see
    /// [`SimDisk::power_fails_at`]): a sync that returned before it did
    /// its work.
    pub fn power_failed(&self) -> bool {
        self.lock().dropped
    }

    /// Takes back a power failure set by [`SimDisk::power_fails_at`] that
    /// has not happened yet.
    pub fn disarm_power_failure(&self) {
        let mut disk = self.lock();
        if !disk.dropped {
            disk.power_fails_at = None;
        }
    }

    /// The process stops without a power loss (`kill -9`): the failure set
    /// by [`SimDisk::power_fails_at`] stopped its changes, and what it had
    /// made stays, synced or not, as in the page cache.
    pub fn process_killed(&self) {
        let mut disk = self.lock();
        disk.power_fails_at = None;
        disk.dropped = false;
    }

    /// Power loss: each directory keeps a random prefix or subset of its
    /// unsynced changes; every file falls back to its durable bytes, and with
    /// probability `torn` keeps part of what changed since its last sync (a
    /// write cut short: appended bytes, or the rewritten blocks of a
    /// preallocated log): a random prefix, or a random subset of its
    /// 64-byte sectors (a device that writes them in any order); files no
    /// name points to any more are gone.
    pub fn crash(&self, rng: &mut SimRng, torn: f64) -> CrashLoss {
        let mut loss = CrashLoss::default();
        let mut disk = self.lock();
        disk.power_fails_at = None;
        disk.dropped = false;
        // The files in (directory, name) order, each once, for the draws
        // of torn writes below (the order runs replay in).
        let mut order = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for state in disk.dirs.values() {
            for inode in state.current.values() {
                if seen.insert(*inode) {
                    order.push(*inode);
                }
            }
        }
        for state in disk.dirs.values_mut() {
            if state.unsynced.is_empty() {
                // Nothing to lose: no draws (runs without such crashes
                // replay as they did before directories were modelled).
                continue;
            }
            // A journaled filesystem keeps its metadata changes in order (a
            // prefix survives); one without a journal (as on the bench
            // machine) may have written any of them.
            let in_order = rng.chance(0.5);
            let kept = rng.between(0, state.unsynced.len() as u64) as usize;
            for (i, change) in state.unsynced.iter().enumerate() {
                let survives = if in_order { i < kept } else { rng.chance(0.5) };
                if survives {
                    apply(&mut state.durable, change);
                } else {
                    loss.names_lost += 1;
                }
            }
            state.unsynced.clear();
            state.current = state.durable.clone();
        }
        let named: std::collections::BTreeSet<Inode> = disk
            .dirs
            .values()
            .flat_map(|d| d.current.values().copied())
            .collect();
        disk.inodes.retain(|inode, _| named.contains(inode));
        for inode in order {
            let Some(file) = disk.inodes.get_mut(&inode) else {
                continue;
            };
            if file.current == file.durable {
                continue;
            }
            loss.files_hit += 1;
            let first = file
                .current
                .iter()
                .zip(&file.durable)
                .position(|(a, b)| a != b)
                .unwrap_or(file.current.len().min(file.durable.len()));
            // Where the changed bytes end: a grown file's new end, or past
            // the last byte that differs (a rewrite inside a preallocated
            // log changes a few blocks, not the zeros after them, so a cut
            // drawn over the whole file would mostly keep every change).
            let changed_end = if file.current.len() > file.durable.len() {
                file.current.len()
            } else {
                file.current
                    .iter()
                    .zip(&file.durable)
                    .rposition(|(a, b)| a != b)
                    .map_or(first, |i| i + 1)
            };
            let grew_or_same = file.current.len() >= file.durable.len();
            if grew_or_same && changed_end > first + 1 && rng.chance(torn) {
                file.current = if rng.chance(0.5) {
                    let keep = first + rng.between(1, (changed_end - first - 1) as u64) as usize;
                    let mut torn_bytes = file.current[..keep].to_vec();
                    if file.durable.len() > keep {
                        torn_bytes.extend_from_slice(&file.durable[keep..]);
                    }
                    torn_bytes
                } else {
                    sectors_kept(rng, &file.current, &file.durable, first, changed_end)
                };
                loss.torn += 1;
            } else {
                file.current = file.durable.clone();
            }
            file.durable = file.current.clone();
        }
        loss
    }

    /// The bytes a reader of `dir/name` sees.
    pub fn read(&self, dir: &str, name: &str) -> Vec<u8> {
        self.lock().read(dir, name).unwrap_or_default()
    }
}

/// Bytes of a sector: what a device writes whole or not at all.
const SECTOR: usize = 64;

/// A write cut short by a device that put its sectors down in any order (a
/// volatile write cache without FUA, as on the bench machine): the sectors
/// of `current` that overlap `first..end` are kept or fall back to their
/// durable bytes (zeros past the durable end); either each by a coin flip,
/// or every one from a random sector on (the later half of a write down,
/// its start not: what a recovery that reads forward finds hardest).
fn sectors_kept(
    rng: &mut SimRng,
    current: &[u8],
    durable: &[u8],
    first: usize,
    end: usize,
) -> Vec<u8> {
    let mut bytes = current.to_vec();
    let start = first - first % SECTOR;
    let sectors = (end - start).div_ceil(SECTOR) as u64;
    let from = rng.chance(0.5).then(|| rng.between(1, sectors.max(1)));
    let mut at = start;
    let mut i = 0;
    while at < end {
        let to = (at + SECTOR).min(bytes.len());
        let keep = match from {
            Some(from) => i >= from,
            None => rng.chance(0.5),
        };
        if !keep {
            for (j, b) in bytes[at..to].iter_mut().enumerate() {
                *b = durable.get(at + j).copied().unwrap_or(0);
            }
        }
        at = to;
        i += 1;
    }
    bytes
}

/// A directory of a [`SimDisk`].
#[derive(Clone)]
pub struct SimDir {
    disk: SimDisk,
    dir: String,
}

fn not_found(name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{name}: no such file"))
}

impl SimDir {
    fn state<'a>(&self, disk: &'a mut Disk) -> &'a mut SimDirState {
        disk.dirs.entry(self.dir.clone()).or_default()
    }
}

impl Dir for SimDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut disk = self.disk.lock();
        Ok(self.state(&mut disk).current.keys().cloned().collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.disk
            .lock()
            .read(&self.dir, name)
            .ok_or_else(|| not_found(name))
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn DirFile>> {
        let mut disk = self.disk.lock();
        let inode = match disk.inode_of(&self.dir, name) {
            Some(inode) => inode,
            None if create => {
                if !disk.change() {
                    // The power is gone: the file never existed.
                    return Err(io::Error::other("power failed"));
                }
                let inode = disk.next_inode;
                disk.next_inode += 1;
                disk.inodes.insert(inode, SimFile::default());
                self.state(&mut disk)
                    .change(DirChange::Link(name.to_owned(), inode));
                inode
            }
            None => return Err(not_found(name)),
        };
        Ok(Box::new(SimHandle {
            disk: self.disk.clone(),
            inode,
            name: name.to_owned(),
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut disk = self.disk.lock();
        let inode = disk
            .inode_of(&self.dir, from)
            .ok_or_else(|| not_found(from))?;
        if !disk.change() {
            return Ok(());
        }
        self.state(&mut disk).change(DirChange::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
            inode,
        });
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut disk = self.disk.lock();
        let inode = disk
            .inode_of(&self.dir, name)
            .ok_or_else(|| not_found(name))?;
        if !disk.change() {
            return Ok(());
        }
        self.state(&mut disk)
            .change(DirChange::Unlink(name.to_owned(), inode));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut disk = self.disk.lock();
        if !disk.change() {
            return Ok(());
        }
        let state = self.state(&mut disk);
        state.durable = state.current.clone();
        state.unsynced.clear();
        Ok(())
    }
}

struct SimHandle {
    disk: SimDisk,
    inode: Inode,
    /// For errors only: the file keeps its inode across renames, as an open
    /// file does.
    name: String,
}

impl SimHandle {
    fn with<T>(&self, f: impl FnOnce(&mut SimFile) -> T) -> io::Result<T> {
        let mut disk = self.disk.lock();
        let file = disk
            .inodes
            .get_mut(&self.inode)
            .ok_or_else(|| not_found(&self.name))?;
        Ok(f(file))
    }

    /// A change to the file, lost (but reported done) once the power has
    /// failed.
    fn change(&self, f: impl FnOnce(&mut SimFile)) -> io::Result<()> {
        let mut disk = self.disk.lock();
        if !disk.inodes.contains_key(&self.inode) {
            return Err(not_found(&self.name));
        }
        if disk.change() {
            if let Some(file) = disk.inodes.get_mut(&self.inode) {
                f(file);
            }
        }
        Ok(())
    }
}

impl DirFile for SimHandle {
    fn size(&self) -> io::Result<u64> {
        self.with(|f| f.current.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.with(|f| {
            let from = (offset as usize).min(f.current.len());
            let n = buf.len().min(f.current.len() - from);
            buf[..n].copy_from_slice(&f.current[from..from + n]);
            n
        })
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.change(|f| {
            let end = offset as usize + data.len();
            if f.current.len() < end {
                f.current.resize(end, 0);
            }
            f.current[offset as usize..end].copy_from_slice(data);
        })
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.change(|f| f.current.resize(len as usize, 0))
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.change(|f| f.durable.clone_from(&f.current))
    }
}
