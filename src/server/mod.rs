//! The server shell: recovery, the engine, the writer, the transports.
//!
//! ```text
//!  transports ──call──▶ engine: Core under a lock ──Job queue──▶ group commit
//!  (gRPC, QUIC)         (clock, timer task for       (by the caller when no one
//!                        deadlines)                    is writing, else by the
//!                                                      background writer), then
//!                                                      file writes, then replies
//! ```
//!
//! Owns: turning the pure core into a running service. Every call is fed to
//! the core with the current time, the timer ticks it at its next deadline,
//! and the outputs are queued in order for a writer, which makes the records
//! durable before it writes files or releases replies (see `engine.rs`).
//! Must not: contain lock rules (those are the core's) or wire formats (the
//! transports').

mod engine;
pub mod handle;
pub mod listen;
pub mod writer;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::core::records::Snapshot;
use crate::core::staging::FileLengths;
use crate::core::time::{Millis, Time};
use crate::core::{Core, CoreConfig, Output, Plants, ReplayError};
use crate::files::DataFiles;
use crate::log::{LogError, Reopened, Wal};
use crate::storage::{Dir, FsDir};

pub use handle::{Handle, HeldReply, ShuttingDown};
pub use listen::Bound;
use listen::MOST_APPEND_BYTES;
use writer::Persister;

/// Name of the server's own subdirectory of the data directory.
pub const STATE_DIR: &str = "state";

/// `--keepalive-ms` and `--keepalive-timeout-ms` by default: [`Keepalive::DEFAULT`].
///
/// [`Keepalive::DEFAULT`]: crate::transport::Keepalive::DEFAULT
const KEEPALIVE_MS: u64 = crate::transport::Keepalive::DEFAULT.interval.as_millis() as u64;
const KEEPALIVE_TIMEOUT_MS: u64 = crate::transport::Keepalive::DEFAULT.timeout.as_millis() as u64;

/// `dlm server` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerConfig {
    /// Address for gRPC (use port 0 for any free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Also serve QUIC on this UDP address (port 0: any free port). QUIC is
    /// always TLS: see --cert.
    #[arg(long, value_name = "ADDR")]
    pub listen_quic: Option<SocketAddr>,
    /// The transport clients use: `grpc`, or `quic` to serve QUIC on the
    /// --listen address as well (same port, over UDP; gRPC stays on TCP for
    /// the original clients). --listen-quic picks another QUIC address.
    #[arg(long, value_enum, default_value_t = ServerTransport::Grpc)]
    pub transport: ServerTransport,
    /// Serve gRPC over TLS instead of plain text.
    #[arg(long)]
    pub tls: bool,
    /// Certificate chain (PEM) for TLS and QUIC [default: a development
    /// certificate, made on first start under DIR/state/tls with its CA]
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM) on gRPC (needs
    /// --tls) and QUIC. A certificate admits a client; the client id is still
    /// the one each request names.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Directory of file_0 … file_99; the server's own state goes in DIR/state.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// Lease of a grant whose acquire names none, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub lease_ms: u64,
    /// Shortest lease a client may ask for, in milliseconds.
    #[arg(long, default_value_t = 10)]
    pub min_lease_ms: u64,
    /// Longest lease a client may ask for, in milliseconds.
    #[arg(long, default_value_t = 3_600_000)]
    pub max_lease_ms: u64,
    /// Largest single append, in bytes (at most 64 MiB).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_append_bytes: usize,
    /// How many answers the request-id dedup table keeps.
    #[arg(long, default_value_t = 100_000)]
    pub dedup_capacity: usize,
    /// Most cut-off waiters whose places are kept at once (for a retry
    /// with the same request id); a waiter cut off beyond it leaves the
    /// queue at once.
    #[arg(long, default_value_t = 100_000)]
    pub max_detached_waiters: usize,
    /// Write a snapshot and start a new log after this many records.
    #[arg(long, default_value_t = 100_000)]
    pub snapshot_every: u64,
    /// Zero-filled space kept ahead of the log (bytes, or with KiB / MiB;
    /// 0: none). Group commits into space that exists are cheaper to make
    /// durable.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub log_prealloc: u64,
    /// Most client connections at once, per transport. Past it, gRPC closes
    /// a new connection at once and QUIC refuses it in the handshake.
    #[arg(long, default_value_t = crate::transport::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// The slowest a request may arrive, on average, in bytes per second
    /// (bytes, or with KiB / MiB): each request may take 30 s plus one
    /// second per this many bytes received (0: no bound on a whole
    /// request, only 30 s without a byte). Per request: concurrent uploads
    /// on one slow link share it.
    #[arg(long, value_name = "SIZE", default_value = "64KiB", value_parser = parse_size)]
    pub min_request_rate: u64,
    /// Bytes of file-read replies held at once, from the read until the
    /// reply has left (bytes, or with KiB / MiB / GiB; 1 to 4 GiB - 1). A
    /// read waits until its file's share is free, so a client that does not
    /// take its replies holds up other reads, not the server's memory.
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub max_read_reply_bytes: u64,
    /// Bytes of requests held at once while they arrive, over both
    /// transports (bytes, or with KiB / MiB / GiB). A request's bytes count
    /// as they arrive, until it is decoded; one whose bytes find no room is
    /// refused RESOURCE_EXHAUSTED (clients retry with backoff). Appends may fill three quarters of it; the rest is
    /// for small calls (renewals, releases). At least 4/3 of the largest
    /// request (the largest append plus its envelope, 4 MiB at least).
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub max_inflight_request_bytes: u64,
    /// Ping a client connection after this many milliseconds without
    /// hearing from it (HTTP/2 pings for gRPC, QUIC pings).
    #[arg(long, default_value_t = KEEPALIVE_MS)]
    pub keepalive_ms: u64,
    /// Close a connection whose client stays silent this many milliseconds
    /// after the ping: its calls are cut off, and a waiting acquire is
    /// detached instead of being granted a lock nobody would release.
    #[arg(long, default_value_t = KEEPALIVE_TIMEOUT_MS)]
    pub keepalive_timeout_ms: u64,
    /// Log records longer than this are written as runs of their changes
    /// (not a flag: the simulations lower it to cut records of a few
    /// changes, which the production size never would).
    #[arg(skip = crate::log::SPLIT_RECORD_BYTES)]
    pub split_record_bytes: usize,
}

