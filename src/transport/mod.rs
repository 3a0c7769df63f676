//! Transports: each turns its wire format into core requests sent through a
//! [`crate::server::Handle`], and core replies back into its wire format.
//! None of them holds lock rules.

pub mod grpc;
