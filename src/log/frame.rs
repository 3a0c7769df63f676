//! Framing of log records:
//! `[length u32 LE][crc32c u32 LE][synced u64 LE][payload]`.
//!
//! Owns: encoding a frame and scanning a byte buffer into payloads, telling a
//! torn tail (a crash cut the last write short) from corruption in the middle.
//! Must not: know what a payload means.
//!
//! `synced` is where the log's durable data ended when the record was added:
//! every record of the write in flight at a crash (everything logged since
//! the last sync) carries the same value, and it is at or before every byte
//! of that write. A record that a later sync made durable before the next
//! write began carries a larger one. So when a bad frame at `at` has good
//! frames after it (a device that writes sectors in any order can keep the
//! end of an unsynced write and lose its start), they are that unsynced
//! write's if their `synced` is at or before `at`: a torn tail, cut at `at`
//! (for a failed checksum, only if a sector of the bad frame reads as
//! never written: all zeros). One with `synced` past `at` was written after
//! `at` was durable: the bad frame is damage. The checksum covers `synced`
//! and the payload, not the length: a bad frame that would be cut as torn
//! but checks at another length than its header gives is a whole record
//! with a damaged length (the last durable record's, reaching the zeros
//! ahead, say), and is refused as damage instead.
//!
//! Log segments are preallocated with zeros (an fdatasync of blocks that
//! already exist need not update the file's size, which makes every group
//! commit cheaper), so the data ends where a header's length is zero and
//! only zeros follow. Payloads are never empty: a zero length always means
//! "end".

/// Bytes of a frame header.
pub const HEADER: usize = 16;

/// Largest payload accepted when scanning; anything larger is corruption.
pub const MAX_PAYLOAD: usize = 256 << 20;

/// Appends one framed `payload` to `out`, logged when the log's durable
/// data ended at `synced` (0 for a snapshot's one frame). The payload must
/// not be empty (a zero length marks the end of the data).
pub fn encode(payload: &[u8], synced: u64, out: &mut Vec<u8>) {
    debug_assert!(
        !payload.is_empty(),
        "an empty frame reads as the end of the log"
    );
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&frame_crc(synced, payload).to_le_bytes());
    out.extend_from_slice(&synced.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The checksum of a frame: over its `synced` field and its payload.
fn frame_crc(synced: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&synced.to_le_bytes()), payload)
}

/// Whether `payload` is what `header` describes (its checksum).
fn checks(header: &[u8], payload: &[u8]) -> bool {
    frame_crc(synced(header), payload) == checksum(header)
}

/// The payload of a buffer that holds exactly one frame (a snapshot file),
/// of any length a header can give: [`MAX_PAYLOAD`] bounds the records of a
/// log, not a snapshot, which may be larger (many held locks, 100,000
/// remembered answers, staged appends).
///
/// # Errors
/// Why the buffer is not one whole frame.
pub fn whole(buf: &[u8]) -> Result<&[u8], String> {
    let Some((header, payload)) = buf.split_at_checked(HEADER) else {
        return Err(format!("{} bytes, less than a header", buf.len()));
    };
    let len = length(header);
    if len == 0 || len != payload.len() {
        return Err(format!(
            "the header gives {len} bytes, and {} follow it",
            payload.len()
        ));
    }
    if !checks(header, payload) {
        return Err("checksum mismatch".to_owned());
    }
    Ok(payload)
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
    /// At the end of the buffer, or where only zeros (preallocated space)
    /// follow.
    Clean,
    /// A bad frame (incomplete, a zero length with data after it, or a
    /// failed checksum) where a crash could have torn the last unsynced
    /// write: only zeros after it, or only frames of that same write with,
    /// for a failed checksum, a sector of it that reads as never written.
    /// Safe to cut at `valid_len`.
    TornTail,
    /// A bad frame that no crash explains (a frame logged after it was
    /// durable follows it, its checksum fails with data after it and no
    /// lost sector, or it checks at another length than its header gives):
    /// the log is damaged at `offset`.
    Corrupt { offset: u64, reason: String },
}

/// The payload length in a frame header.
fn length(header: &[u8]) -> usize {
    u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize
}

/// The checksum in a frame header.
fn checksum(header: &[u8]) -> u32 {
    u32::from_le_bytes([header[4], header[5], header[6], header[7]])
}

