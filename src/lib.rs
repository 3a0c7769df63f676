//! dlm — a distributed lock manager.
//!
//! # Layout
//!
//! - [`core`]: the sans-IO lock/file state machine. Every rule of the service
//!   lives here; no I/O, clock, thread or global randomness.
//! - [`proto`]: the generated gRPC/protobuf types of `proto/lock.proto`.
//! - [`storage`]: the storage seam (a directory of files) and its filesystem
//!   implementation; the simulation plugs a simulated disk in here.
//! - [`log`]: the durable log — CRC-framed records, group commit, snapshots,
//!   recovery that truncates a torn tail and refuses damage in the middle.
//! - [`files`]: the 100 data files, written at exact offsets.
//! - [`server`]: the shell — recovery, the engine (the core behind a lock,
//!   a job queue, group commit by the caller or the writer thread).
//! - [`transport`]: gRPC (tonic, plain text or TLS) and QUIC (quinn; the
//!   framing is in `proto/QUIC.md`), both serving the calls of
//!   [`transport::calls`]; [`transport::tls`] makes the development CA. Each
//!   transport only converts formats.
//! - [`client`]: the client library — retries, failover, lease renewal, over
//!   any transport.

// Clock, randomness, thread and task calls are banned in `core` only (see
// clippy.toml and the `deny` at the top of src/core/mod.rs); shells may use them.
#![allow(clippy::disallowed_methods)]

pub mod client;
pub mod core;
pub mod files;
pub mod log;
pub mod server;
pub mod storage;
pub mod transport;

/// Generated protobuf and gRPC types (package `lock`), including QUIC's
/// `CallRequest`/`CallResponse` envelopes.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("lock");
}
