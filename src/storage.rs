//! The storage seam: a directory of files, as the log and the data files need it.
//!
//! Owns: the trait [`Dir`] / [`DirFile`] and its real implementation on the
//! local filesystem ([`FsDir`]). The simulation plugs in a simulated disk
//! behind the same traits. Must not: know about records or locks.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A directory holding flat files (no subdirectories).
pub trait Dir: Send + Sync {
    /// Names of the files in the directory, sorted.
    ///
    /// # Errors
    /// I/O errors of the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// The whole content of `name`.
    ///
    /// # Errors
    /// I/O errors, `NotFound` when missing.
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Opens `name` for reading and writing, creating it empty when `create`
    /// is set. Creating a file is durable only after [`Dir::sync`].
    ///
    /// # Errors
    /// I/O errors, `NotFound` when missing and not `create`.
    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn DirFile>>;
    /// Opens `name` as [`Dir::open`] does, for writes in whole 4 KiB blocks
    /// at 4 KiB offsets, which may bypass the page cache (`O_DIRECT`, where
    /// the filesystem allows it). Other writes must still work, if slower.
    ///
    /// # Errors
    /// As [`Dir::open`].
    fn open_direct(&self, name: &str, create: bool) -> io::Result<Box<dyn DirFile>> {
        self.open(name, create)
    }
    /// Atomically renames `from` to `to` (durable after [`Dir::sync`]).
    ///
    /// # Errors
    /// I/O errors.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes `name`.
    ///
    /// # Errors
    /// I/O errors.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable (fsync of the directory).
    ///
    /// # Errors
    /// I/O errors.
    fn sync(&self) -> io::Result<()>;
    /// How to name `name` in an error message (a full path where there is one).
    fn describe(&self, name: &str) -> String {
        name.to_owned()
    }
}

/// An open file of a [`Dir`].
pub trait DirFile: Send {
    /// Current length in bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn size(&self) -> io::Result<u64>;
    /// Reads into `buf` from `offset`; returns how many bytes were read
    /// (fewer than `buf.len()` only at the end of the file).
    ///
    /// # Errors
    /// I/O errors.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `data` at `offset`.
    ///
    /// # Errors
    /// I/O errors (a short write is an error).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Truncates or extends to `len`.
    ///
    /// # Errors
    /// I/O errors.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Makes the written data durable (fdatasync).
    ///
    /// # Errors
    /// I/O errors; after a failed sync the file's state is unknown.
    fn sync_data(&mut self) -> io::Result<()>;
    /// A hint that `len` bytes at `offset` will be read soon: the kernel may
    /// start reading them now, while the caller works on what it has.
    /// Nothing by default; a failed hint is ignored.
    fn will_read(&self, _offset: u64, _len: u64) {}
    /// A hint to start writing back to the disk what was written at
    /// `offset..offset + len`, without waiting, so that a later
    /// [`DirFile::sync_data`] has less to wait for. Not a durability step.
    /// Nothing by default; a failed hint is ignored.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
}

/// A [`Dir`] on the local filesystem.
#[derive(Debug, Clone)]
pub struct FsDir {
    path: PathBuf,
    /// Held for the life of this value and its clones when opened with
    /// [`FsDir::open_exclusive`]: the kernel lets go of it when the process
    /// dies, however it dies.
    _lock: Option<std::sync::Arc<File>>,
}

/// The name of the lock file [`FsDir::open_exclusive`] takes.
pub const LOCK_FILE: &str = "LOCK";

