//! A simulated disk behind dlm's storage seam: what was written but not
//! synced is lost on a crash, optionally leaving a torn prefix of it.
//!
//! Every file has the bytes a reader sees (`current`) and the bytes that
//! survive a crash (`durable`); `sync_data` copies one to the other. Directory
//! operations (create, rename, remove) are taken as durable at once.

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

type Files = BTreeMap<(String, String), SimFile>;

/// A disk shared by the directories made from it.
#[derive(Clone, Default)]
pub struct SimDisk {
    files: Arc<Mutex<Files>>,
}

/// What a crash did to the disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrashLoss {
    /// Files that lost unsynced bytes.
    pub files_hit: u64,
    /// Of them, files left with a torn prefix of the lost bytes.
    pub torn: u64,
}

impl SimDisk {
    fn lock(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A directory named `dir` on this disk.
    pub fn dir(&self, dir: &str) -> SimDir {
        SimDir {
            disk: self.clone(),
            dir: dir.to_owned(),
        }
    }

    /// Power loss: every file falls back to its durable bytes; with
    /// probability `torn` a file keeps a random prefix of what changed since
    /// its last sync (a write cut short: appended bytes, or the rewritten
    /// blocks of a preallocated log).
    pub fn crash(&self, rng: &mut SimRng, torn: f64) -> CrashLoss {
        let mut loss = CrashLoss::default();
        for file in self.lock().values_mut() {
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
            let changed_end = file.current.len();
            let grew_or_same = file.current.len() >= file.durable.len();
            if grew_or_same && changed_end > first + 1 && rng.chance(torn) {
                let keep = first + rng.between(1, (changed_end - first - 1) as u64) as usize;
                let mut torn_bytes = file.current[..keep].to_vec();
                if file.durable.len() > keep {
                    torn_bytes.extend_from_slice(&file.durable[keep..]);
                }
                file.current = torn_bytes;
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
        self.lock()
            .get(&(dir.to_owned(), name.to_owned()))
            .map(|f| f.current.clone())
            .unwrap_or_default()
    }
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

impl Dir for SimDir {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self
            .disk
            .lock()
            .keys()
            .filter(|(d, _)| *d == self.dir)
            .map(|(_, n)| n.clone())
            .collect())
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        self.disk
            .lock()
            .get(&(self.dir.clone(), name.to_owned()))
            .map(|f| f.current.clone())
            .ok_or_else(|| not_found(name))
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn DirFile>> {
        let key = (self.dir.clone(), name.to_owned());
        let mut files = self.disk.lock();
        if !files.contains_key(&key) {
            if !create {
                return Err(not_found(name));
            }
            files.insert(key.clone(), SimFile::default());
        }
        Ok(Box::new(SimHandle {
            disk: self.disk.clone(),
            key,
        }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut files = self.disk.lock();
        let file = files
            .remove(&(self.dir.clone(), from.to_owned()))
            .ok_or_else(|| not_found(from))?;
        files.insert((self.dir.clone(), to.to_owned()), file);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.disk
            .lock()
            .remove(&(self.dir.clone(), name.to_owned()))
            .map(|_| ())
            .ok_or_else(|| not_found(name))
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

struct SimHandle {
    disk: SimDisk,
    key: (String, String),
}

impl SimHandle {
    fn with<T>(&self, f: impl FnOnce(&mut SimFile) -> T) -> io::Result<T> {
        let mut files = self.disk.lock();
        let file = files
            .get_mut(&self.key)
            .ok_or_else(|| not_found(&self.key.1))?;
        Ok(f(file))
    }
}

impl DirFile for SimHandle {
    fn size(&self) -> io::Result<u64> {
        self.with(|f| f.current.len() as u64)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.with(|f| {
            let end = offset as usize + data.len();
            if f.current.len() < end {
                f.current.resize(end, 0);
            }
            f.current[offset as usize..end].copy_from_slice(data);
        })
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.with(|f| f.current.resize(len as usize, 0))
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.with(|f| f.durable.clone_from(&f.current))
    }
}
