#![allow(clippy::disallowed_methods)]
//! `cargo bench --bench recovery`: how long a restart takes with a long log,
//! and after a snapshot replaced it.
//!
//! The state is made without a server: `dlm::core::Core` is driven directly
//! and every record it asks to persist goes through `dlm::log::Wal` (synced
//! every 10,000 records), committed appends through `dlm::files::DataFiles`.
//! Then `dlm::server::recover` is timed with the page cache warm (the files
//! were just written) and cold (their pages dropped with
//! `posix_fadvise(DONTNEED)`), and the release binary is timed from spawn to
//! its "serving" line (cold). Then a snapshot replaces the log (as the server
//! does every `--snapshot-every` records) and the same is timed again.
//!
//! Mixes: `locks` — acquire/release cycles over 1,000 locks with request ids
//! (each record: a grant or a release plus the remembered answer);
//! `appends` — critical sections on the default lock: acquire, eight 256-byte
//! appends, release (80 % of the records carry data).
//!
//! `DLM_BENCH_RECORDS` (default `100000,1000000`) lists the log lengths; free
//! words (`locks`, `appends`) filter the mixes. With `DLM_BENCH_KEEP` set, a
//! copy of each generated state is left in `target/bench-tmp/kept-MIX-N`
//! (to profile a start by hand).

#[allow(dead_code)]
mod common;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use dlm::core::records::Snapshot;
use dlm::core::time::Time;
use dlm::core::types::{CallId, Reply, Request};
use dlm::core::{Core, Input, Output, Plants};
use dlm::files::DataFiles;
use dlm::log::Wal;
use dlm::server::{recover, ServerConfig, STATE_DIR};
use dlm::storage::FsDir;

use common::settings::Settings;
use common::{load_average, procs, Machine};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mix {
    Locks,
    Appends,
}

impl Mix {
    fn name(self) -> &'static str {
        match self {
            Mix::Locks => "locks",
            Mix::Appends => "appends",
        }
    }
}

/// Writes a log of at least `records` records into `dir` (a data directory).
fn generate(dir: &Path, records: u64, mix: Mix) -> Result<()> {
    let config = ServerConfig::new(dir);
    let mut files = DataFiles::open(Box::new(FsDir::open(dir)?))?;
    let state = FsDir::open(dir.join(STATE_DIR))?;
    let mut wal = Wal::recover(Box::new(state), Snapshot::default)?.wal;
    let mut core = Core::new(config.core_config(), [9; 32]);
    let mut call = 0u64;
    let mut request = 0u64;
    let mut unsynced = 0u64;
    let names: Vec<String> = (0..1000).map(|i| format!("lock-{i}")).collect();
    let payload = bytes::Bytes::from(vec![b'x'; 256]);
    let mut handle = |core: &mut Core, wal: &mut Wal, files: &mut DataFiles, req: Request| {
        call += 1;
        request += 1;
        let outputs = core.handle(
            Time::from_millis(call / 100),
            Input::Call {
                id: CallId(call),
                request_id: request.to_string(),
                request: req,
            },
        );
        let mut token = None;
        for output in outputs {
            match output {
                Output::Persist(record) => {
                    wal.append(&record);
                    unsynced += 1;
                }
                Output::Write(write) => files.apply(&write)?,
                Output::Reply {
                    reply: Reply::Granted(info),
                    ..
                } => token = Some(info.token),
                _ => {}
            }
        }
        if unsynced >= 10_000 {
            wal.sync()?;
            unsynced = 0;
        }
        anyhow::Ok(token)
    };
    let mut i = 0usize;
    // Bounded: every cycle adds at least two records.
    while wal.records_since_snapshot() < records && i < 10 * records as usize {
        let client = (i % 1000) as i32;
        let lock = match mix {
            Mix::Locks => names[i % 1000].clone(),
            Mix::Appends => String::new(),
        };
        let acquire = Request::Acquire {
            client,
            lock: lock.as_str().into(),
            wait: None,
            lease: None,
        };
        let token = handle(&mut core, &mut wal, &mut files, acquire)?.context("granted")?;
        if mix == Mix::Appends {
            for k in 0..8 {
                let append = Request::Append {
                    client,
                    file: format!("file_{}", (i + k) % 100),
                    content: payload.clone(),
                    token: token.to_string(),
                };
                handle(&mut core, &mut wal, &mut files, append)?;
            }
        }
        let release = Request::Release {
            client,
            lock: lock.into(),
            token: token.to_string(),
        };
        handle(&mut core, &mut wal, &mut files, release)?;
        i += 1;
    }
    wal.sync()?;
    files.sync()?;
    Ok(())
}

