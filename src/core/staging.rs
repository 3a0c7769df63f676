//! Appends staged under a grant of the default lock, and the committed length
//! of each of the 100 files.
//!
//! Owns: file-name validation (`file_0` … `file_99`, nothing else), the
//! per-grant staging list, and turning a commit into file writes at exact
//! offsets. Must not: touch a file. Writes at explicit offsets are what make
//! re-applying a committed release after a crash exact (no lost, no doubled bytes).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// How many data files the server has.
pub const FILE_COUNT: usize = 100;

/// A validated data file number, `0..FILE_COUNT`.
/// Decoding checks the range too: a record or snapshot read from disk
/// cannot name a file that is not there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8")]
pub struct FileIndex(u8);

impl TryFrom<u8> for FileIndex {
    type Error = String;

    fn try_from(n: u8) -> Result<FileIndex, String> {
        if usize::from(n) < FILE_COUNT {
            Ok(FileIndex(n))
        } else {
            Err(format!("file index {n} is not below {FILE_COUNT}"))
        }
    }
}

impl FileIndex {
    /// Parses a file name of the exact form `file_N`, N in 0..100 without
    /// leading zeros. Anything else (paths, other names) is refused, so no
    /// name can leave the data directory.
    ///
    /// # Errors
    /// A one-line reason when the name is not a data file's.
    pub fn parse(name: &str) -> Result<FileIndex, String> {
        let shown: String = name.chars().take(40).collect();
        let Some(digits) = name.strip_prefix("file_") else {
            return Err(format!(
                "invalid file name {shown:?}: expected file_0 … file_99"
            ));
        };
        let canonical = !digits.is_empty()
            && digits.len() <= 2
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !(digits.len() > 1 && digits.starts_with('0'));
        match digits.parse::<usize>() {
            Ok(n) if canonical && n < FILE_COUNT => Ok(FileIndex(n as u8)),
            _ => Err(format!(
                "invalid file name {shown:?}: expected file_0 … file_99"
            )),
        }
    }

    /// The index as a number.
    pub fn get(self) -> usize {
        self.0 as usize
    }

    /// The file's name, `file_N`.
    pub fn name(self) -> String {
        format!("file_{}", self.0)
    }

    /// Every data file.
    pub fn all() -> impl Iterator<Item = FileIndex> {
        (0..FILE_COUNT as u8).map(FileIndex)
    }
}

/// One append staged under a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedAppend {
    pub file: FileIndex,
    pub content: Bytes,
}

/// A write the driver must apply to a data file: `data` at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWrite {
    pub file: FileIndex,
    pub offset: u64,
    pub data: Bytes,
}

/// Committed length of every data file: where the next commit lands.
/// Decoding checks that there is one length per file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u64>")]
pub struct FileLengths(Vec<u64>);

impl TryFrom<Vec<u64>> for FileLengths {
    type Error = String;

    fn try_from(lengths: Vec<u64>) -> Result<FileLengths, String> {
        let count = lengths.len();
        FileLengths::from_vec(lengths)
            .ok_or_else(|| format!("{count} file lengths; expected {FILE_COUNT}"))
    }
}

impl Default for FileLengths {
    fn default() -> Self {
        FileLengths(vec![0; FILE_COUNT])
    }
}

impl FileLengths {
    /// Lengths as found on disk when there is no state yet.
    pub fn from_vec(lengths: Vec<u64>) -> Option<FileLengths> {
        (lengths.len() == FILE_COUNT).then_some(FileLengths(lengths))
    }

    /// The committed length of `file`.
    pub fn get(&self, file: FileIndex) -> u64 {
        self.0[file.get()]
    }

    /// Turns the staged appends of a released grant into writes, in order,
    /// advancing the committed lengths.
    pub fn commit(&mut self, staged: Vec<StagedAppend>, writes: &mut Vec<FileWrite>) {
        for append in staged {
            let offset = self.0[append.file.get()];
            self.0[append.file.get()] = offset + append.content.len() as u64;
            writes.push(FileWrite {
                file: append.file,
                offset,
                data: append.content,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_data_file_names_parse() {
        assert_eq!(FileIndex::parse("file_0").unwrap().get(), 0);
        assert_eq!(FileIndex::parse("file_99").unwrap().get(), 99);
        let long = "x".repeat(5000);
        for bad in [
            "",
            "file_",
            "file_100",
            "file_007",
            "file_00",
            "../x",
            "/etc/passwd",
            "file_0/../../x",
            "file_-1",
            "file_+1",
            "file_1 ",
            "FILE_1",
            "file_1\0",
            long.as_str(),
        ] {
            let err = FileIndex::parse(bad).unwrap_err();
            assert!(err.len() < 120, "{err}");
        }
    }

    #[test]
    fn commit_advances_offsets_in_order() {
        let mut lengths = FileLengths::default();
        let f = FileIndex::parse("file_3").unwrap();
        let mut writes = Vec::new();
        let staged = vec![
            StagedAppend {
                file: f,
                content: Bytes::from_static(b"ab"),
            },
            StagedAppend {
                file: f,
                content: Bytes::from_static(b"c"),
            },
        ];
        lengths.commit(staged, &mut writes);
        assert_eq!(
            writes.iter().map(|w| w.offset).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(lengths.get(f), 3);
    }

    #[test]
    fn decoding_refuses_a_file_index_or_lengths_that_cannot_be() {
        let good = postcard::to_allocvec(&FileIndex::parse("file_99").unwrap()).unwrap();
        assert_eq!(
            good,
            postcard::to_allocvec(&99u8).unwrap(),
            "the encoding is a u8"
        );
        assert_eq!(postcard::from_bytes::<FileIndex>(&good).unwrap().get(), 99);
        let bad = postcard::to_allocvec(&100u8).unwrap();
        assert!(postcard::from_bytes::<FileIndex>(&bad).is_err());

        let lengths = postcard::to_allocvec(&FileLengths::default()).unwrap();
        assert_eq!(
            postcard::from_bytes::<FileLengths>(&lengths).unwrap(),
            FileLengths::default()
        );
        let short = postcard::to_allocvec(&vec![0u64; FILE_COUNT - 1]).unwrap();
        assert!(postcard::from_bytes::<FileLengths>(&short).is_err());
    }
}
