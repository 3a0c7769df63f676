//! Transports: each turns its wire format into core requests sent through a
//! [`crate::server::Handle`], and core replies back into its wire format.
//! None of them holds lock rules.
//!
//! - [`calls`]: the meaning of each protobuf call, shared by every transport.
//! - [`grpc`]: tonic, wire compatible with the original service; TLS optional.
//! - [`quic`]: quinn, one stream per call, length-delimited envelopes
//!   (`proto/QUIC.md`); always TLS 1.3.
//! - [`tls`]: certificates (the development CA) and TLS configurations.

pub mod calls;
pub mod grpc;
pub mod quic;
pub mod tls;
