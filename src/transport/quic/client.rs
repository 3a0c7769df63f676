//! The QUIC client side: one connection to one server, made on first use and
//! made again after it is lost, and one stream per call on it.
//!
//! Owns: resolving the address, the endpoint (the caller's, or one bound on
//! first use), the connection, and telling the server when a call is given
//! up (`STOP_SENDING` with [`ErrorCode::Cancelled`] when the call's future is
//! dropped). It says what went wrong in QUIC's terms ([`CallError`]);
//! whether that is worth a retry is the client library's business. Must not:
//! retry, or know what a call means.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::{ConnectError, Connection, ConnectionError, Endpoint, RecvStream, WriteError};

use super::frame::{self, FrameError};
use super::{ErrorCode, MAX_RESPONSE_BYTES};
use crate::proto::{CallRequest, CallResponse};

/// Why a call over QUIC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The address or server name cannot be used at all.
    #[error("bad server address: {0}")]
    BadAddress(String),
    /// The TLS handshake failed: the server's certificate is not signed by
    /// the CA given (or is for another name), or the server refused the
    /// client's certificate (or its absence).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No connection could be made, or it was lost (server down, restarted,
    /// unreachable, idle too long).
    #[error("{0}")]
    Connection(String),
    /// The server reset the call's stream: `code` is the raw code,
    /// `known` its meaning when it is one of ours.
    #[error("the server reset the call (code {code:#x}, {known:?})")]
    Reset {
        /// Our meaning of the code, if it has one.
        known: Option<ErrorCode>,
        /// The raw application error code.
        code: u64,
    },
    /// The response was not one frame holding a `CallResponse`.
    #[error("bad response: {0}")]
    BadResponse(String),
}

/// Whether a transport error code is a TLS alert (QUIC's `CRYPTO_ERROR`
/// range, 0x100–0x1ff).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

impl From<ConnectionError> for CallError {
    fn from(error: ConnectionError) -> CallError {
        let tls = match &error {
            ConnectionError::TransportError(e) => is_crypto(e.code),
            ConnectionError::ConnectionClosed(close) => is_crypto(close.error_code),
            _ => false,
        };
        if tls {
            CallError::Tls(error.to_string())
        } else {
            CallError::Connection(error.to_string())
        }
    }
}

impl From<FrameError> for CallError {
    fn from(error: FrameError) -> CallError {
        match error {
            FrameError::Reset(code) => CallError::Reset {
                known: ErrorCode::from_raw(code),
                code,
            },
            FrameError::Lost(e) => CallError::from(e),
            FrameError::Closed => CallError::Connection("stream closed".into()),
            // The client reads without a pause limit; a caller's own
            // deadline bounds its wait.
            // (and has no request budget).
            e @ (FrameError::Slow | FrameError::NoRoom(_)) => CallError::Connection(e.to_string()),
            e @ (FrameError::Malformed(_) | FrameError::TooLarge { .. }) => {
                CallError::BadResponse(e.to_string())
            }
        }
    }
}

/// How telling a failure to connect is (higher: reported first).
fn rank(error: &CallError) -> u8 {
    match error {
        CallError::BadAddress(_) => 2,
        CallError::Tls(_) => 1,
        _ => 0,
    }
}

/// How long a handshake goes unanswered before the next resolved address is
/// tried alongside it ([`QuicConnector::connect_first`]).
const STAGGER: Duration = Duration::from_millis(250);

/// The host part of `host:port` or `[v6]:port`, the name the server's
/// certificate must carry by default.
pub fn host_of(addr: &str) -> Option<&str> {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map(|(host, _)| host);
    }
    addr.rsplit_once(':')
        .map(|(host, _)| host)
        .filter(|h| !h.is_empty())
}

/// One server over QUIC.
#[derive(Debug)]
pub struct QuicConnector {
    /// The address as given (`host:port`), resolved at each connect.
    addr: String,
    /// Addresses to use instead of resolving `addr` (tests).
    resolved: Option<Vec<SocketAddr>>,
    /// The name the server's certificate must carry.
    server_name: String,
    /// TLS and transport settings of every connection.
    config: quinn::ClientConfig,
    /// The caller's endpoint, or one bound on first use.
    endpoint: Mutex<Option<Endpoint>>,
    /// The connection while it lasts; calls share it.
    connection: tokio::sync::Mutex<Option<Connection>>,
}

