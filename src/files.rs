//! The 100 data files `file_0` … `file_99`: open handles, exact writes.
//!
//! Owns: creating missing files, writing committed appends at the exact
//! offsets the core chose (so re-applying after a crash neither loses nor
//! doubles bytes), trimming each file to its committed length at start-up,
//! and syncing before a snapshot makes the log forget the writes.
//! Must not: decide what is committed — the core does.

use std::io;

use crate::core::staging::{FileIndex, FileLengths, FileWrite, FILE_COUNT};
use crate::storage::{Dir, DirFile};

/// The open data files.
pub struct DataFiles {
    dir: Box<dyn Dir>,
    handles: Vec<Box<dyn DirFile>>,
    /// Files written since the last sync.
    dirty: Vec<bool>,
}

impl DataFiles {
    /// Opens every data file in `dir`, creating missing ones (durably).
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: Box<dyn Dir>) -> io::Result<DataFiles> {
        let existing = dir.list()?;
        let mut created = false;
        let mut handles = Vec::with_capacity(FILE_COUNT);
        for file in FileIndex::all() {
            let name = file.name();
            created |= !existing.contains(&name);
            handles.push(dir.open(&name, true)?);
        }
        if created {
            dir.sync()?;
        }
        Ok(DataFiles {
            dir,
            handles,
            dirty: vec![false; FILE_COUNT],
        })
    }

    /// Current on-disk lengths, used as the committed lengths of a new server.
    ///
    /// # Errors
    /// I/O errors.
    pub fn lengths(&self) -> io::Result<Vec<u64>> {
        self.handles.iter().map(|h| h.size()).collect()
    }

    /// Writes one committed append at its offset.
    ///
    /// # Errors
    /// I/O errors.
    pub fn apply(&mut self, write: &FileWrite) -> io::Result<()> {
        let i = write.file.get();
        self.dirty[i] = true;
        self.handles[i].write_at(write.offset, &write.data)
    }

    /// Makes every file exactly its committed length: bytes past it were never
    /// committed. A file shorter than committed was damaged outside dlm; it is
    /// extended with zeros and reported.
    ///
    /// # Errors
    /// I/O errors.
    pub fn trim_to(&mut self, lengths: &FileLengths) -> io::Result<Vec<FileIndex>> {
        let mut short = Vec::new();
        for file in FileIndex::all() {
            let want = lengths.get(file);
            let handle = &mut self.handles[file.get()];
            let have = handle.size()?;
            if have != want {
                if have < want {
                    short.push(file);
                }
                handle.set_len(want)?;
                self.dirty[file.get()] = true;
            }
        }
        Ok(short)
    }

    /// Makes every write so far durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&mut self) -> io::Result<()> {
        for (handle, dirty) in self.handles.iter_mut().zip(self.dirty.iter_mut()) {
            if *dirty {
                handle.sync_data()?;
                *dirty = false;
            }
        }
        Ok(())
    }

    /// The content of one file.
    ///
    /// # Errors
    /// I/O errors.
    pub fn read(&self, file: FileIndex) -> io::Result<Vec<u8>> {
        self.dir.read(&file.name())
    }
}
