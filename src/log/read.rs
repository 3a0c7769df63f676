//! Reading a log segment forward in chunks, for recovery.
//!
//! Owns: [`SegmentReader`], a [`Source`] over an open file that holds one
//! window of the file in memory: a chunk, or a record larger than a chunk.
//! Recovery checks a segment and later walks its records through it, so a
//! log of any length is recovered in memory for one chunk and the largest
//! record. Must not: know the frame format (that is [`super::frame`]).

use std::io;

use super::frame::Source;
use crate::storage::DirFile;

/// How much of a segment is read at once.
pub const CHUNK: usize = 8 << 20;

/// How far before the asked offset a refilled window starts.
const BACK: u64 = 4096;

/// A segment read through a window of its bytes.
pub struct SegmentReader {
    file: Box<dyn DirFile>,
    size: u64,
    /// Offset of `window[0]` in the file.
    start: u64,
    window: Vec<u8>,
    chunk: usize,
}

impl SegmentReader {
    /// A reader of `file`, as long as the file is now.
    ///
    /// # Errors
    /// I/O errors.
    pub fn new(file: Box<dyn DirFile>) -> io::Result<SegmentReader> {
        SegmentReader::with_chunk(file, CHUNK)
    }

    /// As [`SegmentReader::new`], reading `chunk` bytes at a time.
    ///
    /// # Errors
    /// I/O errors.
    pub fn with_chunk(file: Box<dyn DirFile>, chunk: usize) -> io::Result<SegmentReader> {
        let size = file.size()?;
        Ok(SegmentReader {
            file,
            size,
            start: 0,
            window: Vec::new(),
            chunk: chunk.max(1),
        })
    }

    /// Makes the window hold at least `len` bytes from `at` (fewer only at
    /// the end of the file), and up to [`BACK`] bytes before it: a reader
    /// that steps back a little after a long read (as the search for good
    /// frames after a bad one does: a header, then a payload, then the next
    /// byte's header) finds it in the window instead of reading again.
    fn fill(&mut self, at: u64, len: usize) -> io::Result<()> {
        let from = at.saturating_sub(BACK);
        let want = (at - from) + len.max(self.chunk) as u64;
        let n = want.min(self.size.saturating_sub(from)) as usize;
        // Only growth is zero-filled; the read overwrites the rest.
        self.window.resize(n, 0);
        let read = self.file.read_at(from, &mut self.window);
        let read = read.inspect_err(|_| self.window.clear())?;
        if read < n {
            self.window.clear();
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "file ended at {} while recovery read it",
                    from + read as u64
                ),
            ));
        }
        self.start = from;
        // A reader goes forward: let the disk read the next chunk while
        // this one is worked on (a cold start reads the whole log).
        let end = from + n as u64;
        if end < self.size {
            self.file.will_read(end, self.chunk as u64);
        }
        Ok(())
    }

    /// The window's bytes from `at` on (filling it from `at` if `at` is not
    /// in it); empty at the end of the file.
    fn from(&mut self, at: u64) -> io::Result<&[u8]> {
        let end = self.start + self.window.len() as u64;
        if at < self.start || at >= end {
            self.fill(at, 0)?;
        }
        Ok(&self.window[(at - self.start) as usize..])
    }
}

impl Source for SegmentReader {
    type Error = io::Error;

    fn size(&self) -> u64 {
        self.size
    }

