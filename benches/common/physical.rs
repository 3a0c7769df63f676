//! The machine's limits, measured in the same run as the rows they bound.
//!
//! - fsync: a 4 KiB `pwrite` + `fdatasync` in a loop, on the same disk as the
//!   servers' data. `append` extends the file each time (what a log does, so
//!   the file size must be made durable too); `overwrite` rewrites one block
//!   (a preallocated file); `log` writes 4 KiB blocks into a zero-filled,
//!   preallocated file the way dlm's log does (`Dir::open_direct`: O_DIRECT
//!   where the filesystem allows it, each block rewritten a few times with
//!   new bytes, as group commits at low load do). Every write carries new
//!   bytes (a counter), so no layer can skip a write it has seen.
//! - fsync after an idle gap: the `log` write again, each after the disk sat
//!   idle for [`IDLE_GAP`]. On a VM a durable write that follows an idle
//!   spell can cost twice one that follows another write (the host stops
//!   polling the virtual disk when it goes quiet), and a contended handoff
//!   or a lone client leaves gaps of about this length between writes.
//! - loopback round trip: a 64-byte TCP ping-pong with `TCP_NODELAY`.
//!
//! A durable lock service can not hand a contended lock over faster than one
//! fsync plus one round trip per handoff: the release must be durable before
//! the next holder hears of its grant, and the next holder's release must
//! reach the server before the following handoff.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::report::{histogram, record, Latency};

/// Fsync and round-trip figures taken at one moment.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Limits {
    /// 4 KiB append + fdatasync.
    pub fsync_append: Latency,
    /// 4 KiB overwrite in place + fdatasync.
    pub fsync_overwrite: Latency,
    /// 4 KiB block into a preallocated file as dlm's log writes it + fdatasync.
    pub fsync_log: Latency,
    /// The same, each write after the disk sat idle for [`IDLE_GAP`].
    pub fsync_log_after_idle: Latency,
    /// 64-byte TCP round trip on loopback.
    pub tcp_rtt: Latency,
}

impl Limits {
    /// Measures them all, each for at most `each` (and a bounded count).
    pub fn measure(dir: &Path, each: Duration) -> Limits {
        Limits {
            fsync_append: fsync_latency(dir, true, each).unwrap_or_default(),
            fsync_overwrite: fsync_latency(dir, false, each).unwrap_or_default(),
            fsync_log: fsync_log_latency(dir, Duration::ZERO, each).unwrap_or_default(),
            fsync_log_after_idle: fsync_log_latency(dir, IDLE_GAP, each).unwrap_or_default(),
            tcp_rtt: tcp_rtt(each).unwrap_or_default(),
        }
    }

    /// The fastest durable 4 KiB write measured (mean, ms): what the disk
    /// allows at best, whichever way a server writes.
    pub fn fastest_fsync_ms(&self) -> f64 {
        [self.fsync_append, self.fsync_overwrite, self.fsync_log]
            .iter()
            .map(|l| l.mean_ms)
            .filter(|ms| *ms > 0.0)
            .fold(f64::INFINITY, f64::min)
    }

    /// Five report lines.
    pub fn lines(&self) -> String {
        format!(
            "  fsync 4 KiB append   : {}\n  fsync 4 KiB overwrite: {}\n  fsync 4 KiB dlm log  : {}\n  \
             same, after {} ms idle: {}\n  TCP loopback RTT     : {}",
            self.fsync_append.line(),
            self.fsync_overwrite.line(),
            self.fsync_log.line(),
            IDLE_GAP.as_secs_f64() * 1e3,
            self.fsync_log_after_idle.line(),
            self.tcp_rtt.line()
        )
    }
}

/// Latency of a 4 KiB write + fdatasync in `dir`, looped for at most `span`
/// and at most 20,000 times.
///
/// # Errors
/// I/O errors of the test file.
pub fn fsync_latency(dir: &Path, append: bool, span: Duration) -> std::io::Result<Latency> {
    let path = dir.join(if append {
        "fsync-append.probe"
    } else {
        "fsync-overwrite.probe"
    });
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let mut block = [0x5au8; 4096];
    if !append {
        file.write_all_at(&block, 0)?;
        file.sync_all()?;
    }
    let mut hist = histogram();
    let start = Instant::now();
    for i in 0..20_000u64 {
        if start.elapsed() >= span {
            break;
        }
        let offset = if append { i * 4096 } else { 0 };
        block[..8].copy_from_slice(&i.to_le_bytes());
        let t = Instant::now();
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        record(&mut hist, t.elapsed());
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(Latency::of(&hist))
}

/// How long the disk sits idle before each write of the `after idle` probe:
/// about what a contended handoff leaves between two durable writes here
/// (the round trip to the next holder and back, and both sides' work).
pub const IDLE_GAP: Duration = Duration::from_micros(250);

/// Latency of a 4 KiB block write + fdatasync into a preallocated, zero-filled
/// file opened as dlm opens its log, each after `idle` without disk writes
/// (the sleep is not timed), looped for at most `span` and at most 20,000
/// times.
///
/// # Errors
/// I/O errors of the probe file.
pub fn fsync_log_latency(dir: &Path, idle: Duration, span: Duration) -> std::io::Result<Latency> {
    use dlm::storage::{Dir, FsDir};
    const SPACE: u64 = 8 << 20;
    let probes = FsDir::open(dir)?;
    let name = "fsync-log.probe";
    let mut file = probes.open_direct(name, true)?;
    file.set_len(0)?;
    let zeros = vec![0u8; SPACE as usize];
    file.write_at(0, &zeros)?;
    file.sync_data()?;
    let mut block = [0u8; 4096];
    let mut hist = histogram();
    let start = Instant::now();
    for i in 0..20_000u64 {
        if start.elapsed() >= span {
            break;
        }
        // Each block takes 16 group commits before the next one starts.
        let offset = (i / 16 * 4096) % SPACE;
        let at = (i % 16) as usize * 256;
        block[at..at + 8].copy_from_slice(&(i + 1).to_le_bytes());
        if !idle.is_zero() {
            std::thread::sleep(idle);
        }
        let t = Instant::now();
        file.write_at(offset, &block)?;
        file.sync_data()?;
        record(&mut hist, t.elapsed());
        if i % 16 == 15 {
            block.fill(0);
        }
    }
    drop(file);
    let _ = probes.remove(name);
    Ok(Latency::of(&hist))
}

/// Round trip of 64 bytes over loopback TCP (nodelay), for at most `span`
/// and at most 200,000 times.
///
/// # Errors
/// Socket errors.
pub fn tcp_rtt(span: Duration) -> std::io::Result<Latency> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            match stream.read_exact(&mut buf) {
                Ok(()) => stream.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = [7u8; 64];
    let mut hist = histogram();
    let start = Instant::now();
    for _ in 0..200_000 {
        if start.elapsed() >= span {
            break;
        }
        let t = Instant::now();
        stream.write_all(&buf)?;
        stream.read_exact(&mut buf)?;
        record(&mut hist, t.elapsed());
    }
    drop(stream);
    let _ = echo.join();
    Ok(Latency::of(&hist))
}

/// Fsync + round trip latencies combined into a rate: `per` sequential
/// durable round trips per unit of work, `parallel` units sharing each
/// fsync (group commit).
pub fn bound(fsync_ms: f64, rtt_ms: f64, per: f64, parallel: f64) -> f64 {
    let each = fsync_ms + rtt_ms;
    if each <= 0.0 {
        return f64::INFINITY;
    }
    parallel * 1000.0 / (per * each)
}
