//! dlm — a distributed lock manager.
//!
//! # Layout
//!
//! - [`core`]: the sans-IO lock/file state machine. Every rule of the service
//!   lives here; no I/O, clock, thread or global randomness.
//! - [`proto`]: the generated gRPC/protobuf types of `proto/lock.proto`.

pub mod core;

/// Generated protobuf and gRPC types (package `lock`).
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("lock");
}