/// A size in bytes: `4096`, `8KiB`, `64MiB` (K/M/G, with or without `iB`).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (say 4096, 8KiB or 64MiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use KiB, MiB or GiB)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

impl ServerConfig {
    /// The defaults of the command line, for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_quic: None,
            transport: ServerTransport::Grpc,
            tls: false,
            cert: None,
            key: None,
            client_ca: None,
            data_dir: data_dir.into(),
            lease_ms: 30_000,
            min_lease_ms: 10,
            max_lease_ms: 3_600_000,
            max_append_bytes: 1 << 20,
            dedup_capacity: 100_000,
            max_detached_waiters: 100_000,
            snapshot_every: 100_000,
            log_prealloc: crate::log::DEFAULT_PREALLOC,
            max_connections: crate::transport::MAX_CONNECTIONS,
            min_request_rate: crate::transport::MIN_REQUEST_RATE,
            max_read_reply_bytes: handle::READ_REPLY_BUDGET,
            max_inflight_request_bytes: crate::transport::budget::DEFAULT_BYTES,
            keepalive_ms: KEEPALIVE_MS,
            keepalive_timeout_ms: KEEPALIVE_TIMEOUT_MS,
            split_record_bytes: crate::log::SPLIT_RECORD_BYTES,
        }
    }

    /// How connections are watched (`--keepalive-ms`,
    /// `--keepalive-timeout-ms`).
    pub fn keepalive(&self) -> crate::transport::Keepalive {
        crate::transport::Keepalive {
            interval: Duration::from_millis(self.keepalive_ms),
            timeout: Duration::from_millis(self.keepalive_timeout_ms),
        }
    }

    /// The core's limits.
    pub fn core_config(&self) -> CoreConfig {
        CoreConfig {
            default_lease: Millis(self.lease_ms),
            min_lease: Millis(self.min_lease_ms),
            max_lease: Millis(self.max_lease_ms),
            max_append_bytes: self.max_append_bytes,
            dedup_capacity: self.dedup_capacity,
            max_detached: self.max_detached_waiters,
            ..CoreConfig::default()
        }
    }
}

/// `dlm server --transport`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServerTransport {
    /// gRPC on --listen (and QUIC only if --listen-quic is given).
    #[default]
    Grpc,
    /// gRPC on --listen over TCP and QUIC on the same address over UDP.
    Quic,
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("the log does not fit its snapshot: {0}")]
    Replay(#[from] ReplayError),
    #[error("data files: {0}")]
    Data(#[from] std::io::Error),
    #[error("storage failure, stopping (the error is in the log above)")]
    StorageFailed,
    #[error("transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::transport::tls::TlsError),
}

/// What recovery did, for the start-up log line.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub records_replayed: usize,
    pub torn_bytes: u64,
    pub grants: usize,
}

