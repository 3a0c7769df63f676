//! The 100 data files `file_0` … `file_99`: open handles, exact writes.
//!
//! Owns: creating missing files, writing committed appends at the exact
//! offsets the core chose (so re-applying after a crash neither loses nor
//! doubles bytes), trimming each file to its committed length at start-up,
//! and syncing before a snapshot makes the log forget the writes.
//! Must not: decide what is committed — the core does.

use std::io;
use std::sync::Arc;

use crate::core::staging::{FileIndex, FileLengths, FileWrite, FILE_COUNT};
use crate::storage::{Dir, DirFile};

/// The open data files.
pub struct DataFiles {
    dir: Arc<dyn Dir>,
    handles: Vec<Box<dyn DirFile>>,
    /// Files written since the last sync.
    dirty: Vec<bool>,
}

impl DataFiles {
    /// Opens every data file in `dir`, creating missing ones, and makes
    /// their names durable.
    ///
    /// The directory is synced at every start, not only when this start
    /// created a file: a process killed after creating files but before the
    /// directory's sync leaves names that the next start lists but that a
    /// power failure could still lose, with every append in them.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(dir: Box<dyn Dir>) -> io::Result<DataFiles> {
        let mut handles = Vec::with_capacity(FILE_COUNT);
        for file in FileIndex::all() {
            handles.push(dir.open(&file.name(), true)?);
        }
        dir.sync()?;
        Ok(DataFiles {
            dir: Arc::from(dir),
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
        self.write_at(write.file.get(), write.offset, &write.data)
    }

    /// Writes `data` at `offset` of `file` and starts its writeback: during a
    /// replay the disk writes it while the replay goes on, and the sync at
    /// the end of recovery waits for little (on Linux; a hint elsewhere).
    fn write_back(&mut self, file: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        let result = self.write_at(file, offset, data);
        self.handles[file].start_writeback(offset, data.len() as u64);
        result
    }

    fn write_at(&mut self, file: usize, offset: u64, data: &[u8]) -> io::Result<()> {
        self.dirty[file] = true;
        self.handles[file].write_at(offset, data)
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

    /// Makes the bytes of every non-empty file durable, whoever wrote them:
    /// a new server takes the files' lengths as committed (its first
    /// snapshot records them), and bytes another program wrote may still be
    /// only in the page cache. Costs a flush per file at each start.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync_all(&mut self) -> io::Result<()> {
        for (handle, dirty) in self.handles.iter_mut().zip(self.dirty.iter_mut()) {
            if handle.size()? > 0 {
                handle.sync_data()?;
            }
            *dirty = false;
        }
        Ok(())
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

    /// Re-applies committed writes during recovery, merging the ones that
    /// continue each other in the same file into one write (a log of small
    /// appends replays with a write per 256 KiB instead of one per append).
    pub fn replay(&mut self) -> Replay<'_> {
        Replay {
            files: self,
            pending: (0..FILE_COUNT).map(|_| (0, Vec::new())).collect(),
        }
    }

    /// The content of one file (tests: the server reads a committed prefix
    /// with [`read_prefix`]).
    ///
    /// # Errors
    /// I/O errors.
    #[cfg(test)]
    pub fn read(&self, file: FileIndex) -> io::Result<Vec<u8>> {
        self.dir.read(&file.name())
    }

    /// The length of one file: every write applied so far, and nothing else
    /// (the writes go at exact offsets, each file only grows while serving).
    ///
    /// # Errors
    /// I/O errors.
    pub fn len(&self, file: FileIndex) -> io::Result<u64> {
        self.handles[file.get()].size()
    }

    /// The directory, for reading outside the writer: a prefix of `len`
    /// bytes read after [`DataFiles::len`] said `len` is what the file held
    /// then, whatever is appended past it meanwhile ([`read_prefix`]).
    pub fn dir(&self) -> Arc<dyn Dir> {
        self.dir.clone()
    }
}

/// The first `len` bytes of data file `file` in `dir`.
///
/// # Errors
/// I/O errors, or a file shorter than `len` (changed outside dlm).
pub fn read_prefix(dir: &dyn Dir, file: FileIndex, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("file too large to read"))?;
    let handle = dir.open(&file.name(), false)?;
    let mut bytes = vec![0; len];
    let mut done = 0;
    while done < len {
        let n = handle.read_at(done as u64, &mut bytes[done..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is shorter than its committed length", file.name()),
            ));
        }
        done += n;
    }
    Ok(bytes)
}

