#![allow(clippy::disallowed_methods)]
//! `cargo bench --bench lock [-- FILTER…]`: dlm over gRPC against etcd and
//! Redis in the same run, with the fsync + round-trip bound of this machine.
//!
//! Workloads (a cycle is acquire + release, one connection per client):
//! - `uncontended`, C = 1, 16, 64: each client on its own lock;
//! - `contended`, C = 16, 64: every client on one lock; counts real handoffs
//!   (grants to a different client than the previous holder, ordered by a
//!   sequence number taken inside the critical section) and fairness (grants
//!   per client);
//! - `critical-section`, C = 1, 16 (dlm only): acquire the default lock, ten
//!   1 KiB appends, release;
//! - `no-fsync`, C = 1, 64 (dlm only): a "cycle" of two status calls, the
//!   server's whole request path (gRPC, core, writer) with no durable
//!   record: the ceiling of CPU and round trips for the cycles above.
//!
//! Every server is started by the bench on loopback with a temporary data
//! directory on the normal disk, and killed at the end. Settings and filters:
//! see `common/settings.rs` and BENCHMARKS.md.

#[allow(dead_code)]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::physical::{self, Limits};
use common::report::{self, Fairness, Latency, Row};
use common::settings::Settings;
use common::systems::{Conn, DlmConn, Server, System};
use common::{cpu_seconds, load_average, Machine};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Uncontended,
    Contended,
    CriticalSection,
    NoFsync,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Uncontended => "uncontended",
            Workload::Contended => "contended",
            Workload::CriticalSection => "critical-section",
            Workload::NoFsync => "no-fsync",
        }
    }

    fn dlm_only(self) -> bool {
        matches!(self, Workload::CriticalSection | Workload::NoFsync)
    }

    fn from_name(name: &str) -> Workload {
        match name {
            "uncontended" => Workload::Uncontended,
            "contended" => Workload::Contended,
            "no-fsync" => Workload::NoFsync,
            _ => Workload::CriticalSection,
        }
    }

    fn default_clients(self) -> &'static [usize] {
        match self {
            Workload::Uncontended => &[1, 16, 64],
            Workload::Contended => &[16, 64],
            Workload::CriticalSection => &[1, 16],
            Workload::NoFsync => &[1, 64],
        }
    }

    /// Sequential durable round trips per cycle and cycles that can share an
    /// fsync, for the bound (none for the no-fsync ceiling).
    fn bound_shape(self, clients: usize) -> Option<(f64, f64, &'static str)> {
        Some(match self {
            // Acquire and release each need a durable record; group commit
            // lets every client's record share one fsync.
            Workload::Uncontended => (2.0, clients as f64, "C/(2(fsync+RTT)) cycles/s"),
            // Each handoff: the release (with the grant to the next waiter in
            // the same record) is made durable, then the new holder's release
            // travels back.
            Workload::Contended => (1.0, 1.0, "1/(fsync+RTT) handoffs/s"),
            // Acquire, ten appends, release: 12 durable steps alone; with
            // waiters the acquire rides in the previous release's record.
            Workload::CriticalSection if clients == 1 => (12.0, 1.0, "1/(12(fsync+RTT))"),
            Workload::CriticalSection => (11.0, 1.0, "1/(11(fsync+RTT))"),
            Workload::NoFsync => return None,
        })
    }
}

/// Most cycles one client runs in one row (the time bound comes first).
const MAX_CYCLES: u64 = 10_000_000;

/// `DLM_BENCH_TRACE_SLOW=MS`: print every acquire slower than MS to stderr
/// (with its time), to find what stalls a row.
fn trace_slow() -> Option<Duration> {
    static SLOW: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *SLOW.get_or_init(|| {
        std::env::var("DLM_BENCH_TRACE_SLOW")
            .ok()
            .and_then(|ms| ms.parse::<f64>().ok())
            .filter(|ms| ms.is_finite() && *ms > 0.0)
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
    })
}

/// Prints a call that took at least `DLM_BENCH_TRACE_SLOW` ms, with when it
/// ended relative to the start of the measured span.
fn trace(client: usize, what: &str, from: Instant, to: Instant, start: Instant) {
    if trace_slow().is_some_and(|slow| to - from >= slow) {
        let at = if to >= start {
            (to - start).as_secs_f64()
        } else {
            -(start - to).as_secs_f64()
        };
        eprintln!(
            "slow {what}: client {client} took {:.1} ms, ended at {at:+.3} s",
            (to - from).as_secs_f64() * 1e3
        );
    }
}

