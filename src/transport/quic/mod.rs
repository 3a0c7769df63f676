//! QUIC transport (quinn + rustls): the same calls as gRPC, one
//! bidirectional stream per call, each message one length-delimited
//! [`CallRequest`](crate::proto::CallRequest) or
//! [`CallResponse`](crate::proto::CallResponse) envelope. `proto/QUIC.md` is
//! the wire contract; this module is its implementation.
//!
//! Owns: the protocol constants (ALPN, stream error codes), the limits that
//! keep a peer from exhausting the server (concurrent streams, connections,
//! frame size, idle timeout, keep-alive) and the quinn configurations built
//! from them. The sockets are not ours: [`server::serve`] takes a
//! [`quinn::Endpoint`] from its caller, and the client can be handed one, so
//! an endpoint over another [`quinn::AsyncUdpSocket`] and
//! [`quinn::Runtime`] (a simulated network) plugs in unchanged.
//!
//! 0-RTT stays off on both sides. A 0-RTT request can be replayed by anyone
//! who recorded it; request ids make most replays harmless, but not those of
//! calls without one (status, reads, an old-style acquire) nor a replay that
//! arrives after its id left the bounded dedup memory. 0-RTT would only save
//! one round trip when a connection is made, which a client does once.
//!
//! Files: `frame.rs` the framing, `server.rs` the endpoint's accept loop and
//! one task per stream, `client.rs` one lazily made connection per server,
//! `socket.rs` the UDP socket both sides use on tokio.

pub mod client;
pub mod frame;
pub mod server;
pub mod socket;

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};

use super::tls::{ServerTls, TlsError};
use super::Keepalive;

/// The ALPN protocol name both sides offer; a peer without it is refused
/// during the handshake.
pub const ALPN: &[u8] = b"dlm/1";

/// Most streams (calls) one connection may have open at once. A peer that
/// opens more waits for QUIC stream credit: nothing more is accepted.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// A client closes a connection on which nothing was received for this long,
/// and the next call connects afresh. A live server answers the client's
/// pings (every [`CLIENT_KEEP_ALIVE`] without hearing from it) even while it
/// holds a waiting call, so only a connection that is cut off (a partition,
/// a frozen server, a server gone without a reset) goes quiet this long;
/// waiting on it would cost a whole attempt deadline, and after the path is
/// back its backed-off retransmissions would be answered seconds later than
/// a new connection.
pub const CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A client sends a ping after this long without hearing from the server
/// (quinn restarts the timer on every packet received). Besides keeping
/// the connection, the ping is how a client waiting for an answer (a queued
/// acquire sends nothing for many seconds) learns that its server restarted:
/// unlike TCP, nothing tells a QUIC client that the process behind its
/// connection died; the restarted server answers the ping with a stateless
/// reset (see [`endpoint_config`]), and the client reconnects and retries
/// within about this long of the restart instead of at its attempt
/// deadline (later if the server was down long enough for the client's
/// unanswered packets to back off). Costs one small datagram and its acknowledgement per second on
/// a connection that is otherwise silent.
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(1);

pub use super::{DRAIN_GRACE, MIN_REQUEST_RATE, REPLY_STALL_LIMIT, REQUEST_TIMEOUT};

/// Room in a request frame for everything but an append's content.
pub const FRAME_OVERHEAD: usize = 64 << 10;

/// Largest response a client accepts (a file read returns a whole file).
pub const MAX_RESPONSE_BYTES: usize = 1 << 32;

/// Application error codes of `RESET_STREAM`, `STOP_SENDING` and
/// `CONNECTION_CLOSE`; see `proto/QUIC.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Closing a connection normally (the server shuts down).
    NoError = 0x0,
    /// The request is not one well-formed frame holding a `CallRequest`.
    MalformedFrame = 0x1,
    /// The request frame declares or has more bytes than the server takes.
    FrameTooLarge = 0x2,
    /// The envelope holds no call this server knows.
    UnknownCall = 0x3,
    /// The server is shutting down; retry (elsewhere).
    Unavailable = 0x4,
    /// The request's `timeout_ms` passed before the answer.
    DeadlineExceeded = 0x5,
    /// The client gave up on the call.
    Cancelled = 0x6,
    /// The request stopped arriving (nothing for the request timeout), or
    /// arrived more slowly than the server's minimum rate.
    IncompleteRequest = 0x7,
    /// The client's flow control took no more of a file read's reply for
    /// [`REPLY_STALL_LIMIT`].
    ReplyStalled = 0x8,
    /// The server holds as many arriving request bytes as it takes
    /// (`--max-inflight-request-bytes`); retry later.
    ResourceExhausted = 0x9,
}