/// Largest merged write during replay.
const REPLAY_CHUNK: usize = 256 << 10;

/// Committed writes being re-applied ([`DataFiles::replay`]). Per file, a
/// write that starts where the pending one ends joins it; any other write
/// first writes out what is pending, so every file sees its writes in log
/// order with the same result as applying them one by one. Call
/// [`Replay::finish`] at the end: what is still pending is written then.
pub struct Replay<'a> {
    files: &'a mut DataFiles,
    /// Per file: the offset and bytes of the merged write not yet made
    /// (none when empty). A file's buffer is kept between its writes: a long
    /// replay reuses up to [`REPLAY_CHUNK`] per file instead of growing a new
    /// one from a single append each time (the growth's copies and the
    /// fresh pages' faults were ~6 % of a 1 M-record start).
    pending: Vec<(u64, Vec<u8>)>,
}

impl Replay<'_> {
    /// Takes one committed write.
    ///
    /// # Errors
    /// I/O errors.
    pub fn apply(&mut self, write: &FileWrite) -> io::Result<()> {
        let i = write.file.get();
        if write.data.len() > REPLAY_CHUNK {
            // Written as it is, after what is pending: a buffer grown to the
            // largest append each file saw (up to 64 MiB, kept for the rest
            // of the replay) could need 100 of them at once, far more memory
            // than the server ever needed to take those appends.
            self.flush(i)?;
            return self.files.write_back(i, write.offset, &write.data);
        }
        let (offset, bytes) = &self.pending[i];
        let joins = *offset + bytes.len() as u64 == write.offset
            && bytes.len() + write.data.len() <= REPLAY_CHUNK;
        if !joins {
            self.flush(i)?;
        }
        let (offset, bytes) = &mut self.pending[i];
        if bytes.is_empty() {
            *offset = write.offset;
            if bytes.capacity() < write.data.len() {
                bytes.reserve_exact(REPLAY_CHUNK);
            }
        }
        bytes.extend_from_slice(&write.data);
        Ok(())
    }

    fn flush(&mut self, i: usize) -> io::Result<()> {
        let (offset, bytes) = &mut self.pending[i];
        if bytes.is_empty() {
            return Ok(());
        }
        let result = self.files.write_back(i, *offset, bytes);
        bytes.clear();
        result
    }

    /// Writes out what is pending.
    ///
    /// # Errors
    /// I/O errors.
    pub fn finish(mut self) -> io::Result<()> {
        for i in 0..FILE_COUNT {
            self.flush(i)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FsDir;
    use bytes::Bytes;

    fn write(file: usize, offset: u64, data: &[u8]) -> FileWrite {
        FileWrite {
            file: FileIndex::parse(&format!("file_{file}")).unwrap(),
            offset,
            data: Bytes::copy_from_slice(data),
        }
    }

    /// A directory whose files count their `sync_data` calls, by name.
    struct Counted {
        inner: FsDir,
        syncs: Arc<std::sync::Mutex<Vec<String>>>,
    }

    struct CountedFile {
        inner: Box<dyn crate::storage::DirFile>,
        name: String,
        syncs: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Dir for Counted {
        fn list(&self) -> io::Result<Vec<String>> {
            self.inner.list()
        }
        fn read(&self, name: &str) -> io::Result<Vec<u8>> {
            self.inner.read(name)
        }
        fn open(&self, name: &str, create: bool) -> io::Result<Box<dyn crate::storage::DirFile>> {
            Ok(Box::new(CountedFile {
                inner: self.inner.open(name, create)?,
                name: name.to_owned(),
                syncs: self.syncs.clone(),
            }))
        }
        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            self.inner.rename(from, to)
        }
        fn remove(&self, name: &str) -> io::Result<()> {
            self.inner.remove(name)
        }
        fn sync(&self) -> io::Result<()> {
            self.inner.sync()
        }
    }

    impl crate::storage::DirFile for CountedFile {
        fn size(&self) -> io::Result<u64> {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read_at(offset, buf)
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.inner.write_at(offset, data)
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&mut self) -> io::Result<()> {
            self.syncs.lock().unwrap().push(self.name.clone());
            self.inner.sync_data()
        }
    }

    /// Bytes another program wrote (the files a new server takes over) are
    /// made durable by `sync_all`; empty files need no flush.
    #[test]
    fn sync_all_flushes_every_file_that_has_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("file_3"), b"written by someone else").unwrap();
        std::fs::write(tmp.path().join("file_99"), b"and here").unwrap();
        let syncs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let dir = Counted {
            inner: FsDir::open(tmp.path()).unwrap(),
            syncs: syncs.clone(),
        };
        let mut files = DataFiles::open(Box::new(dir)).unwrap();
        files.sync_all().unwrap();
        assert_eq!(*syncs.lock().unwrap(), ["file_3", "file_99"]);
        // Nothing is left marked for the next `sync`.
        files.sync().unwrap();
        assert_eq!(syncs.lock().unwrap().len(), 2);
    }

    #[test]
    fn replay_merges_writes_that_continue_each_other_with_the_same_result() {
        // Appends to two files interleaved, a gap, a rewrite of earlier
        // bytes, and more than one chunk's worth in one file.
        let mut writes = Vec::new();
        let mut end = [0u64; 2];
        for n in 0..8000u64 {
            let file = (n % 2) as usize;
            let data = vec![b'a' + (n % 26) as u8; 300 + (n % 7) as usize];
            writes.push(write(file, end[file], &data));
            end[file] += data.len() as u64;
        }
        writes.push(write(0, end[0] + 10, b"after a gap"));
        writes.push(write(1, 5, b"over earlier bytes"));
        writes.push(write(1, end[1], b"and on"));
        // Writes larger than a chunk, after and before small ones.
        let big = vec![b'B'; 3 * REPLAY_CHUNK + 17];
        let at = end[1] + 6;
        writes.push(write(1, at, &big));
        writes.push(write(1, at + big.len() as u64, b"after the big one"));
        writes.push(write(2, 0, b"small first"));
        writes.push(write(2, 11, &big));

        let one_by_one = tempfile::tempdir().unwrap();
        let mut files = DataFiles::open(Box::new(FsDir::open(one_by_one.path()).unwrap())).unwrap();
        for w in &writes {
            files.apply(w).unwrap();
        }
        let merged = tempfile::tempdir().unwrap();
        let mut replayed = DataFiles::open(Box::new(FsDir::open(merged.path()).unwrap())).unwrap();
        let mut replay = replayed.replay();
        for w in &writes {
            replay.apply(w).unwrap();
            // No file's buffer grows past a chunk, whatever it was given.
            assert!(replay
                .pending
                .iter()
                .all(|(_, b)| b.capacity() <= REPLAY_CHUNK));
        }
        replay.finish().unwrap();
        for file in FileIndex::all() {
            assert_eq!(
                replayed.read(file).unwrap(),
                files.read(file).unwrap(),
                "{}",
                file.name()
            );
        }
        assert!(
            files
                .read(FileIndex::parse("file_0").unwrap())
                .unwrap()
                .len()
                > REPLAY_CHUNK
        );
    }
}