/// What one client measured.
struct ClientResult {
    hist: hdrhistogram::Histogram<u64>,
    /// Latency of each other call (release, append) inside the span.
    others: hdrhistogram::Histogram<u64>,
    cycles: u64,
    ops: u64,
    /// Sequence numbers of the grants it got inside the measured span.
    grants: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    mut conn: Conn,
    lock: String,
    workload: Workload,
    client_index: usize,
    start: Instant,
    end: Instant,
    give_up: Instant,
    seq: Arc<AtomicU64>,
) -> (Conn, ClientResult) {
    let mut result = ClientResult {
        hist: report::histogram(),
        others: report::histogram(),
        cycles: 0,
        ops: 0,
        grants: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let file = format!("file_{}", client_index % 100);
    let payload = vec![b'a' + (client_index % 26) as u8; 1024];
    let fail = |result: &mut ClientResult, e: anyhow::Error| {
        result.errors += 1;
        if result.first_error.is_none() {
            result.first_error = Some(format!("{e:#}"));
        }
    };
    for _ in 0..MAX_CYCLES {
        let t0 = Instant::now();
        if t0 >= end || result.errors > 20 {
            break;
        }
        if workload == Workload::NoFsync {
            let first = conn.status().await;
            let t1 = Instant::now();
            let second = match first {
                Ok(()) => conn.status().await,
                Err(e) => Err(e),
            };
            if let Err(e) = second {
                fail(&mut result, e);
                continue;
            }
            if t0 >= start && Instant::now() <= end {
                report::record(&mut result.hist, t1 - t0);
                result.cycles += 1;
                result.ops += 2;
            }
            continue;
        }
        let held = match conn.acquire(&lock, give_up).await {
            Ok(held) => held,
            Err(e) => {
                fail(&mut result, e);
                continue;
            }
        };
        let t1 = Instant::now();
        trace(client_index, "acquire", t0, t1, start);
        // Inside the critical section: the order of these numbers is the
        // order of the grants.
        let s = seq.fetch_add(1, Ordering::SeqCst);
        let mut ops = 2;
        let mut calls = [Duration::ZERO; 11];
        let mut n_calls = 0;
        if workload == Workload::CriticalSection {
            for _ in 0..10 {
                let t = Instant::now();
                if let Err(e) = conn.append(&held, &file, payload.clone()).await {
                    fail(&mut result, e);
                    break;
                }
                calls[n_calls] = t.elapsed();
                trace(client_index, "append", t, t + calls[n_calls], start);
                n_calls += 1;
                ops += 1;
            }
        }
        let t = Instant::now();
        if let Err(e) = conn.release(held).await {
            fail(&mut result, e);
            continue;
        }
        calls[n_calls] = t.elapsed();
        trace(client_index, "release", t, t + calls[n_calls], start);
        n_calls += 1;
        let t2 = Instant::now();
        if t1 >= start && t1 < end {
            result.grants.push(s);
        }
        if t0 >= start && t2 <= end {
            report::record(&mut result.hist, t1 - t0);
            for call in &calls[..n_calls] {
                report::record(&mut result.others, *call);
            }
            result.cycles += 1;
            result.ops += ops;
        }
    }
    (conn, result)
}

async fn run_row(
    server: &Server,
    workload: Workload,
    clients: usize,
    row_no: usize,
    settings: &Settings,
) -> anyhow::Result<Row> {
    let load_before = load_average();
    let tag = format!("r{row_no}");
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        let id = (row_no * 1000 + i) as i32;
        conns.push(Conn::connect(server, id, &tag).await?);
    }
    let seq = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + settings.warmup();
    let end = start + settings.measure();
    let give_up = end + Duration::from_secs(30);
    let mut tasks = Vec::with_capacity(clients);
    for (i, conn) in conns.into_iter().enumerate() {
        let lock = match workload {
            Workload::Uncontended => format!("u{row_no}-{i}"),
            Workload::Contended => format!("c{row_no}"),
            Workload::CriticalSection | Workload::NoFsync => String::new(),
        };
        tasks.push(tokio::spawn(client_loop(
            conn,
            lock,
            workload,
            i,
            start,
            end,
            give_up,
            seq.clone(),
        )));
    }
    let pid = server.pid();
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(start).await;
        let before = (cpu_seconds(Some(pid)), cpu_seconds(None));
        tokio::time::sleep_until(end).await;
        let after = (cpu_seconds(Some(pid)), cpu_seconds(None));
        (before, after)
    });
    let mut results = Vec::with_capacity(clients);
    let mut conns = Vec::with_capacity(clients);
    for task in tasks {
        let (conn, result) = task.await?;
        conns.push(conn);
        results.push(result);
    }
    let ((srv0, me0), (srv1, me1)) = sampler.await?;
    for conn in conns {
        conn.close().await;
    }

    let secs = settings.secs;
    let mut hist = report::histogram();
    let mut others = report::histogram();
    let mut cycles = 0;
    let mut ops = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut order: Vec<(u64, usize)> = Vec::new();
    let mut per_client = Vec::with_capacity(clients);
    for (i, r) in results.iter().enumerate() {
        hist.add(&r.hist).ok();
        others.add(&r.others).ok();
        cycles += r.cycles;
        ops += r.ops;
        errors += r.errors;
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
        order.extend(r.grants.iter().map(|&s| (s, i)));
        per_client.push(r.grants.len() as u64);
    }
    order.sort_unstable();
    let handoffs = order.windows(2).filter(|w| w[0].1 != w[1].1).count() as f64;
    let contended =
        workload == Workload::Contended || (workload == Workload::CriticalSection && clients > 1);
    let cores = |a: Option<f64>, b: Option<f64>| Some((b? - a?) / secs);
    Ok(Row {
        system: server.system.name().to_owned(),
        transport: server.system.transport().to_owned(),
        workload: workload.name().to_owned(),
        clients,
        secs,
        cycles,
        cycles_per_sec: cycles as f64 / secs,
        ops_per_sec: ops as f64 / secs,
        handoffs_per_sec: contended.then_some(handoffs / secs),
        fairness: contended.then(|| Fairness::of(&per_client)),
        acquire: Latency::of(&hist),
        other_calls: Latency::of(&others),
        server_cpu: cores(srv0, srv1),
        client_cpu: cores(me0, me1),
        errors,
        fsync_ms: None,
        bound_per_sec: None,
        bound_note: String::new(),
        load_before,
        note: first_error.unwrap_or_default(),
    })
}