impl ErrorCode {
    /// As a QUIC variable-length integer.
    pub fn varint(self) -> VarInt {
        VarInt::from_u32(self as u32)
    }

    /// The code of a raw value, if it is one of ours.
    pub fn from_raw(raw: u64) -> Option<ErrorCode> {
        use ErrorCode::*;
        [
            NoError,
            MalformedFrame,
            FrameTooLarge,
            UnknownCall,
            Unavailable,
            DeadlineExceeded,
            Cancelled,
            IncompleteRequest,
            ReplyStalled,
            ResourceExhausted,
        ]
        .into_iter()
        .find(|code| *code as u64 == raw)
    }
}

/// Transport parameters both sides use: the stream limits above, no
/// unidirectional streams, no datagrams, an idle timeout of `idle` and
/// pings after `keep_alive` without hearing from the peer (the server's
/// [`Keepalive`], whose idle limit is `interval + timeout`;
/// [`CLIENT_IDLE_TIMEOUT`] and [`CLIENT_KEEP_ALIVE`] for a client). The
/// two sides' idle timeouts: the smaller one applies.
pub fn transport_config(keep_alive: Duration, idle: Duration) -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(
            // Past 2^62 ms: as good as no limit.
            IdleTimeout::try_from(idle).unwrap_or_else(|_| IdleTimeout::from(VarInt::MAX)),
        ))
        .keep_alive_interval(Some(keep_alive))
        .datagram_receive_buffer_size(None);
    config
}

/// The quinn server configuration for `tls` (TLS 1.3, ALPN [`ALPN`], no
/// 0-RTT) with [`transport_config`] for `keepalive`.
///
/// # Errors
/// [`TlsError`] when the certificates are unusable.
pub fn server_config(
    tls: &ServerTls,
    keepalive: Keepalive,
) -> Result<quinn::ServerConfig, TlsError> {
    let crypto = QuicServerConfig::try_from(tls.rustls_config(&[ALPN])?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(
        keepalive.interval,
        keepalive.idle_limit(),
    )));
    Ok(config)
}

/// The quinn client configuration for `ca_pem` and an optional client
/// `identity` (certificate chain and key, PEM).
///
/// # Errors
/// [`TlsError`] when the certificates are unusable.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<quinn::ClientConfig, TlsError> {
    let rustls = super::tls::client_rustls_config(ca_pem, identity, &[ALPN])?;
    let crypto = QuicClientConfig::try_from(rustls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(
        CLIENT_KEEP_ALIVE,
        CLIENT_IDLE_TIMEOUT,
    )));
    Ok(config)
}

/// The endpoint configuration of a server whose connection ids and
/// stateless-reset tokens are derived from `secret`. Keeping the secret
/// across restarts (see [`super::tls::secret`]) lets a restarted server
/// recognise the connection ids of its previous run and reset those
/// connections, so their clients reconnect at once instead of waiting for
/// the idle timeout.
pub fn endpoint_config(secret: &[u8; 32]) -> quinn::EndpointConfig {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, b"dlm connection ids");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(key));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// A server endpoint on an already bound UDP `socket`, on tokio.
///
/// # Errors
/// When the socket cannot be handed to tokio.
pub fn server_endpoint(
    socket: std::net::UdpSocket,
    endpoint: quinn::EndpointConfig,
    config: quinn::ServerConfig,
) -> std::io::Result<quinn::Endpoint> {
    endpoint_on(socket, endpoint, Some(config))
}

/// A client endpoint bound to `addr` (a wildcard address: `[::]` is made
/// dual-stack where the host allows), on tokio.
///
/// # Errors
/// When no socket can be bound there.
pub fn client_endpoint(addr: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        // Not fatal: the caller then reaches IPv6 addresses only.
        if let Err(e) = socket.set_only_v6(false) {
            tracing::debug!(error = %e, "a client socket on [::] stays IPv6 only");
        }
    }
    socket.bind(&addr.into())?;
    endpoint_on(socket.into(), quinn::EndpointConfig::default(), None)
}

/// An endpoint (a server's when `server` is given) on a bound socket, read
/// and written through [`socket::UdpSocket`] on tokio.
fn endpoint_on(
    socket: std::net::UdpSocket,
    endpoint: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new_with_abstract_socket(
        endpoint,
        server,
        socket::UdpSocket::wrap(socket)?,
        Arc::new(quinn::TokioRuntime),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_and_unknown_values_are_none() {
        for raw in 0..10u64 {
            let code = ErrorCode::from_raw(raw).unwrap();
            assert_eq!(code as u64, raw);
            assert_eq!(code.varint().into_inner(), raw);
        }
        assert_eq!(ErrorCode::from_raw(10), None);
    }
}
