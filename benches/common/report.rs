//! Result rows: latency summaries from hdrhistogram, the printed table with
//! dlm's ratio to each peer and to the physical bound, and the JSON file.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// A histogram of nanoseconds, 1 ns .. 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` (clamped into the histogram's range).
pub fn record(hist: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    hist.saturating_record(ns.max(1));
}

/// A latency distribution in milliseconds.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Summarises a histogram of nanoseconds.
    pub fn of(hist: &Histogram<u64>) -> Latency {
        let ms = |ns: u64| ns as f64 / 1e6;
        if hist.is_empty() {
            return Latency::default();
        }
        Latency {
            count: hist.len(),
            mean_ms: hist.mean() / 1e6,
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            p999_ms: ms(hist.value_at_quantile(0.999)),
            max_ms: ms(hist.max()),
        }
    }

    /// `p50 0.123 ms, p99 …`
    pub fn line(&self) -> String {
        format!(
            "n {} mean {:.3} p50 {:.3} p99 {:.3} p999 {:.3} max {:.3} ms",
            self.count, self.mean_ms, self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Grants per client over a contended row.
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Fairness {
    pub min_grants: u64,
    pub max_grants: u64,
    /// Jain's index: 1.0 when every client got the same number of grants,
    /// 1/n when one client got them all.
    pub jain: f64,
}

impl Fairness {
    /// Fairness of these per-client grant counts.
    pub fn of(grants: &[u64]) -> Fairness {
        let sum: f64 = grants.iter().map(|&g| g as f64).sum();
        let squares: f64 = grants.iter().map(|&g| (g as f64) * (g as f64)).sum();
        Fairness {
            min_grants: grants.iter().copied().min().unwrap_or(0),
            max_grants: grants.iter().copied().max().unwrap_or(0),
            jain: if squares > 0.0 {
                sum * sum / (grants.len() as f64 * squares)
            } else {
                0.0
            },
        }
    }
}

/// One row of a table: a (system, transport, workload, clients) measurement.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Row {
    pub system: String,
    pub transport: String,
    pub workload: String,
    pub clients: usize,
    pub secs: f64,
    /// Completed cycles (acquire … release) inside the measured span.
    pub cycles: u64,
    pub cycles_per_sec: f64,
    /// Requests per second (acquire, release, appends).
    pub ops_per_sec: f64,
    /// Grants to a different client than the previous holder, per second.
    pub handoffs_per_sec: Option<f64>,
    pub fairness: Option<Fairness>,
    /// From sending the acquire to holding the lock.
    pub acquire: Latency,
    /// Every other call of a cycle: the release and, in critical sections,
    /// the appends.
    pub other_calls: Latency,
    /// CPU cores the server process used during the span.
    pub server_cpu: Option<f64>,
    /// CPU cores the bench (client) process used during the span.
    pub client_cpu: Option<f64>,
    pub errors: u64,
    /// Mean 4 KiB append + fdatasync latency probed for 0.25 s just before
    /// and just after the row: shows when the disk drifted during a row.
    pub fsync_ms: Option<f64>,
    /// The fsync + round-trip bound on the row's headline figure, per second.
    pub bound_per_sec: Option<f64>,
    pub bound_note: String,
    pub load_before: String,
    pub note: String,
}

impl Row {
    /// The figure rows are compared by: handoffs/s when contended, else cycles/s.
    pub fn headline(&self) -> f64 {
        self.handoffs_per_sec.unwrap_or(self.cycles_per_sec)
    }
}

fn fmt_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn fmt_ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// Peers whose rows dlm rows are compared to, in column order.
pub const PEERS: [&str; 3] = ["etcd", "redis-aof", "redis-mem"];

/// The table as Markdown, with dlm's ratio to each peer of the same
/// (workload, clients) and the share of the bound it reached.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| system | transport | workload | C | cycles/s | handoffs/s | acquire p50 / p99 / p999 / max ms \
         | fairness min–max (Jain) | CPU srv + bench | fsync ms | bound/s | % of bound | vs etcd | vs redis-aof | vs redis-mem |\n",
    );
    out.push_str("|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        let handoffs = row.handoffs_per_sec.map_or("–".to_owned(), fmt_rate);
        let fairness = row.fairness.map_or("–".to_owned(), |f| {
            format!("{}–{} ({:.2})", f.min_grants, f.max_grants, f.jain)
        });
        let cpu = format!(
            "{} + {}",
            row.server_cpu.map_or("–".to_owned(), |c| format!("{c:.2}")),
            row.client_cpu.map_or("–".to_owned(), |c| format!("{c:.2}"))
        );
        let fsync = row.fsync_ms.map_or("–".to_owned(), |f| format!("{f:.3}"));
        let bound = row.bound_per_sec.map_or("–".to_owned(), fmt_rate);
        let share = row.bound_per_sec.map_or("–".to_owned(), |b| {
            format!("{:.0}%", 100.0 * row.headline() / b)
        });
        let mut ratios = Vec::new();
        for peer in PEERS {
            let ratio = if row.system.starts_with("dlm") {
                rows.iter()
                    .find(|r| {
                        r.system == peer && r.workload == row.workload && r.clients == row.clients
                    })
                    .filter(|r| r.headline() > 0.0)
                    .map(|r| format!("{:.2}×", row.headline() / r.headline()))
            } else {
                None
            };
            ratios.push(ratio.unwrap_or_else(|| "–".to_owned()));
        }
        let a = &row.acquire;
        let errors = if row.errors > 0 {
            format!(" ({} errors)", row.errors)
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {}{} | {} | {} / {} / {} / {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.system,
            row.transport,
            row.workload,
            row.clients,
            fmt_rate(row.cycles_per_sec),
            errors,
            handoffs,
            fmt_ms(a.p50_ms),
            fmt_ms(a.p99_ms),
            fmt_ms(a.p999_ms),
            fmt_ms(a.max_ms),
            fairness,
            cpu,
            fsync,
            bound,
            share,
            ratios[0],
            ratios[1],
            ratios[2],
        ));
    }
    out
}

/// Writes `value` to `target/bench-results/<bench>-<unix time>.json` and
/// `<bench>-latest.json`; returns the first path.
///
/// # Errors
/// I/O errors.
pub fn write_json(bench: &str, value: &serde_json::Value) -> std::io::Result<PathBuf> {
    let dir = super::target_dir().join("bench-results");
    std::fs::create_dir_all(&dir)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    let path = dir.join(format!("{bench}-{stamp}.json"));
    std::fs::write(&path, &text)?;
    std::fs::write(dir.join(format!("{bench}-latest.json")), &text)?;
    Ok(path)
}

/// Seconds since the Unix epoch, for the JSON.
pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