/// Where the log's durable data ended when the frame was logged.
fn synced(header: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&header[8..16]);
    u64::from_le_bytes(bytes)
}

/// The payloads of `valid`, with their offsets: a prefix that [`check`]
/// (or [`scan`]) accepted (its `valid_len` bytes), walked by its lengths
/// alone (the checksums were checked then).
pub fn payloads(valid: &[u8]) -> impl Iterator<Item = (u64, &[u8])> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = length(valid.get(at..at + HEADER)?);
        let payload = valid.get(at + HEADER..at + HEADER + len)?;
        debug_assert!(len > 0, "scan never accepts an empty frame");
        let offset = at as u64;
        at += HEADER + len;
        Some((offset, payload))
    })
}

/// Splits `buf` into frames.
pub fn scan(buf: &[u8]) -> Scan<'_> {
    let (valid_len, end) = check(buf);
    Scan {
        frames: payloads(&buf[..valid_len as usize]).collect(),
        valid_len,
        end,
    }
}

/// [`scan`] without collecting the frames: where good data ends, and how
/// the scan ended.
pub fn check(buf: &[u8]) -> (u64, ScanEnd) {
    match check_source(&mut Bytes(buf)) {
        Ok(checked) => checked,
        Err(never) => match never {},
    }
}

/// Bytes of a segment, read forward: a buffer in memory, or a file read in
/// chunks (so that checking and replaying a log of any length needs memory
/// for a chunk and the largest record, not for the whole log).
pub trait Source {
    /// What reading fails with.
    type Error;
    /// Length in bytes.
    fn size(&self) -> u64;
    /// The `len` bytes at `at`; `at + len` must not pass [`Source::size`].
    ///
    /// # Errors
    /// Read errors.
    fn get(&mut self, at: u64, len: usize) -> Result<&[u8], Self::Error>;
    /// Where the last non-zero byte at or after `from` ends; `from` when
    /// there is none.
    ///
    /// # Errors
    /// Read errors.
    fn dirty_end(&mut self, from: u64) -> Result<u64, Self::Error>;
    /// True when every byte at or after `from` is zero (stops reading at the
    /// first that is not).
    ///
    /// # Errors
    /// Read errors.
    fn zero_from(&mut self, from: u64) -> Result<bool, Self::Error>;
}

/// A [`Source`] over a buffer in memory.
pub struct Bytes<'a>(pub &'a [u8]);

impl Source for Bytes<'_> {
    type Error = std::convert::Infallible;

    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn get(&mut self, at: u64, len: usize) -> Result<&[u8], Self::Error> {
        Ok(&self.0[at as usize..at as usize + len])
    }

    fn dirty_end(&mut self, from: u64) -> Result<u64, Self::Error> {
        Ok(from + dirty_end(&self.0[from as usize..]))
    }

    fn zero_from(&mut self, from: u64) -> Result<bool, Self::Error> {
        Ok(all_zero(&self.0[from as usize..]))
    }
}

/// [`check`] over any [`Source`].
///
/// # Errors
/// The source's read errors.
pub fn check_source<S: Source>(src: &mut S) -> Result<(u64, ScanEnd), S::Error> {
    check_source_each(src, |_| {})
}

/// [`check_source`], handing each good frame's payload to `each` as it goes
/// (recovery counts what the records hold while it checks them). A payload
/// handed on may still be followed by damage that refuses the whole source.
///
/// # Errors
/// Read errors.
pub fn check_source_each<S: Source>(
    src: &mut S,
    mut each: impl FnMut(&[u8]),
) -> Result<(u64, ScanEnd), S::Error> {
    let size = src.size();
    let mut at = 0u64;
    let end = loop {
        if src.zero_from(at)? {
            break ScanEnd::Clean;
        }
        if size - at < HEADER as u64 {
            break ScanEnd::TornTail;
        }
        let header: [u8; HEADER] = src.get(at, HEADER)?.try_into().unwrap_or([0; HEADER]);
        let len = length(&header);
        if len == 0 {
            // The end marker, but data follows: damage, or the leftovers of
            // a torn tail whose zeroing a crash interrupted (the zeros went
            // down in another order than they were written).
            break torn_or_damaged(src, at, "a zero length")?;
        }
        if len > MAX_PAYLOAD {
            break ScanEnd::Corrupt {
                offset: at,
                reason: format!("record length {len} is impossible"),
            };
        }
        let next = at + (HEADER + len) as u64;
        if size < next {
            let end = torn_or_damaged(src, at, "a length past the end of the file")?;
            break damaged_length(src, at, &header, end)?;
        }
        if !checks(&header, src.get(at + HEADER as u64, len)?) {
            // Data after it proves nothing by itself: a device may have
            // kept later sectors of the write and lost this one's.
            let end = torn_or_damaged(src, at, "a checksum mismatch")?;
            // But a lost sector reads as it was before the write: zeros,
            // for every byte of a frame that was not yet on the disk. A
            // bad frame with data after it and no such sector is damage
            // (a changed bit, say), not a write torn by sectors.
            if end == ScanEnd::TornTail
                && !src.zero_from(next)?
                && !has_unwritten_sector(src.get(at, HEADER + len)?, at)
            {
                break ScanEnd::Corrupt {
                    offset: at,
                    reason: format!(
                        "a checksum mismatch with data after it, and no {UNIT}-byte part of the \
                         record that reads as never written"
                    ),
                };
            }
            break damaged_length(src, at, &header, end)?;
        }
        each(src.get(at + HEADER as u64, len)?);
        at = next;
    };
    Ok((at, end))
}