/// Round trips of dlm's status call: gRPC and the engine (core step, job
/// queue, reply), but no fsync.
async fn dlm_status_rtt(server: &Server, span: Duration) -> anyhow::Result<Latency> {
    let mut conn = DlmConn::connect(server.port, 999_999, "rtt").await?;
    let mut hist = report::histogram();
    let begin = Instant::now();
    for _ in 0..200_000 {
        if begin.elapsed() >= span {
            break;
        }
        let t = Instant::now();
        conn.status().await?;
        report::record(&mut hist, t.elapsed());
    }
    Ok(Latency::of(&hist))
}

fn print_row(row: &Row) {
    let a = &row.acquire;
    let handoffs = row
        .handoffs_per_sec
        .map(|h| format!(" handoffs/s {h:.0}"))
        .unwrap_or_default();
    println!(
        "  {:<9} {:<16} C={:<3} cycles/s {:>9.1}{handoffs}  acquire p50 {:.3} p99 {:.3} max {:.3} ms  \
         release/append p50 {:.3} p99 {:.3} max {:.3} ms  srv cpu {}  errors {}{}",
        row.system,
        row.workload,
        row.clients,
        row.cycles_per_sec,
        a.p50_ms,
        a.p99_ms,
        a.max_ms,
        row.other_calls.p50_ms,
        row.other_calls.p99_ms,
        row.other_calls.max_ms,
        row.server_cpu.map_or("–".to_owned(), |c| format!("{c:.2}")),
        row.errors,
        if row.note.is_empty() { String::new() } else { format!(" ({})", row.note) },
    );
}

fn main() {
    let settings = Settings::from_env_and_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Servers are spawned from this (main) thread, so PR_SET_PDEATHSIG ties
    // them to the bench process.
    let code = runtime.block_on(run(settings));
    std::process::exit(code);
}