/// Sees every output of the core as it is made (before it is durable), with
/// the time; the simulation's history checker uses it. Setting one turns the
/// core's queue tracing on.
pub type Observer = Box<dyn FnMut(Time, &Output) + Send>;

/// A recovered core with its storage, ready to run.
pub struct Recovered {
    pub core: Core,
    pub persister: Persister,
    pub records_since_snapshot: u64,
    pub report: RecoveryReport,
    /// Set by a simulation before [`Node::start`]; `None` in production.
    pub observer: Option<Observer>,
}

/// The most zeros a log keeps ahead of its data (`--log-prealloc`).
pub const MOST_LOG_PREALLOC: u64 = 1 << 30;

/// The limits that decide what the log may hold, checked before anything is
/// recovered or served, whoever starts the server (the binary also checks
/// them before it binds). An append larger than the log's record limit
/// would be acknowledged and then refuse the next start.
fn check_storage_limits(config: &ServerConfig) -> Result<(), ServerError> {
    if config.max_append_bytes == 0 || config.max_append_bytes > MOST_APPEND_BYTES {
        return Err(ServerError::Config(format!(
            "--max-append-bytes must be between 1 and {MOST_APPEND_BYTES} (64 MiB), got {}",
            config.max_append_bytes
        )));
    }
    if config.log_prealloc > MOST_LOG_PREALLOC {
        return Err(ServerError::Config(format!(
            "--log-prealloc must be at most {MOST_LOG_PREALLOC} (1 GiB), got {}",
            config.log_prealloc
        )));
    }
    Ok(())
}

/// Recovers the durable state from `state` and brings the data files in
/// `data` to exactly what the log says (re-applying committed writes at their
/// offsets, trimming uncommitted bytes). `plants` is for the simulation's
/// planted bugs; production passes `Plants::default()` (none).
///
/// # Errors
/// [`ServerError`] on damage or I/O failure; nothing is served then.
pub fn recover(
    config: &ServerConfig,
    data: Box<dyn Dir>,
    state: Box<dyn Dir>,
    seed: [u8; 32],
    now: Time,
    plants: Plants,
) -> Result<Recovered, ServerError> {
    check_storage_limits(config)?;
    let core_config = config.core_config();
    if core_config.min_lease.0 == 0
        || core_config.min_lease > core_config.max_lease
        || core_config.default_lease < core_config.min_lease
        || core_config.default_lease > core_config.max_lease
    {
        return Err(ServerError::Config(format!(
            "need 0 < min-lease-ms <= lease-ms <= max-lease-ms, got {} <= {} <= {}",
            config.min_lease_ms, config.lease_ms, config.max_lease_ms
        )));
    }
    let mut files = DataFiles::open(data)?;
    // Before the log: a new state directory's first snapshot records these
    // lengths as committed, so the bytes must be durable first.
    files.sync_all()?;
    let lengths = files.lengths()?;
    // Each record is replayed as soon as it is decoded: a long log is never
    // held in memory as decoded records, and the replay takes them by value.
    let reopened = Wal::recover_each(
        state,
        config.log_prealloc,
        || Snapshot {
            file_lengths: FileLengths::from_vec(lengths).unwrap_or_default(),
            ..Snapshot::default()
        },
        |snapshot, counts| {
            let mut core = Core::restore(core_config, seed, snapshot);
            core.set_plants(plants);
            // Answers a long log's replay would evict before its end are
            // never put in the dedup table (a quarter of a 1 M-record start).
            core.plan_replay(counts.answers);
            Ok::<_, ServerError>((core, files.replay()))
        },
        |(core, replay), record| {
            for write in core.replay(record)? {
                replay.apply(&write)?;
            }
            Ok(())
        },
    )?;
    let Reopened {
        state: (mut core, replay),
        mut wal,
        torn_bytes,
    } = reopened;
    wal.set_split_bytes(config.split_record_bytes);
    replay.finish()?;
    // One copy of the state serves both the trim and the report (a snapshot
    // copies the whole dedup memory, which is not free on a large server).
    let snapshot = core.snapshot();
    let short = files.trim_to(&snapshot.file_lengths)?;
    if !short.is_empty() {
        tracing::warn!(files = ?short, "data files were shorter than committed; damaged outside dlm");
    }
    files.sync()?;
    core.resume(now);
    let records_since_snapshot = wal.records_since_snapshot();
    let report = RecoveryReport {
        records_replayed: records_since_snapshot as usize,
        torn_bytes,
        grants: snapshot.grants.len(),
    };
    Ok(Recovered {
        core,
        persister: Persister::new(wal, files),
        records_since_snapshot,
        report,
        observer: None,
    })
}