impl QuicConnector {
    /// A connector to `addr` (`host:port`) expecting a certificate for
    /// `server_name` (default: the host), over `endpoint` if given (for
    /// instance one over a simulated socket), else over one bound on first
    /// use. Nothing is sent yet.
    ///
    /// # Errors
    /// [`CallError::BadAddress`] when `addr` has no host and port.
    pub fn new(
        addr: &str,
        server_name: Option<&str>,
        config: quinn::ClientConfig,
        endpoint: Option<Endpoint>,
    ) -> Result<QuicConnector, CallError> {
        let host = host_of(addr)
            .ok_or_else(|| CallError::BadAddress(format!("{addr:?} is not HOST:PORT")))?;
        Ok(QuicConnector {
            addr: addr.to_owned(),
            resolved: None,
            server_name: server_name.unwrap_or(host).to_owned(),
            config,
            endpoint: Mutex::new(endpoint),
            connection: tokio::sync::Mutex::new(None),
        })
    }

    /// The address as given.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Uses `addrs` as what the address resolves to (tests: a name that
    /// resolves to a dead address first, as `localhost` can to `::1` when
    /// the server listens on 127.0.0.1).
    #[doc(hidden)]
    #[must_use]
    pub fn resolving_to(mut self, addrs: Vec<SocketAddr>) -> QuicConnector {
        self.resolved = Some(addrs);
        self
    }