/// What a bad frame at `at` (`bad`: a bad checksum, a length running past
/// the end of the file, or a zero length with data after it) means: a write
/// cut short, or damage.
///
/// The length field is not covered by the checksum. A damaged length that
/// points past the end of the file, or over later records into the zeros
/// ahead, would look like a write cut short, and cutting there would drop
/// every record after it. A crash leaves after the bad frame only bytes of
/// the write that was in flight (cut short, or with only some of its
/// sectors down) or of a zeroing that recovery had not finished: every
/// whole frame among them was logged when the durable data ended at or
/// before `at` (see the module's note on `synced`). So if a complete frame
/// with a good checksum and `synced` past `at` starts anywhere after `at`,
/// the frame at `at` is damage; frames of the unsynced write itself are
/// cut with it. A candidate may end up to [`SLACK`] bytes past the last
/// non-zero byte: records often end in zero bytes.
///
/// A torn tail is refused when 16 bytes inside it pass as a frame of a
/// later write: random bytes with a chance of 2^-32, but a client's
/// appended bytes may hold a well-formed frame on purpose. The start then
/// needs an operator; no record is ever dropped.
///
/// Damage inside the last write that was made durable, with nothing logged
/// after it, looks like that write torn by a crash: a bad checksum is cut
/// as torn only if the record also has a sector that reads as never
/// written (see `has_unwritten_sector`), or nothing but zeros after it
/// (a write cut short), and, as for a length past the end, only if the
/// record does not check at another length (see `damaged_length`); a zero
/// length is cut (as a log that trusts a torn tail must).
///
/// Every byte position is a candidate, and each whose length fits costs a
/// checksum over that length. The checksums are bounded in total (the
/// region's length 16 times, plus 256 MiB); past the bound (bytes that make
/// many long plausible lengths) the frame is refused as damage too, rather
/// than a start taking minutes or a record being dropped unseen.
fn torn_or_damaged<S: Source>(src: &mut S, at: u64, bad: &str) -> Result<ScanEnd, S::Error> {
    let dirty = src.dirty_end(at)?;
    let end = dirty.saturating_add(SLACK).min(src.size());
    let mut budget = (end - at).saturating_mul(16).saturating_add(256 << 20);
    let mut p = at + 1;
    while dirty.saturating_sub(p) >= 1 && end - p >= HEADER as u64 {
        let header: [u8; HEADER] = src.get(p, HEADER)?.try_into().unwrap_or([0; HEADER]);
        let len = length(&header);
        // A frame of the unsynced write itself (`synced` at or before
        // `at`) goes with it; only one logged later makes `at` damage.
        if len > 0 && len <= MAX_PAYLOAD && (HEADER + len) as u64 <= end - p && synced(&header) > at
        {
            let Some(left) = budget.checked_sub(len as u64) else {
                return Ok(ScanEnd::Corrupt {
                    offset: at,
                    reason: "a bad record, followed by too much that could be records to tell a \
                             torn write from damage"
                        .to_owned(),
                });
            };
            budget = left;
            if checks(&header, src.get(p + HEADER as u64, len)?) {
                return Ok(ScanEnd::Corrupt {
                    offset: at,
                    reason: format!(
                        "{bad}, with a record logged after it was durable at offset {p}"
                    ),
                });
            }
        }
        p += 1;
    }
    Ok(ScanEnd::TornTail)
}