/// Fresh randomness for tokens, from the operating system.
pub fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    seed
}

/// Milliseconds since the server started, as the core's [`Time`].
#[derive(Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock whose origin is now.
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    /// The current time.
    pub fn now(&self) -> Time {
        Time::from_millis(self.start.elapsed().as_millis() as u64)
    }

    /// Microseconds since the clock started (finer than [`Clock::now`]).
    pub fn micros(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The instant of a core time.
    pub fn instant(&self, at: Time) -> Instant {
        self.start + Duration::from_millis(at.as_millis())
    }
}

/// A running node: the engine (core, queue, group commit), its timer and its
/// background writer, reachable through [`Handle`].
pub struct Node {
    handle: Handle,
    timer: JoinHandle<()>,
    writer: WriterTask,
    /// Fires when storage fails.
    failed: Option<mpsc::UnboundedReceiver<()>>,
    /// Stops the background work if the node is dropped without
    /// [`Node::shutdown`].
    _stop: StopOnDrop,
}

/// A node dropped without [`Node::shutdown`] (an error path of an embedder,
/// a test that panicked) still stops: no new calls, the timer ends, and the
/// writer thread carries out what was queued and exits instead of waiting
/// for a wake-up forever with the state directory open. Nothing is joined:
/// a drop must not block. Harmless after `shutdown`, which does the same
/// and waits.
struct StopOnDrop(Arc<engine::Engine>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

enum WriterTask {
    Thread(std::thread::JoinHandle<()>),
    Task(JoinHandle<()>),
}

/// How the background writer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterMode {
    /// On its own OS thread (production: its fsyncs block only it).
    Thread,
    /// As a task on the current runtime (deterministic simulation).
    Task,
}

/// A server's data directory and its state directory, locked for this
/// process (`DIR/state/LOCK`). `dlm server` takes them before anything is
/// written under them (the development certificates and QUIC's secret
/// included), so that a server refused because another one runs on the
/// directory leaves it as it was.
pub struct Directories {
    data: FsDir,
    state: FsDir,
}

impl Directories {
    /// Opens (creating) `config.data_dir` and locks its state directory.
    ///
    /// # Errors
    /// [`ServerError::Data`] when a directory cannot be made or opened, or
    /// another server holds the lock.
    pub fn lock(config: &ServerConfig) -> Result<Directories, ServerError> {
        let data = FsDir::open(&config.data_dir)?;
        let state = FsDir::open_exclusive(config.data_dir.join(STATE_DIR))?;
        Ok(Directories { data, state })
    }
}

impl Node {
    /// Recovers from the filesystem under `config.data_dir` and starts.
    ///
    /// # Errors
    /// [`ServerError`] when recovery fails.
    pub fn start_fs(config: &ServerConfig) -> Result<(Node, RecoveryReport), ServerError> {
        Node::start_in(config, Directories::lock(config)?)
    }

    /// Recovers from directories already locked and starts.
    ///
    /// # Errors
    /// [`ServerError`] when recovery fails.
    pub fn start_in(
        config: &ServerConfig,
        directories: Directories,
    ) -> Result<(Node, RecoveryReport), ServerError> {
        let Directories { data, state } = directories;
        // The grants that survive get a fresh lease from the core's time at
        // resume, the end of recovery: the clock starts there (time zero),
        // so that a long replay does not eat into those leases.
        let recovered = recover(
            config,
            Box::new(data),
            Box::new(state),
            os_seed(),
            Time::ZERO,
            Plants::default(),
        )?;
        let clock = Clock::start();
        let report = recovered.report.clone();
        Ok((
            Node::start(config, recovered, clock, WriterMode::Thread),
            report,
        ))
    }