async fn run(settings: Settings) -> i32 {
    let machine = Machine::describe();
    println!("dlm lock bench — {}", machine.line());
    println!(
        "settings: {} s measured per row after {} s warm-up; filters {:?} {:?} {:?}{}",
        settings.secs,
        settings.warmup_secs,
        settings.systems,
        settings.workloads,
        settings.clients,
        if settings.unknown.is_empty() {
            String::new()
        } else {
            format!(" (ignored: {:?})", settings.unknown)
        }
    );
    let probe_dir = common::temp_dir("probe-");
    println!("physical limits before the rows:");
    let before = Limits::measure(probe_dir.path(), Duration::from_secs(2));
    println!("{}", before.lines());

    let mut servers: Vec<Server> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for system in System::ALL {
        if !settings.wants_system(system.name()) {
            continue;
        }
        if system.is_compare_build() && std::env::var_os("DLM_BENCH_COMPARE_BIN").is_none() {
            continue;
        }
        match Server::start(system).await {
            Ok(Ok(server)) => {
                println!(
                    "started {} ({}, {}) on 127.0.0.1:{}, pid {}, data in {}",
                    system.name(),
                    server.version,
                    system.durability(),
                    server.port,
                    server.pid(),
                    server.dir().display()
                );
                servers.push(server);
            }
            Ok(Err(skipped)) => {
                println!("{skipped}");
                notes.push(skipped);
            }
            Err(e) => {
                let note = format!("{} failed to start: {e:#}", system.name());
                println!("{note}");
                notes.push(note);
            }
        }
    }
    let mut grpc_rtt = None;
    if let Some(dlm) = servers.iter().find(|s| s.system == System::Dlm) {
        match dlm_status_rtt(dlm, Duration::from_secs(1)).await {
            Ok(lat) => {
                println!("  dlm status RTT (gRPC + engine, no fsync): {}", lat.line());
                grpc_rtt = Some(lat);
            }
            Err(e) => println!("  dlm status RTT failed: {e:#}"),
        }
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut row_no = 1;
    for workload in [
        Workload::Uncontended,
        Workload::Contended,
        Workload::CriticalSection,
        Workload::NoFsync,
    ] {
        if !settings.wants_workload(workload.name()) {
            continue;
        }
        for clients in settings.client_counts(workload.default_clients()) {
            for server in &mut servers {
                if workload.dlm_only() && !server.system.is_dlm() {
                    continue;
                }
                if !server.alive() {
                    continue;
                }
                let probe = |dir: &std::path::Path| {
                    physical::fsync_latency(dir, true, Duration::from_millis(250))
                        .map(|l| l.mean_ms)
                        .ok()
                };
                let fsync_before = probe(probe_dir.path());
                let result = run_row(server, workload, clients, row_no, &settings).await;
                let fsync_after = probe(probe_dir.path());
                match result {
                    Ok(mut row) => {
                        row.fsync_ms = match (fsync_before, fsync_after) {
                            (Some(a), Some(b)) => Some((a + b) / 2.0),
                            (a, b) => a.or(b),
                        };
                        print_row(&row);
                        rows.push(row);
                    }
                    Err(e) => {
                        let note = format!(
                            "{} {} C={clients} failed: {e:#}",
                            server.system.name(),
                            workload.name()
                        );
                        println!("  {note}");
                        notes.push(note);
                    }
                }
                row_no += 1;
            }
        }
    }

    println!("physical limits after the rows:");
    let after = Limits::measure(probe_dir.path(), Duration::from_secs(2));
    println!("{}", after.lines());
    let fsync_ms = (before.fsync_append.mean_ms + after.fsync_append.mean_ms) / 2.0;
    let rtt_ms = (before.tcp_rtt.mean_ms + after.tcp_rtt.mean_ms) / 2.0;
    let fastest_ms = before.fastest_fsync_ms().min(after.fastest_fsync_ms());
    let idle_ms = (before.fsync_log_after_idle.mean_ms + after.fsync_log_after_idle.mean_ms) / 2.0;
    for row in rows.iter_mut().filter(|r| r.system != "redis-mem") {
        let workload = Workload::from_name(&row.workload);
        if let Some((per, parallel, note)) = workload.bound_shape(row.clients) {
            row.bound_per_sec = Some(physical::bound(fsync_ms, rtt_ms, per, parallel));
            row.bound_note = note.to_owned();
        }
    }
    drop(servers);

    let table = report::table(&rows);
    println!();
    println!(
        "bound: fsync {fsync_ms:.3} ms (4 KiB append + fdatasync, mean of the 2 s probes before and \
         after the rows) + TCP loopback RTT {rtt_ms:.3} ms; the fsync ms column is a 0.25 s probe \
         just before and after each row, to spot rows the disk disturbed"
    );
    println!(
        "       (with the fastest durable 4 KiB write measured, {fastest_ms:.3} ms, instead: contended bound {:.0} handoffs/s)",
        physical::bound(fastest_ms, rtt_ms, 1.0, 1.0)
    );
    println!(
        "       (with dlm's log write after {:.2} ms idle, {idle_ms:.3} ms, as a handoff leaves the disk: contended bound {:.0} handoffs/s)",
        physical::IDLE_GAP.as_secs_f64() * 1e3,
        physical::bound(idle_ms, rtt_ms, 1.0, 1.0)
    );
    if let Some(g) = grpc_rtt {
        println!(
            "       (with dlm's no-fsync gRPC round trip {:.3} ms instead of TCP: contended bound {:.0} handoffs/s)",
            g.mean_ms,
            physical::bound(fsync_ms, g.mean_ms, 1.0, 1.0)
        );
    }
    println!("load at end: {}", load_average());
    println!();
    print!("{table}");
    for note in &notes {
        println!("note: {note}");
    }
    println!();
    let targets = targets(
        &rows,
        physical::bound(fastest_ms, rtt_ms, 1.0, 1.0),
        physical::bound(idle_ms, rtt_ms, 1.0, 1.0),
    );
    for line in &targets {
        println!("{line}");
    }

    let json = serde_json::json!({
        "bench": "lock",
        "unix_time": report::unix_time(),
        "machine": machine,
        "settings": settings,
        "limits_before": before,
        "limits_after": after,
        "bound_fsync_ms": fsync_ms,
        "bound_rtt_ms": rtt_ms,
        "fastest_fsync_ms": fastest_ms,
        "fsync_after_idle_ms": idle_ms,
        "dlm_status_rtt": grpc_rtt,
        "load_at_end": load_average(),
        "rows": rows,
        "notes": notes,
        "targets": targets,
        "table_markdown": table,
    });
    match report::write_json("lock", &json) {
        Ok(path) => println!("results: {}", path.display()),
        Err(e) => println!("could not write results: {e}"),
    }
    0
}

/// The targets that this run can judge, for dlm over gRPC and over
/// QUIC.
fn targets(rows: &[Row], fastest_bound: f64, idle_bound: f64) -> Vec<String> {
    let mut out = Vec::new();
    for dlm in ["dlm", "dlm-quic"] {
        out.extend(targets_of(rows, dlm, fastest_bound, idle_bound));
    }
    out
}

fn targets_of(rows: &[Row], me: &str, fastest_bound: f64, idle_bound: f64) -> Vec<String> {
    let find = |system: &str, workload: &str, clients: usize| {
        rows.iter()
            .find(|r| r.system == system && r.workload == workload && r.clients == clients)
    };
    let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
    let mut out = Vec::new();
    if let Some(dlm) = find(me, "uncontended", 64) {
        for (peer, want) in [("etcd", 10.0), ("redis-aof", 1.0)] {
            if let Some(p) = find(peer, "uncontended", 64) {
                let ratio = dlm.cycles_per_sec / p.cycles_per_sec.max(f64::MIN_POSITIVE);
                out.push(format!(
                    "target uncontended C=64: {me} {:.0} / {peer} {:.0} cycles/s = {ratio:.2}× (want ≥ {want}×): {}",
                    dlm.cycles_per_sec,
                    p.cycles_per_sec,
                    verdict(ratio >= want)
                ));
            }
        }
    }
    if let Some(dlm) = find(me, "contended", 64) {
        let h = dlm.headline();
        if let Some(p) = find("etcd", "contended", 64) {
            let ratio = h / p.headline().max(f64::MIN_POSITIVE);
            out.push(format!(
                "target contended C=64: {me} {h:.0} / etcd {:.0} handoffs/s = {ratio:.2}× (want ≥ 10×): {}",
                p.headline(),
                verdict(ratio >= 10.0)
            ));
        }
        if let Some(bound) = dlm.bound_per_sec {
            let share = h / bound;
            out.push(format!(
                "target contended C=64: {me} {h:.0} handoffs/s = {:.0}% of the fsync+RTT bound {bound:.0}/s (want ≥ 70%): {}",
                100.0 * share,
                verdict(share >= 0.7)
            ));
            out.push(format!(
                "  and {:.0}% of the bound with the fastest durable write measured, {fastest_bound:.0}/s",
                100.0 * h / fastest_bound
            ));
            out.push(format!(
                "  and {:.0}% of the bound with dlm's log write after {:.2} ms idle, {idle_bound:.0}/s (the disk as a handoff leaves it)",
                100.0 * h / idle_bound,
                physical::IDLE_GAP.as_secs_f64() * 1e3
            ));
            let etcd10 = find("etcd", "contended", 64).map(|p| 10.0 * p.headline());
            if let Some(need) = etcd10.filter(|need| *need > bound) {
                out.push(format!(
                    "  note: 10× etcd = {need:.0} handoffs/s is above the bound {bound:.0}/s of this disk: not reachable with one durable record per handoff"
                ));
            }
        }
    }
    if let (Some(dlm), Some(p)) = (
        find(me, "uncontended", 1),
        find("redis-aof", "uncontended", 1),
    ) {
        out.push(format!(
            "target uncontended C=1: {me} acquire p50 {:.3} ms vs redis-aof p50 {:.3} ms (want ≤): {}",
            dlm.acquire.p50_ms,
            p.acquire.p50_ms,
            verdict(dlm.acquire.p50_ms <= p.acquire.p50_ms)
        ));
    }
    out
}