    /// The current connection, or a new one.
    ///
    /// # Errors
    /// [`CallError`] when no connection can be made.
    pub async fn connection(&self) -> Result<Connection, CallError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
        }
        *slot = None;
        let mut addrs = self.resolve().await?;
        let endpoint = self.endpoint_for(&addrs)?;
        // An endpoint that cannot reach IPv6 (a caller's IPv4 one, or ours
        // where the host has no IPv6) tries only the IPv4 addresses.
        if endpoint.local_addr().is_ok_and(|a| a.is_ipv4()) && addrs.iter().any(SocketAddr::is_ipv4)
        {
            addrs.retain(SocketAddr::is_ipv4);
        }
        let connection = self.connect_first(&endpoint, &addrs).await?;
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Connects to whichever of `addrs` answers first, as a browser does
    /// ("happy eyeballs"): a handshake starts with the first address, the
    /// next one starts when a handshake fails or after [`STAGGER`] without
    /// an answer, and the first to complete wins (the others are dropped).
    /// A name that resolves to an address nothing listens on (`localhost`
    /// to `::1` first, the server on 127.0.0.1) costs a quarter of a second,
    /// not a whole idle timeout and a failed call.
    async fn connect_first(
        &self,
        endpoint: &Endpoint,
        addrs: &[SocketAddr],
    ) -> Result<Connection, CallError> {
        let mut handshakes = FuturesUnordered::new();
        let mut next = addrs.iter();
        let mut failure = None;
        loop {
            if handshakes.is_empty() {
                match next.next() {
                    Some(addr) => handshakes.push(self.handshake(endpoint, *addr)?),
                    None => {
                        return Err(failure.unwrap_or_else(|| {
                            CallError::Connection(format!("{} resolves to nothing", self.addr))
                        }))
                    }
                }
            }
            let more = !next.as_slice().is_empty();
            // `biased`: a fixed order, so that a simulation replays.
            tokio::select! {
                biased;
                Some(done) = handshakes.next() => match done {
                    Ok(connection) => return Ok(connection),
                    Err(e) => {
                        // The most telling failure is reported: a bad name
                        // (never worth a retry), then a TLS refusal, then
                        // another address's silence.
                        if failure.as_ref().is_none_or(|f| rank(&e) >= rank(f)) {
                            failure = Some(e);
                        }
                        if let Some(addr) = next.next() {
                            handshakes.push(self.handshake(endpoint, *addr)?);
                        }
                    }
                },
                () = tokio::time::sleep(STAGGER), if more => {
                    if let Some(addr) = next.next() {
                        handshakes.push(self.handshake(endpoint, *addr)?);
                    }
                }
            }
        }
    }

    /// Starts a handshake with `addr`.
    fn handshake(
        &self,
        endpoint: &Endpoint,
        addr: SocketAddr,
    ) -> Result<impl std::future::Future<Output = Result<Connection, CallError>>, CallError> {
        let connecting = endpoint
            .connect_with(self.config.clone(), addr, &self.server_name)
            .map_err(|e| match e {
                ConnectError::InvalidServerName(name) => {
                    CallError::BadAddress(format!("{name:?} is not a valid server name"))
                }
                other => CallError::Connection(other.to_string()),
            });
        Ok(async move { Ok(connecting?.await?) })
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, CallError> {
        if let Some(addrs) = &self.resolved {
            return Ok(addrs.clone());
        }
        if let Ok(addr) = self.addr.parse() {
            return Ok(vec![addr]);
        }
        let mut addrs: Vec<SocketAddr> = Vec::new();
        let found = tokio::net::lookup_host(&self.addr)
            .await
            .map_err(|e| CallError::Connection(format!("resolving {}: {e}", self.addr)))?;
        for addr in found {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(CallError::Connection(format!(
                "{} resolves to nothing",
                self.addr
            )));
        }
        Ok(addrs)
    }

    /// The caller's endpoint, or one bound on first use: on `[::]` (which
    /// also reaches IPv4 addresses) when any of `addrs` is IPv6, else on
    /// `0.0.0.0`.
    fn endpoint_for(&self, addrs: &[SocketAddr]) -> Result<Endpoint, CallError> {
        let mut slot = self.endpoint.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(endpoint) = slot.as_ref() {
            return Ok(endpoint.clone());
        }
        let v4: SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = if addrs.iter().all(SocketAddr::is_ipv4) {
            super::client_endpoint(v4)
        } else {
            // Dual stack where the host has IPv6; IPv4 alone where it has
            // not (the IPv6 addresses are then left out, see `resolve`).
            super::client_endpoint((std::net::Ipv6Addr::UNSPECIFIED, 0).into())
                .or_else(|_| super::client_endpoint(v4))
        }
        .map_err(|e| CallError::Connection(format!("binding a UDP socket: {e}")))?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Makes one call: opens a stream, sends `request`, reads the response.
    /// Dropping the future gives the call up (the server is told).
    ///
    /// # Errors
    /// [`CallError`] as the connection, the stream or the response failed.
    pub async fn call(&self, request: &CallRequest) -> Result<CallResponse, CallError> {
        let connection = self.connection().await?;
        let (mut send, recv) = connection.open_bi().await?;
        let mut recv = CancelOnDrop(recv);
        match send.write_all(&frame::encode(request)).await {
            // The server stopped reading (it refused the request): its reset
            // of the other direction says why.
            Ok(()) | Err(WriteError::Stopped(_)) => {}
            Err(WriteError::ConnectionLost(e)) => return Err(e.into()),
            Err(e) => return Err(CallError::Connection(e.to_string())),
        }
        let _ = send.finish();
        let response = frame::read_frame::<CallResponse>(&mut recv.0, MAX_RESPONSE_BYTES).await?;
        Ok(response)
    }
}

impl QuicConnector {
    /// Closes the connection, if there is one, and waits (up to `wait`)
    /// until its close has left: a process that exits right after dropping
    /// its connector may exit before the connection's driver sends the
    /// close, and the server then keeps the connection until its idle
    /// timeout (a stopping server, until its drain grace). Nothing else is
    /// sent after a close, so the next datagram is the close. A connection
    /// being set up (its slot locked by the dial) or already lost is left
    /// as it is. Calls still in flight on it fail, and are retried (on the
    /// next server, if there is one).
    pub async fn close(&self, wait: std::time::Duration) {
        let Some(connection) = self
            .connection
            .try_lock()
            .ok()
            .and_then(|mut slot| slot.take())
        else {
            return;
        };
        if connection.close_reason().is_some() {
            return;
        }
        let sent = connection.stats().udp_tx.datagrams;
        connection.close(ErrorCode::NoError.varint(), b"client done");
        let until = tokio::time::Instant::now() + wait;
        while connection.stats().udp_tx.datagrams == sent && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
}

impl Drop for QuicConnector {
    fn drop(&mut self) {
        if let Ok(slot) = self.connection.try_lock() {
            if let Some(connection) = slot.as_ref() {
                connection.close(ErrorCode::NoError.varint(), b"client done");
            }
        }
    }
}

/// The receiving side of a call; dropping it before the response is read
/// tells the server the call is given up.
struct CancelOnDrop(RecvStream);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let _ = self.0.stop(ErrorCode::Cancelled.varint());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_the_default_server_name() {
        assert_eq!(host_of("127.0.0.1:7000"), Some("127.0.0.1"));
        assert_eq!(host_of("localhost:7000"), Some("localhost"));
        assert_eq!(host_of("[::1]:7000"), Some("::1"));
        assert_eq!(host_of("nohost"), None);
        assert_eq!(host_of(":7000"), None);
    }

    #[test]
    fn crypto_alerts_are_tls_failures_and_other_closes_are_not() {
        use quinn::TransportErrorCode;
        assert!(is_crypto(TransportErrorCode::crypto(0x2a)));
        assert!(!is_crypto(TransportErrorCode::CONNECTION_REFUSED));
    }
}