    /// Starts the engine, its timer and its background writer over
    /// recovered state.
    pub fn start(
        config: &ServerConfig,
        recovered: Recovered,
        clock: Clock,
        mode: WriterMode,
    ) -> Node {
        let (failed_tx, failed_rx) = mpsc::unbounded_channel();
        let mut persister = recovered.persister;
        if mode == WriterMode::Thread {
            persister.write_snapshots_in_background();
        }
        let mut core = recovered.core;
        core.set_tracing(recovered.observer.is_some());
        // The engine's end of the writer's wake-up, and the writer's end.
        enum WriterEnd {
            Thread(std::sync::mpsc::Receiver<()>),
            Task(Arc<Notify>),
        }
        let (wake, writer_end) = match mode {
            WriterMode::Thread => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                (engine::Wake::Thread(tx), WriterEnd::Thread(rx))
            }
            WriterMode::Task => {
                let notify = Arc::new(Notify::new());
                (engine::Wake::Task(notify.clone()), WriterEnd::Task(notify))
            }
        };
        let data = persister.data_dir();
        let engine = Arc::new(engine::Engine {
            data,
            reads: Arc::new(tokio::sync::Semaphore::new(handle::MAX_READS)),
            reply_bytes: engine::ReplyBudget::new(config.max_read_reply_bytes),
            request_bytes: crate::transport::budget::RequestBudget::new(
                config.max_inflight_request_bytes,
            ),
            blocking_reads: mode == WriterMode::Thread,
            state: Mutex::new(engine::State {
                observer: recovered.observer,
                pending: HashMap::new(),
                queue: Vec::new(),
                since_snapshot: recovered.records_since_snapshot,
                snapshot_every: config.snapshot_every.max(1),
                timer_at: None,
                closed: false,
                dropped: Vec::new(),
                late_grants: core.plants().late_grants.then(Vec::new),
                core,
            }),
            io: Mutex::new(engine::Io {
                persister,
                failed: false,
            }),
            clock,
            wake,
            timer: Notify::new(),
            next_call: AtomicU64::new(0),
            failed_tx,
            stopping: AtomicBool::new(false),
            writer_busy: AtomicBool::new(false),
            writer_idle_since: AtomicU64::new(0),
            last_group: AtomicU64::new(0),
        });
        let writer = match writer_end {
            WriterEnd::Thread(wakes) => {
                let engine = engine.clone();
                WriterTask::Thread(
                    std::thread::Builder::new()
                        .name("dlm-writer".into())
                        .spawn(move || engine::run_thread(engine, wakes))
                        .expect("spawning the writer thread"),
                )
            }
            WriterEnd::Task(notify) => {
                WriterTask::Task(tokio::spawn(engine::run_task(engine.clone(), notify)))
            }
        };
        let timer = tokio::spawn(engine::run_timer(engine.clone()));
        Node {
            handle: Handle {
                engine: engine.clone(),
            },
            timer,
            writer,
            failed: Some(failed_rx),
            _stop: StopOnDrop(engine),
        }
    }

    /// A way in for transports.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Resolves if the node stops on its own (a storage failure).
    pub fn failed(&mut self) -> impl Future<Output = ()> + use<> {
        let rx = self.failed.take();
        async move {
            match rx {
                Some(mut rx) => {
                    let _ = rx.recv().await;
                }
                None => std::future::pending().await,
            }
        }
    }

    /// Stops taking calls, lets the writer finish what was queued, and
    /// reports a storage failure if there was one.
    ///
    /// # Errors
    /// [`ServerError::StorageFailed`] after a storage failure.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let Node {
            handle,
            timer,
            writer,
            ..
        } = self;
        let engine = handle.engine;
        engine.stop();
        timer.abort();
        let _ = timer.await;
        match writer {
            WriterTask::Thread(thread) => {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
            WriterTask::Task(task) => {
                let _ = task.await;
            }
        }
        if engine.has_failed() {
            return Err(ServerError::StorageFailed);
        }
        Ok(())
    }
}

/// Serves gRPC for a started `node` on `listener` until `shutdown` resolves
/// (or storage fails), then shuts the node down.
///
/// # Errors
/// [`ServerError`] when the transport fails or storage fails.
pub async fn serve(
    listener: TcpListener,
    node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let config = ServerConfig::new(PathBuf::new());
    serve_bound(Bound::grpc_only(listener, &config), node, shutdown).await
}