/// `end`, what a bad frame at `at` with a non-zero length was found to
/// mean, unless it is a torn tail and the frame checks at another length
/// than its header gives: then the frame is a whole record whose length
/// field was damaged (the last durable record's, say, reaching the zeros
/// ahead), and cutting it would drop an acknowledged record.
///
/// A write torn by a crash does not check at another length but by chance
/// (2^-32 for each length tried, one per byte up to the last non-zero one
/// after `at`, plus [`SLACK`]); such a chance refuses the start, it drops
/// nothing. The checksum is worked out byte by byte over those bytes (at
/// most once per start, on the bad-frame path).
fn damaged_length<S: Source>(
    src: &mut S,
    at: u64,
    header: &[u8; HEADER],
    end: ScanEnd,
) -> Result<ScanEnd, S::Error> {
    if end != ScanEnd::TornTail {
        return Ok(end);
    }
    let stated = length(header);
    let start = at + HEADER as u64;
    let stop = src
        .dirty_end(at)?
        .saturating_add(SLACK)
        .min(src.size())
        .min(start + MAX_PAYLOAD as u64);
    let Some(most) = stop.checked_sub(start).filter(|n| *n > 0) else {
        return Ok(end);
    };
    let want = checksum(header);
    let mut crc = crc32c::crc32c(&synced(header).to_le_bytes());
    let payload = src.get(start, most as usize)?;
    for (i, byte) in payload.iter().enumerate() {
        crc = crc32c::crc32c_append(crc, std::slice::from_ref(byte));
        let len = i + 1;
        if crc == want && len != stated {
            return Ok(ScanEnd::Corrupt {
                offset: at,
                reason: format!(
                    "the record's header gives {stated} bytes, but it checks with {len}: \
                     its length is damaged"
                ),
            });
        }
    }
    Ok(end)
}

/// Bytes of the smallest unit a device writes whole or not at all, as far
/// as telling a torn write goes: every sector size in use (512 bytes, 4 KiB)
/// is a multiple, aligned the same way (the simulated disk's sectors are
/// this size). A write torn by sectors loses whole units of it.
pub const UNIT: u64 = 64;

/// Whether some `UNIT`-aligned part of `frame` (whose first byte is at
/// `at` in its segment) is all zeros: what a lost sector of a write into
/// zero-filled space leaves. The length field is never zero here, so the
/// unit holding the header's start is never all zeros; a zero run that a
/// record holds on purpose can pass for a lost sector (damage beside it is
/// then cut as a torn write, as without this test).
fn has_unwritten_sector(frame: &[u8], at: u64) -> bool {
    let mut from = 0usize;
    while from < frame.len() {
        let unit_end = ((at + from as u64) / UNIT + 1) * UNIT;
        let to = (unit_end - at).min(frame.len() as u64) as usize;
        if frame[from..to].iter().all(|&b| b == 0) {
            return true;
        }
        from = to;
    }
    false
}

/// How far past the last non-zero byte a frame found after a bad one may
/// end (its last bytes may be zeros).
const SLACK: u64 = 4096;

/// Hands each payload of the first `valid` bytes of `src` — a prefix that
/// [`check_source`] accepted — to `each` with its offset. The frames are
/// checked again as they are walked (lengths within `valid`, checksums,
/// the last frame ending exactly at `valid`): the bytes are read a second
/// time and must not be trusted for having been good the first time.
///
/// # Errors
/// The source's read errors (as `read_error` makes them), a frame that is
/// not what the check found (as `changed` makes it, with its offset), or
/// the first error of `each`.
pub fn each_payload<S: Source, E>(
    src: &mut S,
    valid: u64,
    read_error: impl Fn(S::Error) -> E,
    changed: impl Fn(u64) -> E,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut at = 0u64;
    while at < valid {
        if valid - at < HEADER as u64 {
            return Err(changed(at));
        }
        let header: [u8; HEADER] = src
            .get(at, HEADER)
            .map_err(&read_error)?
            .try_into()
            .unwrap_or([0; HEADER]);
        let len = length(&header) as u64;
        if len == 0 || len > valid - at - HEADER as u64 {
            return Err(changed(at));
        }
        let payload = src
            .get(at + HEADER as u64, len as usize)
            .map_err(&read_error)?;
        if !checks(&header, payload) {
            return Err(changed(at));
        }
        each(at, payload)?;
        at += HEADER as u64 + len;
    }
    Ok(())
}