/// Copies the files of `from` (and of its subdirectories) into `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Drops the page cache of every file under `dir` (they are synced, so the
/// kernel can let go of them): the next read comes from the disk.
fn drop_cache(dir: &Path) {
    for sub in [dir.to_path_buf(), dir.join(STATE_DIR)] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(file) = std::fs::File::open(entry.path()) {
                let _ = file.sync_all();
                // SAFETY: a valid open descriptor; advice only.
                unsafe {
                    libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
        }
    }
}

fn bytes_in(dir: &Path, prefix: &str) -> u64 {
    std::fs::read_dir(dir.join(STATE_DIR))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Timed {
    records: usize,
    secs: f64,
}

fn time_recover(dir: &Path) -> Result<(Timed, dlm::server::Recovered)> {
    let config = ServerConfig::new(dir);
    let start = Instant::now();
    let recovered = recover(
        &config,
        Box::new(FsDir::open(dir)?),
        Box::new(FsDir::open(dir.join(STATE_DIR))?),
        [3; 32],
        Time::ZERO,
        Plants::default(),
    )?;
    let secs = start.elapsed().as_secs_f64();
    Ok((
        Timed {
            records: recovered.report.records_replayed,
            secs,
        },
        recovered,
    ))
}

/// The phases of a recovery, timed one by one with the same public pieces
/// `recover` uses (warm cache): open the data files, read and decode the
/// log, replay it onto the snapshot (re-applying committed writes). Here the
/// log is decoded whole first, to time the two apart; `recover` replays each
/// record as it is decoded.
fn phases(dir: &Path) -> Result<[f64; 3]> {
    let config = ServerConfig::new(dir);
    let t0 = Instant::now();
    let mut files = DataFiles::open(Box::new(FsDir::open(dir)?))?;
    let t1 = Instant::now();
    let state = FsDir::open(dir.join(STATE_DIR))?;
    let log = Wal::recover(Box::new(state), Snapshot::default)?;
    let t2 = Instant::now();
    let mut core = Core::restore(config.core_config(), [3; 32], log.snapshot);
    let mut replay = files.replay();
    for record in log.records {
        for write in core.replay(record)? {
            replay.apply(&write)?;
        }
    }
    replay.finish()?;
    let t3 = Instant::now();
    Ok([
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64(),
    ])
}

/// Spawns the release binary on `dir` and times it to its "serving" line.
fn time_process_start(dir: &Path, log: &Path) -> Result<f64> {
    let mut command = Command::new(common::systems::dlm_binary());
    command
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "warn");
    let start = Instant::now();
    let mut guard = procs::spawn("dlm", command, log, true)?;
    procs::wait_for_line(&mut guard, "serving", Duration::from_secs(120))?;
    let secs = start.elapsed().as_secs_f64();
    guard.kill();
    Ok(secs)
}

fn main() {
    let settings = Settings::from_env_and_args();
    let machine = Machine::describe();
    println!("dlm recovery bench — {}", machine.line());
    let counts: Vec<u64> = std::env::var("DLM_BENCH_RECORDS")
        .unwrap_or_else(|_| "100000,1000000".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| (1..=20_000_000).contains(n))
        .collect();
    println!();
    println!(
        "| mix | state | records replayed | log MB | snapshot MB | recover() warm s | recover() cold s | `dlm server` start → serving, cold s |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for mix in [Mix::Locks, Mix::Appends] {
        let wanted =
            settings.unknown.is_empty() || settings.unknown.iter().any(|w| w == mix.name());
        if !wanted {
            continue;
        }
        for &records in &counts {
            match run(mix, records) {
                Ok(mut r) => rows.append(&mut r),
                Err(e) => println!("{} {records}: failed: {e:#}", mix.name()),
            }
        }
    }
    println!();
    for row in &rows {
        if row["records_target"] == 1_000_000 {
            let worst = row["recover_cold_s"]
                .as_f64()
                .unwrap_or(f64::MAX)
                .max(row["process_start_cold_s"].as_f64().unwrap_or(f64::MAX));
            println!(
                "target restart < 2 s ({} mix, {}): worst {worst:.2} s: {}",
                row["mix"].as_str().unwrap_or(""),
                row["state"].as_str().unwrap_or(""),
                if worst < 2.0 { "MET" } else { "NOT MET" }
            );
        }
    }
    println!("load at end: {}", load_average());
    let json = serde_json::json!({
        "bench": "recovery",
        "unix_time": common::report::unix_time(),
        "machine": machine,
        "load_at_end": load_average(),
        "rows": rows,
    });
    match common::report::write_json("recovery", &json) {
        Ok(path) => println!("results: {}", path.display()),
        Err(e) => println!("could not write results: {e}"),
    }
}

