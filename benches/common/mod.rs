//! Shared by the bench binaries (`cargo bench --bench NAME`, harness = false).
//!
//! - [`settings`]: run length and row filters, from the environment and args;
//! - [`report`]: the result rows, the printed table and the JSON file under
//!   `target/bench-results/`;
//! - [`physical`]: the machine's limits measured in the same run (fsync of a
//!   4 KiB write, loopback round trip);
//! - [`procs`]: servers started as child processes, on loopback only, killed
//!   when the bench ends (even if it panics or is killed itself);
//! - [`systems`]: dlm, etcd and Redis behind one acquire/release interface.
//!
//! Everything here is for measuring; nothing here is used by dlm itself.

pub mod physical;
pub mod procs;
pub mod report;
pub mod settings;
pub mod systems;

use std::path::{Path, PathBuf};

/// The cargo target directory this bench binary was built into
/// (`<target>/release/deps/<bench>-<hash>`), so results land next to it.
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|dir| dir.join("release").is_dir())
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// A fresh temporary directory under `<target>/bench-tmp/`, on the normal
/// disk (not tmpfs), removed when dropped.
///
/// # Panics
/// When the directory cannot be created: a bench cannot run without it.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    let base = target_dir().join("bench-tmp");
    std::fs::create_dir_all(&base).expect("creating target/bench-tmp");
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .expect("creating a temporary directory")
}

/// Filesystem type and device of the mount holding `path` (longest mount
/// point that prefixes it), e.g. `ext4 /dev/vda`.
pub fn filesystem_of(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 {
            continue;
        }
        let (device, mount_point, fs_type) = (fields[0], fields[1], fields[2]);
        if path.starts_with(mount_point)
            && best
                .as_ref()
                .is_none_or(|(len, _)| mount_point.len() > *len)
        {
            best = Some((mount_point.len(), format!("{fs_type} {device}")));
        }
    }
    best.map(|(_, s)| s).unwrap_or_else(|| "unknown".to_owned())
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` shows them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What this machine is, for the header of a run and its JSON.
#[derive(serde::Serialize, Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub bench_fs: String,
    pub load_at_start: String,
    /// The idle driver and, under `haltpoll`, the guest's halt polling:
    /// in a VM, how long an idle vCPU polls before it halts decides what
    /// a wake-up costs, and so the latency of every one-client row.
    pub cpuidle: String,
}

impl Machine {
    /// Reads /proc for the model, cores, memory and kernel.
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        let base = target_dir().join("bench-tmp");
        let _ = std::fs::create_dir_all(&base);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            bench_fs: filesystem_of(&base),
            load_at_start: load_average(),
            cpuidle: cpuidle(),
        }
    }

    /// One header line.
    pub fn line(&self) -> String {
        format!(
            "machine: {} cores ({}), {:.0} GiB, Linux {}; bench dirs on {}; cpuidle {}; load {}",
            self.cores,
            self.cpu,
            self.memory_gib,
            self.kernel,
            self.bench_fs,
            self.cpuidle,
            self.load_at_start
        )
    }
}

/// The cpuidle driver, e.g. `haltpoll (guest halt polling 0 ns)`, or
/// `unknown`.
pub fn cpuidle() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    let Some(driver) = read("/sys/devices/system/cpu/cpuidle/current_driver") else {
        return "unknown".to_owned();
    };
    match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        Some(ns) if driver == "haltpoll" => format!("{driver} (guest halt polling {ns} ns)"),
        _ => driver,
    }
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat`; `None` when the process is gone.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; fields after ')' are fixed.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks.max(1.0))
}