/// True when `bytes` holds nothing but zeros (or nothing).
pub fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

/// Where the last non-zero byte of `bytes` ends (0 when all are zero).
pub fn dirty_end(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i as u64 + 1)
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_whole_frame_is_one_frame_exactly_whatever_its_length() {
        let mut one = Vec::new();
        encode(b"snapshot", 0, &mut one);
        assert_eq!(whole(&one), Ok(&b"snapshot"[..]));
        let mut two = one.clone();
        encode(b"more", 0, &mut two);
        assert!(whole(&two).is_err(), "two frames");
        assert!(whole(&one[..one.len() - 1]).is_err(), "cut short");
        assert!(whole(&one[..5]).is_err(), "no whole header");
        let mut bad = one.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(whole(&bad), Err("checksum mismatch".to_owned()));
        assert!(whole(&[0u8; 8]).is_err(), "empty");
        // No MAX_PAYLOAD here: a header may give any length the buffer has
        // (checked by the arithmetic, not with 256 MiB in a test).
        let mut long = vec![0u8; HEADER];
        long[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(whole(&long).unwrap_err().contains("4294967295 bytes"));
    }
    use super::*;

    /// A log of `payloads`, each synced before the next was logged.
    fn log_of(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            synced_alone(&mut out, p);
        }
        out
    }

    /// Adds `payload` to `log` as a record logged once all before it was
    /// durable.
    fn synced_alone(log: &mut Vec<u8>, payload: &[u8]) {
        encode(payload, log.len() as u64, log);
    }

    /// Adds `payloads` to `log` as one write, logged since the last sync
    /// at `synced`.
    fn one_write(log: &mut Vec<u8>, synced: u64, payloads: &[&[u8]]) {
        for p in payloads {
            encode(p, synced, log);
        }
    }

    #[test]
    fn round_trip() {
        let buf = log_of(&[b"one", b"2", b"three"]);
        let scan = scan(&buf);
        assert_eq!(scan.end, ScanEnd::Clean);
        let payloads: Vec<&[u8]> = scan.frames.iter().map(|f| f.1).collect();
        assert_eq!(payloads, vec![&b"one"[..], b"2", b"three"]);
    }

    #[test]
    fn zeros_after_the_data_are_preallocated_space() {
        let mut buf = log_of(&[b"one", b"three"]);
        let len = buf.len() as u64;
        buf.resize(4096, 0);
        let s = scan(&buf);
        assert_eq!(s.end, ScanEnd::Clean);
        assert_eq!((s.frames.len(), s.valid_len), (2, len));
        assert_eq!(scan(&[0u8; 4096]).valid_len, 0);
        assert_eq!(dirty_end(&buf), len);
    }

    #[test]
    fn data_after_a_zero_header_is_corruption() {
        let mut buf = log_of(&[b"alpha"]);
        let end = buf.len();
        buf.extend_from_slice(&[0u8; 16]);
        synced_alone(&mut buf, b"late");
        let s = scan(&buf);
        assert!(matches!(s.end, ScanEnd::Corrupt { offset, .. } if offset == end as u64));
        // A bad checksum with only zeros after it: a write cut short.
        let mut buf = log_of(&[b"alpha", b"beta"]);
        buf[HEADER + 5 + HEADER] ^= 0xff;
        buf.resize(4096, 0);
        assert_eq!(scan(&buf).end, ScanEnd::TornTail);
        // With stray bytes after it (another sector of the same write?):
        // a sector lost from that record would read as zeros, and none
        // does, so the bad record is damage.
        buf[4000] = 1;
        assert!(
            matches!(scan(&buf).end, ScanEnd::Corrupt { offset, .. } if offset == HEADER as u64 + 5)
        );
        // A record logged after the bad one was durable: damage.
        buf.truncate(4000);
        synced_alone(&mut buf, b"late");
        assert!(
            matches!(scan(&buf).end, ScanEnd::Corrupt { offset, .. } if offset == HEADER as u64 + 5)
        );
    }

    #[test]
    fn an_unsynced_write_whose_start_was_lost_is_a_torn_tail() {
        // Two records made durable, then one write of three records, of
        // which the crash kept only some bytes (sectors in any order).
        let mut durable = log_of(&[b"alpha", b"beta"]);
        let synced = durable.len() as u64;
        let mut log = durable.clone();
        one_write(
            &mut log,
            synced,
            &[b"one", &[7u8; 140], &[9u8; 200], b"four"],
        );
        let write = synced as usize..log.len();
        durable.resize(log.len(), 0);
        // Each pattern of kept sectors (of `UNIT` bytes, aligned in the
        // file, the first holding the durable end too): the rest fell back
        // to what they held before the write.
        let unit = UNIT as usize;
        let first = write.start / unit * unit;
        let sectors = (write.end - first).div_ceil(unit);
        assert!(sectors >= 6, "the write spans several sectors");
        for kept in 0..(1u32 << sectors.min(16)) {
            let mut left = log.clone();
            for (i, at) in (first..write.end).step_by(unit).enumerate() {
                if kept & (1 << i.min(31)) == 0 {
                    let to = (at + unit).min(log.len());
                    left[at..to].copy_from_slice(&durable[at..to]);
                }
            }
            left.resize(log.len() + 512, 0);
            let s = scan(&left);
            // Whatever survived: the durable records, and of the write a
            // prefix of whole records.
            assert!(s.valid_len >= synced, "kept {kept:b}: {:?}", s.end);
            assert!(
                matches!(s.end, ScanEnd::Clean | ScanEnd::TornTail),
                "kept {kept:b}: {:?}",
                s.end
            );
        }
        // The same bytes with a record logged after the write was synced:
        // the bad frame is damage (that write was durable).
        let mut left = log.clone();
        left[write.start..write.start + 8].fill(0);
        synced_alone(&mut left, b"late");
        let s = scan(&left);
        assert!(
            matches!(&s.end, ScanEnd::Corrupt { offset, .. } if *offset == synced),
            "{:?}",
            s.end
        );
    }

    /// A changed byte in the last durable write, with records of that
    /// write after it: no sector of the bad record reads as never written,
    /// so it is damage, not a write torn by sectors.
    #[test]
    fn a_changed_byte_in_the_last_durable_write_is_damage() {
        let mut log = log_of(&[b"alpha"]);
        let synced = log.len() as u64;
        one_write(&mut log, synced, &[&[7u8; 140], &[9u8; 200]]);
        log.resize(log.len() + 512, 0);
        let mut bad = log.clone();
        bad[synced as usize + HEADER + 70] ^= 0x10;
        let s = scan(&bad);
        assert!(
            matches!(&s.end, ScanEnd::Corrupt { offset, reason }
                if *offset == synced && reason.contains("never written")),
            "{:?}",
            s.end
        );
        // The same record with one of its sectors lost instead: torn.
        let mut torn = log.clone();
        let unit = UNIT as usize;
        let lost = (synced as usize + HEADER + 70) / unit * unit;
        torn[lost..lost + unit].fill(0);
        let s = scan(&torn);
        assert_eq!(s.end, ScanEnd::TornTail);
        assert_eq!(s.valid_len, synced);
    }

    #[test]
    fn a_damaged_length_with_good_records_after_it_is_damage_not_a_torn_tail() {
        let buf = log_of(&[b"alpha", b"beta", b"gamma", b"delta"]);
        let second = HEADER + 5;
        for zeros in [0, 64] {
            // Past the end of the file.
            let mut bad = buf.clone();
            bad[second + 3] = 0x01;
            bad.resize(buf.len() + zeros, 0);
            let s = scan(&bad);
            assert_eq!(s.valid_len, second as u64);
            assert!(
                matches!(&s.end, ScanEnd::Corrupt { offset, .. } if *offset == second as u64),
                "{:?}",
                s.end
            );
            // Over the later records into the zeros ahead.
            let mut bad = buf.clone();
            bad.resize(buf.len() + zeros, 0);
            let over = (bad.len() - second - HEADER) as u32;
            bad[second..second + 4].copy_from_slice(&over.to_le_bytes());
            assert!(
                matches!(scan(&bad).end, ScanEnd::Corrupt { .. }),
                "zeros {zeros}"
            );
        }
        // The last record's length damaged, with nothing after it: the
        // record checks at its true length, so it is damage, not a write
        // cut short (cutting it would drop an acknowledged record).
        let last = buf.len() - HEADER - 5;
        for (byte, value, zeros) in [(3, 0x01, 64), (0, 0x40, 64), (0, 0x40, 4096), (0, 0x06, 0)] {
            let mut bad = buf.clone();
            bad[last + byte] = value;
            bad.resize(buf.len() + zeros, 0);
            let s = scan(&bad);
            assert_eq!(s.valid_len, last as u64);
            assert!(
                matches!(&s.end, ScanEnd::Corrupt { offset, reason }
                    if *offset == last as u64 && reason.contains("checks with 5")),
                "byte {byte} = {value:#x}, {zeros} zeros: {:?}",
                s.end
            );
        }
        // The same record cut short instead (the write torn): no length
        // checks, and it is cut.
        for cut in 1..5 {
            let mut torn = buf[..buf.len() - cut].to_vec();
            torn.resize(buf.len() + 64, 0);
            let s = scan(&torn);
            assert_eq!(
                (s.valid_len, s.end),
                (last as u64, ScanEnd::TornTail),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn the_search_after_a_bad_frame_is_bounded() {
        // After a torn frame, a megabyte in which every fourth position
        // reads as a 16 KiB frame (and every fourth as a 64-byte one): a
        // quarter of a million checksums of 16 KiB without the bound.
        let mut buf = log_of(&[b"alpha"]);
        let torn = buf.len();
        buf.extend_from_slice(&(100u32 << 20).to_le_bytes());
        buf.extend_from_slice(&[1, 2, 3, 4]);
        for _ in 0..(1 << 18) {
            buf.extend_from_slice(&[0x40, 0, 0, 0]);
        }
        let s = scan(&buf);
        assert_eq!(s.valid_len, torn as u64);
        assert!(
            matches!(&s.end, ScanEnd::Corrupt { offset, reason }
                if *offset == torn as u64 && reason.contains("too much")),
            "{:?}",
            s.end
        );
    }

    #[test]
    fn a_damaged_length_before_a_last_record_that_ends_in_zeros_is_damage() {
        let buf = log_of(&[b"alpha", b"beta", b"done\0\0"]);
        let second = HEADER + 5;
        let mut bad = buf.clone();
        bad[second + 3] = 0x01;
        bad.resize(buf.len() + 4096, 0);
        assert!(matches!(scan(&bad).end, ScanEnd::Corrupt { .. }));
    }

    #[test]
    fn a_torn_tail_whose_zeroing_was_cut_short_is_still_a_torn_tail() {
        // A torn record's bytes, then a crash while recovery zeroed them:
        // some of the zeros reached the disk (the header's among them), some
        // did not.
        let payload: Vec<u8> = (1..=200u8).collect();
        let buf = log_of(&[b"alpha", &payload]);
        let second = HEADER + 5;
        let torn = &buf[..second + HEADER + 120];
        for zeroed in [0..4, 0..8, 0..60, 8..60, 30..90] {
            let mut left = torn.to_vec();
            for i in zeroed.clone() {
                left[second + i] = 0;
            }
            left.resize(torn.len() + 300, 0);
            let s = scan(&left);
            assert_eq!(
                (s.valid_len, &s.end),
                (second as u64, &ScanEnd::TornTail),
                "zeroed {zeroed:?}"
            );
        }
    }

    #[test]
    fn every_truncation_is_a_torn_tail_also_when_zeros_follow() {
        let buf = log_of(&[b"alpha", b"beta"]);
        let first = HEADER + 5;
        for zeros in [0, 100] {
            for cut in 0..buf.len() {
                let mut torn = buf[..cut].to_vec();
                torn.resize(cut + zeros, 0);
                let s = scan(&torn);
                assert!(
                    matches!(s.end, ScanEnd::Clean | ScanEnd::TornTail),
                    "cut {cut} + {zeros} zeros: {:?}",
                    s.end
                );
                let expect = if cut >= first { first } else { 0 };
                assert_eq!(s.valid_len as usize, expect, "cut at {cut} + {zeros} zeros");
            }
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

    #[test]
    fn payloads_walk_what_scan_accepted() {
        let mut buf = Vec::new();
        for payload in [&b"a"[..], b"bcd", &[7u8; 300]] {
            encode(payload, 0, &mut buf);
        }
        let scan = scan(&buf);
        let valid = &buf[..scan.valid_len as usize];
        let walked: Vec<_> = payloads(valid).collect();
        assert_eq!(walked, scan.frames);
        assert_eq!(payloads(&[]).count(), 0);
    }
}