/// Serves every transport of `bound` (gRPC, and QUIC if bound) for a started
/// `node` until `shutdown` resolves, storage fails or a transport fails;
/// then stops them all and shuts the node down.
///
/// # Errors
/// [`ServerError`] when a transport fails or storage fails.
pub async fn serve_bound(
    bound: Bound,
    mut node: Node,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let failed = node.failed();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let engine = node.handle().engine;
    let stop = async {
        tokio::select! {
            _ = shutdown => {},
            _ = failed => tracing::error!("core or writer stopped; shutting down"),
            () = stopped(stop_rx.clone()) => {},
        }
        let _ = stop_tx.send(true);
        // Before the transports drain: a waiting call ends now ("shutting
        // down"; its client retries after the restart) instead of holding
        // gRPC's graceful drain open until it is granted, while the timer,
        // left running, expired the leases of holders that could no longer
        // renew. A crash keeps those grants; so does a graceful stop.
        engine.stop();
    };
    let Bound {
        grpc,
        grpc_tls,
        grpc_limits,
        quic,
        quic_limits,
        ..
    } = bound;
    let grpc = async {
        let served = crate::transport::grpc::serve(
            grpc,
            node.handle(),
            grpc_tls.as_ref(),
            grpc_limits,
            stopped(stop_rx.clone()),
        )
        .await;
        // However gRPC ended, everything else stops too.
        let _ = stop_tx.send(true);
        served
    };
    let quic = async {
        if let Some(endpoint) = quic {
            crate::transport::quic::server::serve(
                endpoint,
                node.handle(),
                quic_limits,
                stopped(stop_rx.clone()),
            )
            .await;
        }
    };
    let ((), served, ()) = tokio::join!(stop, grpc, quic);
    let stopped = node.shutdown().await;
    served.map_err(|e| ServerError::Transport(e.to_string()))?;
    stopped
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{parse_size, Node, ServerConfig};
    use crate::core::types::{CallId, Request};
    use crate::core::Input;

    /// The configuration `dlm server ARGS` runs with.
    fn server_flags(args: &[&str]) -> ServerConfig {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            config: ServerConfig,
        }
        let args = std::iter::once("dlm").chain(args.iter().copied());
        Flags::try_parse_from(args).unwrap().config
    }

    /// `dlm server` with no flags runs what `ServerConfig::new` says (the
    /// library's callers and the binary agree on every default), but for
    /// the address: the library's is a free port.
    #[test]
    fn the_flags_defaults_are_the_librarys() {
        let parsed = server_flags(&[]);
        let mut new = ServerConfig::new(parsed.data_dir.clone());
        assert_eq!(new.listen.port(), 0);
        new.listen = parsed.listen;
        assert_eq!(format!("{parsed:?}"), format!("{new:?}"));
    }

    /// `--min-request-rate` reaches both transports' limits.
    #[tokio::test]
    async fn the_min_request_rate_reaches_both_transports() {
        let config = server_flags(&["--min-request-rate", "1KiB"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bound = crate::server::Bound::grpc_only(listener, &config);
        assert_eq!(bound.grpc_limits.min_request_rate, 1024);
        assert_eq!(bound.quic_limits.min_request_rate, 1024);
    }

    /// A server on `dir` with no space preallocated ahead of its log.
    fn small_config(dir: &std::path::Path) -> ServerConfig {
        let mut config = ServerConfig::new(dir.to_path_buf());
        config.log_prealloc = 0;
        config
    }

    /// Whoever starts a server (the binary checks the flags before it
    /// binds, a library caller may not), limits under which the log could
    /// acknowledge a record that a later start refuses, or overflow its
    /// arithmetic, are refused before anything is recovered.
    #[test]
    fn a_server_is_not_started_with_limits_its_log_cannot_keep() {
        let tmp = tempfile::tempdir().unwrap();
        let mut too_large = small_config(tmp.path());
        too_large.max_append_bytes = super::MOST_APPEND_BYTES + 1;
        let mut prealloc = small_config(tmp.path());
        prealloc.log_prealloc = u64::MAX;
        for bad in [too_large, prealloc] {
            assert!(
                matches!(Node::start_fs(&bad), Err(super::ServerError::Config(_))),
                "{bad:?}"
            );
        }
        let mut largest = small_config(tmp.path());
        largest.max_append_bytes = super::MOST_APPEND_BYTES;
        largest.log_prealloc = super::MOST_LOG_PREALLOC;
        assert!(super::check_storage_limits(&largest).is_ok());
    }

    /// Reads of `file_7` wait at the gate: `reached` says one has begun, a
    /// message on `open` lets it go on.
    struct Gate {
        reached: std::sync::mpsc::SyncSender<()>,
        open: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Gate {
        fn pass(&self, name: &str) {
            if name == "file_7" {
                let _ = self.reached.try_send(());
                let _ = self.open.lock().unwrap().recv();
            }
        }
    }

    struct GatedDir {
        inner: crate::storage::FsDir,
        gate: Arc<Gate>,
    }

    struct GatedFile {
        inner: Box<dyn crate::storage::DirFile>,
        name: String,
        gate: Arc<Gate>,
    }

    impl crate::storage::Dir for GatedDir {
        fn list(&self) -> std::io::Result<Vec<String>> {
            self.inner.list()
        }
        fn read(&self, name: &str) -> std::io::Result<Vec<u8>> {
            self.gate.pass(name);
            self.inner.read(name)
        }
        fn open(
            &self,
            name: &str,
            create: bool,
        ) -> std::io::Result<Box<dyn crate::storage::DirFile>> {
            Ok(Box::new(GatedFile {
                inner: self.inner.open(name, create)?,
                name: name.to_owned(),
                gate: self.gate.clone(),
            }))
        }
        fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
            self.inner.rename(from, to)
        }
        fn remove(&self, name: &str) -> std::io::Result<()> {
            self.inner.remove(name)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.inner.sync()
        }
    }

    impl crate::storage::DirFile for GatedFile {
        fn size(&self) -> std::io::Result<u64> {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            self.gate.pass(&self.name);
            self.inner.read_at(offset, buf)
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.inner.write_at(offset, data)
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&mut self) -> std::io::Result<()> {
            self.inner.sync_data()
        }
    }

    /// A call cut off just before the engine closed (a stop under load, or
    /// a storage failure) must not keep the background writer draining
    /// forever: the node still stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_cut_off_as_the_engine_closes_does_not_keep_the_writer_running() {
        let tmp = tempfile::tempdir().unwrap();
        let (node, _) = Node::start_fs(&small_config(tmp.path())).unwrap();
        let engine = node.handle().engine;
        engine.dropped(CallId(u64::MAX));
        engine.close();
        // Not a timing assertion: the bound turns a hang into a failure.
        tokio::time::timeout(Duration::from_secs(60), node.shutdown())
            .await
            .expect("the node stops")
            .unwrap();
    }

    /// A node whose reads of `file_7` wait at a gate, with `content`
    /// committed to `file_7`: the node, a receiver told when a read reached
    /// the gate, and the sender that opens it (once per read; dropped, for
    /// good).
    async fn gated_node(
        dir: &std::path::Path,
        content: Vec<u8>,
    ) -> (
        Node,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        use crate::core::types::Reply;
        let config = small_config(dir);
        let (reached_tx, reached_rx) = std::sync::mpsc::sync_channel(1);
        let (open_tx, open_rx) = std::sync::mpsc::channel();
        let data = GatedDir {
            inner: crate::storage::FsDir::open(dir).unwrap(),
            gate: Arc::new(Gate {
                reached: reached_tx,
                open: std::sync::Mutex::new(open_rx),
            }),
        };
        let state = crate::storage::FsDir::open_exclusive(dir.join(super::STATE_DIR)).unwrap();
        let clock = super::Clock::start();
        let recovered = super::recover(
            &config,
            Box::new(data),
            Box::new(state),
            [7; 32],
            clock.now(),
            crate::core::Plants::default(),
        )
        .unwrap();
        let node = Node::start(&config, recovered, clock, super::WriterMode::Thread);
        let handle = node.handle();
        // Something in file_7 to read: acquire, append, release.
        let default = |client| Request::Acquire {
            client,
            lock: "".into(),
            wait: None,
            lease: None,
        };
        let Ok(Reply::Granted(grant)) = handle.call(String::new(), default(2)).await else {
            panic!("no grant")
        };
        let append = Request::Append {
            client: 2,
            file: "file_7".to_owned(),
            content: bytes::Bytes::from(content),
            token: grant.token.to_string(),
        };
        assert!(matches!(
            handle.call(String::new(), append).await,
            Ok(Reply::Done)
        ));
        let release = Request::Release {
            client: 2,
            lock: "".into(),
            token: grant.token.to_string(),
        };
        assert!(matches!(
            handle.call(String::new(), release).await,
            Ok(Reply::Done)
        ));
        (node, reached_rx, open_tx)
    }

    /// Waits (bounded) until a read reached the gate.
    async fn until_reached(reached: std::sync::mpsc::Receiver<()>) {
        tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(60)))
            .await
            .unwrap()
            .expect("the read reached the file");
    }

    /// A large read whose call is cut off while its bytes are read (on a
    /// blocking thread, which goes on) keeps its share of the read-reply
    /// budget until the read is over: its bytes are in memory until then.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_off_read_keeps_its_share_until_its_bytes_are_read() {
        let tmp = tempfile::tempdir().unwrap();
        let len = 512 << 10;
        let (node, reached, open) = gated_node(tmp.path(), vec![b'r'; len]).await;
        let handle = node.handle();
        let reader = tokio::spawn({
            let handle = handle.clone();
            async move { handle.read_file("file_7").await.map(|read| read.is_ok()) }
        });
        until_reached(reached).await;
        assert_eq!(handle.read_replies(), (len as u64, 0));
        reader.abort();
        assert!(reader.await.unwrap_err().is_cancelled());
        assert_eq!(handle.read_replies(), (len as u64, 0));
        // The gate opens for good: the read ends, and the share goes back.
        drop(open);
        let back = async {
            while handle.read_replies() != (0, 0) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), back)
            .await
            .expect("the share went back");
        drop(handle);
        node.shutdown().await.unwrap();
    }

    /// A slow file read (a large file, a cold disk) must not hold up the
    /// group commits queued behind it: the writer only says how long the
    /// file is, and the caller reads it outside the writer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_read_in_progress_does_not_hold_up_commits() {
        use crate::core::types::Reply;
        let tmp = tempfile::tempdir().unwrap();
        let (node, reached_rx, open_tx) = gated_node(tmp.path(), b"seven".to_vec()).await;
        let handle = node.handle();
        let reader = tokio::spawn({
            let handle = handle.clone();
            async move { handle.read_file("file_7").await }
        });
        until_reached(reached_rx).await;
        let acquire = Request::Acquire {
            client: 1,
            lock: "x".into(),
            wait: None,
            lease: None,
        };
        let granted =
            tokio::time::timeout(Duration::from_secs(60), handle.call(String::new(), acquire))
                .await
                .expect("the acquire was held up behind the file read");
        assert!(matches!(granted, Ok(Reply::Granted(_))), "{granted:?}");
        open_tx.send(()).unwrap();
        let read = reader.await.unwrap().unwrap();
        assert_eq!(read.unwrap().0, b"seven");
        drop(handle);
        node.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_dropped_without_shutdown_writes_what_was_queued_and_stops() {
        let tmp = tempfile::tempdir().unwrap();
        let config = small_config(tmp.path());
        let (node, _) = Node::start_fs(&config).unwrap();
        let handle = node.handle();
        // A grant queued for the writer, and nobody flushing it.
        let grant = Input::Call {
            id: CallId(1),
            request_id: String::new(),
            request: Request::Acquire {
                client: 7,
                lock: "kept".into(),
                wait: None,
                lease: None,
            },
        };
        assert!(handle.engine.step(grant, None));
        let engine = Arc::downgrade(&handle.engine);
        drop(handle);
        drop(node);
        // The writer thread and the timer task each hold the engine until
        // they end; before the fix the writer waited for a wake-up forever.
        let hang_guard = Instant::now() + Duration::from_secs(60);
        while engine.strong_count() > 0 {
            assert!(
                Instant::now() < hang_guard,
                "the writer or the timer never ended"
            );
            tokio::task::yield_now().await;
        }
        // Gone with it: the state directory's lock (a moment later: the
        // count drops before the engine's fields are), and the grant is
        // durable.
        let (node, report) = loop {
            match Node::start_fs(&config) {
                Ok(started) => break started,
                Err(super::ServerError::Data(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && Instant::now() < hang_guard =>
                {
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("restart: {e}"),
            }
        };
        assert_eq!(report.grants, 1);
        node.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_node_on_the_same_directory_is_refused_until_the_first_is_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let config = small_config(tmp.path());
        let (node, _) = Node::start_fs(&config).unwrap();
        let error = Node::start_fs(&config)
            .err()
            .expect("a second start refused");
        assert!(
            error.to_string().contains("in use by another dlm server"),
            "{error}"
        );
        node.shutdown().await.unwrap();
        let (node, _) = Node::start_fs(&config).expect("free again after shutdown");
        node.shutdown().await.unwrap();
    }

    #[test]
    fn sizes_parse_with_and_without_units_and_nonsense_is_refused() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8KiB"), Ok(8 << 10));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        for bad in ["", "MiB", "-1", "12XB", "1.5MiB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
