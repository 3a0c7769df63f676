//! How long each row runs and which rows run.
//!
//! Environment:
//! - `DLM_BENCH_SECS` — measured seconds per row (default 3);
//! - `DLM_BENCH_WARMUP_SECS` — warm-up seconds before each row (default 1);
//! - `DLM_BENCH_DLM_BIN` — another `dlm` binary to bench (default: the one
//!   cargo built with the bench), e.g. to compare two builds;
//! - `DLM_BENCH_COMPARE_BIN` — a second `dlm` binary, benched as `dlm-b`
//!   (gRPC) and `dlm-b-quic` next to `dlm` and `dlm-quic` in the same run
//!   (A/B of two builds);
//! - `DLM_BENCH_SERVER_ARGS` — extra `dlm server` flags (whitespace-separated);
//! - `DLM_BENCH_RECORDS` — log lengths of the recovery bench.
//!
//! Arguments (after `--`) are filter words: a system (`dlm` = every dlm
//! row, `dlm-b` = both rows of the second build, `dlm-b-quic`, `etcd`, `redis` = both Redis rows, `redis-aof`, `redis-mem`), a workload
//! (`uncontended`, `contended`, `critical-section`, `no-fsync`) or a client count (replaces
//! the default counts). Words of one kind are alternatives; kinds combine.
//! `cargo bench` itself passes `--bench`, which is ignored.

use std::time::Duration;

/// Run length and filters.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Settings {
    pub secs: f64,
    pub warmup_secs: f64,
    pub systems: Vec<String>,
    pub workloads: Vec<String>,
    pub clients: Vec<usize>,
    /// Words that were not understood (reported, not fatal).
    pub unknown: Vec<String>,
}

const SYSTEMS: [&str; 8] = [
    "dlm",
    "dlm-b",
    "dlm-quic",
    "dlm-b-quic",
    "etcd",
    "redis",
    "redis-aof",
    "redis-mem",
];
const WORKLOADS: [&str; 4] = ["uncontended", "contended", "critical-section", "no-fsync"];

fn env_secs(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0 && *v <= 600.0)
        .unwrap_or(default)
}

impl Settings {
    /// Reads the environment and the command line.
    pub fn from_env_and_args() -> Settings {
        let mut settings = Settings {
            secs: env_secs("DLM_BENCH_SECS", 3.0).max(0.1),
            warmup_secs: env_secs("DLM_BENCH_WARMUP_SECS", 1.0),
            systems: Vec::new(),
            workloads: Vec::new(),
            clients: Vec::new(),
            unknown: Vec::new(),
        };
        for arg in std::env::args().skip(1) {
            if arg.starts_with("--") {
                continue;
            }
            if SYSTEMS.contains(&arg.as_str()) {
                settings.systems.push(arg);
            } else if WORKLOADS.contains(&arg.as_str()) {
                settings.workloads.push(arg);
            } else if let Some(n) = arg.parse::<usize>().ok().filter(|n| (1..=1024).contains(n)) {
                settings.clients.push(n);
            } else {
                settings.unknown.push(arg);
            }
        }
        settings
    }

    /// The measured span of a row.
    pub fn measure(&self) -> Duration {
        Duration::from_secs_f64(self.secs)
    }

    /// The warm-up before it.
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_secs)
    }

    /// Whether `system` (e.g. `redis-aof`) was selected.
    pub fn wants_system(&self, system: &str) -> bool {
        self.systems.is_empty()
            || self
                .systems
                .iter()
                .any(|s| s == system || (s.len() < system.len() && system.starts_with(s.as_str())))
    }

    /// Whether `workload` was selected.
    pub fn wants_workload(&self, workload: &str) -> bool {
        self.workloads.is_empty() || self.workloads.iter().any(|w| w == workload)
    }

    /// The client counts to run: the ones asked for, else `defaults`.
    pub fn client_counts(&self, defaults: &[usize]) -> Vec<usize> {
        if self.clients.is_empty() {
            defaults.to_vec()
        } else {
            self.clients.clone()
        }
    }
}