fn run(mix: Mix, records: u64) -> Result<Vec<serde_json::Value>> {
    let tmp = common::temp_dir(&format!("recovery-{}-", mix.name()));
    let dir = tmp.path().join("data");
    let log = tmp.path().join("server.log");
    let generated = Instant::now();
    generate(&dir, records, mix)?;
    let generate_secs = generated.elapsed().as_secs_f64();
    if std::env::var_os("DLM_BENCH_KEEP").is_some() {
        // For profiling a start by hand: `dlm server --data-dir <this>`.
        let base = tmp.path().parent().unwrap_or(tmp.path());
        let kept = base.join(format!("kept-{}-{records}", mix.name()));
        let _ = std::fs::remove_dir_all(&kept);
        copy_dir(&dir, &kept)?;
        println!("kept a copy of the state as generated: {}", kept.display());
    }
    let mut rows = Vec::new();
    let mut snapshot_cost = (0.0, 0.0, 0.0);
    for state in ["log", "snapshot"] {
        if state == "snapshot" {
            // Replace the log by a snapshot, as the server does: the core
            // copies the state under the state lock, the writer moves the
            // log to a new generation, and a thread of its own encodes,
            // writes and syncs the snapshot while the writer goes on.
            let (_, recovered) = time_recover(&dir)?;
            let copy = Instant::now();
            let snapshot = recovered.core.snapshot();
            let copy_secs = copy.elapsed().as_secs_f64();
            let (mut wal, mut files) = recovered.persister.into_parts();
            files.sync()?;
            let begin = Instant::now();
            let write = wal.begin_snapshot(snapshot.clone())?;
            let begin_secs = begin.elapsed().as_secs_f64();
            let background = Instant::now();
            wal.adopt(write.run()?);
            let run_secs = background.elapsed().as_secs_f64();
            // The next snapshot (of the same state: nothing was logged in
            // between) starts in the segment that run zero-filled ahead, as
            // every snapshot but the first after a start does.
            let again = Instant::now();
            let write = wal.begin_snapshot(snapshot.clone())?;
            let begin_again_secs = again.elapsed().as_secs_f64();
            wal.adopt(write.run()?);
            // And the first one after a restart: recovery keeps the segment
            // zero-filled ahead.
            drop((wal, files));
            let (_, recovered) = time_recover(&dir)?;
            let (mut wal, _files) = recovered.persister.into_parts();
            let restarted = Instant::now();
            let write = wal.begin_snapshot(snapshot)?;
            let begin_restarted_secs = restarted.elapsed().as_secs_f64();
            wal.adopt(write.run()?);
            snapshot_cost = (copy_secs, begin_again_secs, run_secs);
            println!(
                "|   | (taking that snapshot: Core::snapshot {:.1} ms under the state lock; Wal::begin_snapshot on the writer {:.1} ms, {:.1} ms the first time after a restart, {:.1} ms with no segment zero-filled ahead (it zero-fills in line: the simulations' in-line mode; a server zero-fills one on a thread at start); SnapshotWrite::run {:.1} ms on its own thread) | | | | | | |",
                1e3 * copy_secs,
                1e3 * begin_again_secs,
                1e3 * begin_restarted_secs,
                1e3 * begin_secs,
                1e3 * run_secs
            );
        }
        let log_mb = bytes_in(&dir, "log-") as f64 / 1e6;
        let snap_mb = bytes_in(&dir, "snap-") as f64 / 1e6;
        let (warm, recovered) = time_recover(&dir)?;
        drop(recovered);
        let [open_s, read_s, replay_s] = phases(&dir)?;
        drop_cache(&dir);
        let (cold, recovered) = time_recover(&dir)?;
        drop(recovered);
        drop_cache(&dir);
        let start = time_process_start(&dir, &log)?;
        let label = if state == "log" {
            format!("{records} records in the log")
        } else {
            "after a snapshot replaced them".to_owned()
        };
        println!(
            "| {} | {label} | {} | {log_mb:.1} | {snap_mb:.2} | {:.3} | {:.3} | {start:.3} |",
            mix.name(),
            cold.records,
            warm.secs,
            cold.secs,
        );
        println!(
            "|   | (phases, warm: open data files {:.1} ms, read + decode log {:.1} ms, restore snapshot + replay {:.1} ms) | | | | | | |",
            1e3 * open_s,
            1e3 * read_s,
            1e3 * replay_s
        );
        rows.push(serde_json::json!({
            "mix": mix.name(),
            "state": state,
            "records_target": records,
            "records_replayed": cold.records,
            "log_mb": log_mb,
            "snapshot_mb": snap_mb,
            "generate_s": generate_secs,
            "recover_warm_s": warm.secs,
            "recover_cold_s": cold.secs,
            "process_start_cold_s": start,
            "phase_open_s": open_s,
            "phase_read_decode_s": read_s,
            "phase_replay_s": replay_s,
            "snapshot_copy_s": snapshot_cost.0,
            "snapshot_begin_s": snapshot_cost.1,
            "snapshot_write_s": snapshot_cost.2,
        }));
    }
    Ok(rows)
}