impl FsDir {
    /// Opens (creating if needed) the directory at `path`, and makes its
    /// name durable: every ancestor is fsynced, so a directory this start
    /// (or an earlier one that died before the sync) created cannot vanish
    /// in a power failure together with everything written into it.
    ///
    /// # Errors
    /// I/O errors creating the directory or syncing an ancestor.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FsDir> {
        let path = path.as_ref().to_path_buf();
        fs::create_dir_all(&path)?;
        let absolute = fs::canonicalize(&path)?;
        sync_ancestors(&absolute, |dir| match sync_dir(dir) {
            Ok(()) => Ok(true),
            // An ancestor this process may not read (`/home` of another
            // user) was not made by it either: nothing of ours to persist.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(false),
            Err(e) => Err(e),
        })?;
        Ok(FsDir { path, _lock: None })
    }

    /// [`FsDir::open`], and takes an exclusive lock on its [`LOCK_FILE`]
    /// for as long as the returned value (and every `Arc` of it) lives, so
    /// that a second process — or a second start in this one while the
    /// first is still winding down — cannot write the same files.
    ///
    /// # Errors
    /// As [`FsDir::open`]; `ErrorKind::WouldBlock` when someone else holds
    /// the lock.
    pub fn open_exclusive(path: impl AsRef<Path>) -> io::Result<FsDir> {
        let mut dir = FsDir::open(path)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.path.join(LOCK_FILE))?;
        try_lock_exclusive(&lock).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another dlm server ({LOCK_FILE} is locked)",
                        dir.path.display()
                    ),
                )
            } else {
                e
            }
        })?;
        dir._lock = Some(std::sync::Arc::new(lock));
        Ok(dir)
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Dir for FsDir {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path.join(name))
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn DirFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(self.path.join(name))?;
        Ok(Box::new(FsFile { file, direct: None }))
    }

    fn open_direct(&self, name: &str, create: bool) -> io::Result<Box<dyn DirFile>> {
        let buffered = self.open(name, create)?;
        match open_o_direct(&self.path.join(name)) {
            Ok(file) => Ok(Box::new(FsFile {
                file,
                direct: Some(Direct {
                    buffered,
                    buf: Vec::new(),
                }),
            })),
            // tmpfs and some others refuse O_DIRECT: plain writes then.
            Err(_) => Ok(buffered),
        }
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.path.join(from), self.path.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path.join(name))
    }

    fn sync(&self) -> io::Result<()> {
        sync_dir(&self.path)
    }

    fn describe(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

/// Makes the names in directory `path` durable (fsync of the directory).
fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Calls `sync` on `dir` and on each of its ancestors, deepest first: a
/// directory's name lives in its parent, so a new directory is durable only
/// once every directory from it up to one that already was durable has been
/// synced. Which ones are new cannot be told after a crash (an earlier start
/// may have created them and died before syncing), so all are synced; a
/// directory with nothing unsynced costs little. `sync` answers whether it
/// could sync (false: not allowed to open it).
///
/// # Errors
/// The first error of `sync`.
fn sync_ancestors(dir: &Path, mut sync: impl FnMut(&Path) -> io::Result<bool>) -> io::Result<()> {
    for ancestor in dir.ancestors() {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        if !sync(ancestor)? {
            tracing::debug!(dir = %ancestor.display(), "not allowed to open; not synced");
        }
    }
    Ok(())
}

/// `flock(LOCK_EX | LOCK_NB)`: advisory, whole-file, released when the
/// last descriptor of this open file closes (also when the process dies).
fn try_lock_exclusive(file: &File) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid descriptor owned by `file`, which outlives the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn open_o_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_o_direct(_path: &Path) -> io::Result<File> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Alignment of `O_DIRECT` buffers, offsets and lengths (the largest
/// logical block size in common use).
const DIRECT_ALIGN: usize = 4096;

struct FsFile {
    file: File,
    /// Set when `file` was opened with `O_DIRECT`.
    direct: Option<Direct>,
}

struct Direct {
    /// The same file without `O_DIRECT`, for unaligned writes.
    buffered: Box<dyn DirFile>,
    /// Room for an aligned copy of a write.
    buf: Vec<u8>,
}

impl Direct {
    /// An aligned slice of `len` bytes inside `buf` (safe code: the vector
    /// is over-allocated by one alignment and the slice starts where the
    /// address is a multiple of it).
    fn aligned(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < len + DIRECT_ALIGN {
            self.buf = vec![0; len + DIRECT_ALIGN];
        }
        let skip = self.buf.as_ptr().align_offset(DIRECT_ALIGN);
        &mut self.buf[skip..skip + len]
    }
}

impl DirFile for FsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(direct) = &self.direct {
            // O_DIRECT reads need aligned buffers: read through the page cache.
            return direct.buffered.read_at(offset, buf);
        }
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let Some(direct) = &mut self.direct else {
            return self.file.write_all_at(data, offset);
        };
        let align = DIRECT_ALIGN as u64;
        if !offset.is_multiple_of(align) || !data.len().is_multiple_of(DIRECT_ALIGN) {
            return direct.buffered.write_at(offset, data);
        }
        let aligned = direct.aligned(data.len());
        aligned.copy_from_slice(data);
        let mut done = 0;
        while done < aligned.len() {
            match self.file.write_at(&aligned[done..], offset + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) if n.is_multiple_of(DIRECT_ALIGN) => done += n,
                // A short write that left the alignment: finish it buffered.
                Ok(n) => {
                    done += n;
                    return direct
                        .buffered
                        .write_at(offset + done as u64, &data[done..]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        // One fdatasync covers both descriptors: they share the inode.
        self.file.sync_data()
    }

    #[cfg(target_os = "linux")]
    fn will_read(&self, offset: u64, len: u64) {
        use std::os::unix::io::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: a valid descriptor owned by `self.file`, which outlives
        // the call; the call only reads its arguments.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::unix::io::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: as above.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ancestor_is_synced_deepest_first() {
        let mut seen = Vec::new();
        sync_ancestors(Path::new("/srv/dlm/data/state"), |dir| {
            seen.push(dir.to_path_buf());
            Ok(true)
        })
        .unwrap();
        let want: Vec<PathBuf> = [
            "/srv/dlm/data/state",
            "/srv/dlm/data",
            "/srv/dlm",
            "/srv",
            "/",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn a_failed_sync_stops_the_open() {
        let mut calls = 0;
        let result = sync_ancestors(Path::new("/a/b/c"), |dir| {
            calls += 1;
            if dir == Path::new("/a/b") {
                Err(io::Error::other("EIO"))
            } else {
                Ok(true)
            }
        });
        assert_eq!(result.unwrap_err().to_string(), "EIO");
        assert_eq!(calls, 2, "nothing is synced after the failure");
    }

    #[test]
    fn opening_creates_nested_directories_and_reopens_them() {
        let tmp = tempfile::tempdir().unwrap();
        let nested = tmp.path().join("new").join("data").join("state");
        let dir = FsDir::open(&nested).unwrap();
        assert!(nested.is_dir());
        assert!(dir.list().unwrap().is_empty());
        FsDir::open(&nested).unwrap();
    }
}