    fn get(&mut self, at: u64, len: usize) -> io::Result<&[u8]> {
        // The file may have shrunk since a caller learned its size.
        if at.checked_add(len as u64).is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{len} bytes at offset {at} asked of a file of {} bytes",
                    self.size
                ),
            ));
        }
        let end = self.start + self.window.len() as u64;
        if at < self.start || at + len as u64 > end {
            self.fill(at, len)?;
        }
        let from = (at - self.start) as usize;
        Ok(&self.window[from..from + len])
    }

    fn dirty_end(&mut self, from: u64) -> io::Result<u64> {
        let mut dirty = from;
        let mut at = from;
        while at < self.size {
            let bytes = self.from(at)?;
            if let Some(i) = bytes.iter().rposition(|b| *b != 0) {
                dirty = at + i as u64 + 1;
            }
            at += bytes.len() as u64;
        }
        Ok(dirty)
    }

    fn zero_from(&mut self, from: u64) -> io::Result<bool> {
        let mut at = from;
        while at < self.size {
            let bytes = self.from(at)?;
            if bytes.iter().any(|b| *b != 0) {
                return Ok(false);
            }
            at += bytes.len() as u64;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::frame::{self, ScanEnd};
    use crate::storage::{Dir, FsDir};

    /// Logs of every kind the checker tells apart: clean, zeros ahead,
    /// torn tails, damage in the middle, a record larger than a chunk.
    fn cases() -> Vec<Vec<u8>> {
        let mut clean = Vec::new();
        for p in [&b"one"[..], &[7u8; 300][..], b"x", &[9u8; 70][..]] {
            frame::encode(p, clean.len() as u64, &mut clean);
        }
        let mut cases = vec![Vec::new(), vec![0; 100], clean.clone()];
        let mut ahead = clean.clone();
        ahead.resize(clean.len() + 500, 0);
        cases.push(ahead.clone());
        for cut in [1, 5, 9, 20, clean.len() - 1] {
            let mut torn = clean[..cut].to_vec();
            torn.resize(cut + 200, 0);
            cases.push(torn);
        }
        for flip in [0, 3, 6, 11, 320, clean.len() - 2] {
            let mut bad = ahead.clone();
            bad[flip] ^= 0x5a;
            cases.push(bad.clone());
            bad[clean.len() + 400] = 1;
            cases.push(bad);
        }
        let mut late = ahead;
        late[clean.len() + 499] = 3;
        cases.push(late);
        cases
    }

    #[test]
    fn reading_in_chunks_finds_what_checking_in_memory_finds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = FsDir::open(tmp.path()).unwrap();
        for (i, bytes) in cases().iter().enumerate() {
            let (valid, end) = frame::check(bytes);
            let dirty = valid + frame::dirty_end(&bytes[valid as usize..]);
            let payloads: Vec<(u64, Vec<u8>)> = frame::payloads(&bytes[..valid as usize])
                .map(|(o, p)| (o, p.to_vec()))
                .collect();
            let name = format!("case-{i}");
            dir.open(&name, true).unwrap().write_at(0, bytes).unwrap();
            for chunk in [1, 3, 8, 13, 64, 4096] {
                let what = format!("case {i}, chunk {chunk}");
                let file = dir.open(&name, false).unwrap();
                let mut reader = SegmentReader::with_chunk(file, chunk).unwrap();
                let (r_valid, r_end) = frame::check_source(&mut reader).unwrap();
                assert_eq!((r_valid, &r_end), (valid, &end), "{what}");
                assert_eq!(reader.dirty_end(valid).unwrap(), dirty, "{what}");
                let mut walked = Vec::new();
                frame::each_payload(
                    &mut reader,
                    valid,
                    |e| e,
                    |at| panic!("{what}: frame at {at} changed"),
                    |o, p| {
                        walked.push((o, p.to_vec()));
                        Ok(())
                    },
                )
                .unwrap();
                assert_eq!(walked, payloads, "{what}");
            }
        }
        // The cases reach every ending.
        let ends: Vec<ScanEnd> = cases().iter().map(|b| frame::check(b).1).collect();
        assert!(ends.contains(&ScanEnd::Clean) && ends.contains(&ScanEnd::TornTail));
        assert!(ends.iter().any(|e| matches!(e, ScanEnd::Corrupt { .. })));
    }

    #[test]
    fn a_file_that_shrinks_while_it_is_read_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = FsDir::open(tmp.path()).unwrap();
        dir.open("f", true)
            .unwrap()
            .write_at(0, &[1u8; 100])
            .unwrap();
        let mut reader = SegmentReader::with_chunk(dir.open("f", false).unwrap(), 10).unwrap();
        assert!(!reader.zero_from(0).unwrap());
        dir.open("f", false).unwrap().set_len(50).unwrap();
        let error = reader.get(60, 10).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        // A reader opened after the shrink, asked for what the check saw.
        let mut reader = SegmentReader::with_chunk(dir.open("f", false).unwrap(), 10).unwrap();
        let error = reader.get(45, 10).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        assert!(reader.get(u64::MAX - 3, 10).is_err());
    }

    /// What the second pass finds when the bytes changed after the check.
    fn walk_after(bytes: &[u8], valid: u64) -> Result<Vec<u64>, String> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = FsDir::open(tmp.path()).unwrap();
        dir.open("f", true).unwrap().write_at(0, bytes).unwrap();
        let mut reader = SegmentReader::with_chunk(dir.open("f", false).unwrap(), 16).unwrap();
        let mut offsets = Vec::new();
        frame::each_payload(
            &mut reader,
            valid,
            |e| format!("read: {e}"),
            |at| format!("changed at {at}"),
            |o, _| {
                offsets.push(o);
                Ok(())
            },
        )
        .map(|()| offsets)
    }

    #[test]
    fn the_second_pass_refuses_frames_that_changed_since_the_check() {
        let mut log = Vec::new();
        for p in [&b"alpha"[..], &[5u8; 40][..], b"omega"] {
            frame::encode(p, log.len() as u64, &mut log);
        }
        let valid = frame::check(&log).0;
        assert_eq!(walk_after(&log, valid), Ok(vec![0, 21, 77]));
        // A payload byte: its checksum.
        let mut bad = log.clone();
        bad[40] ^= 1;
        assert_eq!(walk_after(&bad, valid), Err("changed at 21".to_owned()));
        // A length pointing past what was checked, or zero.
        let mut bad = log.clone();
        bad[21] = 200;
        assert_eq!(walk_after(&bad, valid), Err("changed at 21".to_owned()));
        let mut bad = log.clone();
        bad[21] = 0;
        assert_eq!(walk_after(&bad, valid), Err("changed at 21".to_owned()));
        // The walk must end exactly at `valid`: a frame running past it, or
        // too few bytes left for a header.
        assert_eq!(walk_after(&log, valid - 2), Err("changed at 77".to_owned()));
        assert_eq!(walk_after(&log, 80), Err("changed at 77".to_owned()));
        // The file shrank: a read error, not a panic.
        assert!(walk_after(&log[..40], valid)
            .unwrap_err()
            .starts_with("read:"));
    }
}
