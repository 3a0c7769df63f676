//! Framing of log records: `[length u32 LE][crc32c u32 LE][payload]`.
//!
//! Owns: encoding a frame and scanning a byte buffer into payloads, telling a
//! torn tail (a crash cut the last write short) from corruption in the middle.
//! Must not: know what a payload means.

/// Bytes of a frame header.
pub const HEADER: usize = 8;

/// Largest payload accepted when scanning; anything larger is corruption.
pub const MAX_PAYLOAD: usize = 256 << 20;

/// Appends one framed `payload` to `out`.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What scanning a buffer found.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan<'a> {
    /// Every good frame's payload with its offset, in order.
    pub frames: Vec<(u64, &'a [u8])>,
    /// Where good data ends.
    pub valid_len: u64,
    /// How the scan ended.
    pub end: ScanEnd,
}

/// How a scan ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// Exactly at the end of the buffer.
    Clean,
    /// The last frame is incomplete or fails its checksum and nothing follows
    /// it: a write cut short by a crash. Safe to truncate at `valid_len`.
    TornTail,
    /// A bad frame with data after it: the log is damaged at `offset`.
    Corrupt { offset: u64, reason: String },
}

/// Splits `buf` into frames.
pub fn scan(buf: &[u8]) -> Scan<'_> {
    let mut frames = Vec::new();
    let mut at = 0usize;
    let end = loop {
        let rest = &buf[at..];
        if rest.is_empty() {
            break ScanEnd::Clean;
        }
        if rest.len() < HEADER {
            break ScanEnd::TornTail;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len > MAX_PAYLOAD {
            break ScanEnd::Corrupt {
                offset: at as u64,
                reason: format!("record length {len} is impossible"),
            };
        }
        if rest.len() < HEADER + len {
            break ScanEnd::TornTail;
        }
        let payload = &rest[HEADER..HEADER + len];
        if crc32c::crc32c(payload) != crc {
            break if rest.len() == HEADER + len {
                ScanEnd::TornTail
            } else {
                ScanEnd::Corrupt {
                    offset: at as u64,
                    reason: "checksum mismatch".to_owned(),
                }
            };
        }
        frames.push((at as u64, payload));
        at += HEADER + len;
    };
    Scan {
        frames,
        valid_len: at as u64,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode(p, &mut out);
        }
        out
    }

    #[test]
    fn round_trip() {
        let buf = log_of(&[b"one", b"", b"three"]);
        let scan = scan(&buf);
        assert_eq!(scan.end, ScanEnd::Clean);
        let payloads: Vec<&[u8]> = scan.frames.iter().map(|f| f.1).collect();
        assert_eq!(payloads, vec![&b"one"[..], b"", b"three"]);
    }

    #[test]
    fn every_truncation_is_a_torn_tail() {
        let buf = log_of(&[b"alpha", b"beta"]);
        let first = HEADER + 5;
        for cut in 0..buf.len() {
            let s = scan(&buf[..cut]);
            assert!(
                matches!(s.end, ScanEnd::Clean | ScanEnd::TornTail),
                "cut {cut}: {:?}",
                s.end
            );
            let expect = if cut >= first { first } else { 0 };
            assert_eq!(s.valid_len as usize, expect, "cut at {cut}");
        }
    }

    #[test]
    fn damage_in_the_middle_is_corruption_with_offset() {
        let mut buf = log_of(&[b"alpha", b"beta", b"gamma"]);
        let second = HEADER + 5;
        buf[second + HEADER + 1] ^= 0xff;
        let s = scan(&buf);
        assert_eq!(s.frames.len(), 1);
        assert!(matches!(s.end, ScanEnd::Corrupt { offset, .. } if offset == second as u64));
    }

    #[test]
    fn damage_in_the_last_record_is_a_torn_tail() {
        let mut buf = log_of(&[b"alpha", b"beta"]);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert_eq!(scan(&buf).end, ScanEnd::TornTail);
    }
}
