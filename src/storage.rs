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
}

/// A [`Dir`] on the local filesystem.
#[derive(Debug, Clone)]
pub struct FsDir {
    path: PathBuf,
}

impl FsDir {
    /// Opens (creating if needed) the directory at `path`.
    ///
    /// # Errors
    /// I/O errors creating the directory.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FsDir> {
        let path = path.as_ref().to_path_buf();
        fs::create_dir_all(&path)?;
        Ok(FsDir { path })
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
        Ok(Box::new(FsFile { file }))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.path.join(from), self.path.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path.join(name))
    }

    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn describe(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }
}

struct FsFile {
    file: File,
}

impl DirFile for FsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}
