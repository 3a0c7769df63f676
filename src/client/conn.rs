//! The seam between the retry logic and the wire: a [`Conn`] makes one
//! attempt of one call to one server, over gRPC (plain or TLS) or QUIC.
//!
//! A call is a [`Call`] (the request message of one method) and its answer an
//! [`Answer`] (the response message of that method): the variants of the
//! QUIC envelope, which gRPC maps onto its methods one to one. Owns: that
//! mapping for each transport and the classification of each transport's
//! failures as an [`AttemptError`]. Must not: retry, sleep or pick servers
//! ([`super::call`] does), or look at dlm statuses.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;

use super::error::{classify, tls_cause, AttemptError, Error};
use super::transport::{Tls, Transport};
use crate::proto::lock_service_client::LockServiceClient;
use crate::proto::CallRequest;
use crate::transport::quic::client::{CallError, QuicConnector};
use crate::transport::quic::{self, ErrorCode};

pub(crate) use crate::proto::call_request::Call;
pub(crate) use crate::proto::call_response::Reply as Answer;

/// How often an idle gRPC connection is pinged, and how long a ping may
/// go unanswered before the connection is dropped.
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);
/// One server, reached one way.
#[derive(Clone, Debug)]
pub(crate) enum Conn {
    /// The generated gRPC client over a lazily connected channel (which
    /// reconnects after a failure), and over TLS the means to learn whether
    /// TLS is what failed.
    Grpc {
        rpc: LockServiceClient<Channel>,
        probe: Option<Arc<TlsProbe>>,
    },
    /// A lazily made QUIC connection (made again after a failure).
    Quic(Arc<QuicConnector>),
}

/// What [`Conn::new`] needs besides the address, prepared once per client.
#[derive(Clone, Debug)]
pub(crate) enum Wire {
    /// Plain gRPC.
    Grpc,
    /// gRPC over TLS with these settings.
    GrpcTls(Tls),
    /// QUIC with this configuration and, optionally, the caller's endpoint.
    Quic {
        config: quinn::ClientConfig,
        server_name: Option<String>,
        endpoint: Option<quinn::Endpoint>,
    },
}

impl Wire {
    /// Checks `transport`'s TLS material and prepares what every server's
    /// connection shares.
    pub fn new(transport: &Transport, endpoint: Option<quinn::Endpoint>) -> Result<Wire, Error> {
        let bad = |e: crate::transport::tls::TlsError| Error::BadRequest(e.to_string());
        match transport {
            Transport::Grpc => Ok(Wire::Grpc),
            Transport::GrpcTls(tls) => {
                // Checked here so a bad file is reported at build time.
                crate::transport::tls::client_rustls_config(&tls.ca_pem, tls.identity(), &[])
                    .map_err(bad)?;
                Ok(Wire::GrpcTls(tls.clone()))
            }
            Transport::Quic(tls) => Ok(Wire::Quic {
                config: quic::client_config(&tls.ca_pem, tls.identity()).map_err(bad)?,
                server_name: tls.server_name.clone(),
                endpoint,
            }),
        }
    }
}

impl Conn {
    /// A connection to `addr` (`host:port`, or for gRPC a full URI) that
    /// connects on first use. Must run inside a Tokio runtime.
    pub fn new(addr: &str, wire: &Wire, connect_timeout: Duration) -> Result<Conn, Error> {
        let bad = |e: String| Error::BadRequest(format!("bad server address {addr:?}: {e}"));
        match wire {
            Wire::Grpc | Wire::GrpcTls(_) => {
                let tls = match wire {
                    Wire::GrpcTls(tls) => Some(tls),
                    _ => None,
                };
                let uri = if addr.contains("://") {
                    addr.to_owned()
                } else if tls.is_some() {
                    format!("https://{addr}")
                } else {
                    format!("http://{addr}")
                };
                let mut endpoint = tonic::transport::Endpoint::from_shared(uri)
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(connect_timeout)
                    .tcp_nodelay(true)
                    // A black-holed connection (peer gone without a FIN) is
                    // noticed in seconds and redialled, instead of failing
                    // attempt after attempt until TCP gives up.
                    .http2_keep_alive_interval(KEEP_ALIVE)
                    .keep_alive_timeout(KEEP_ALIVE)
                    .keep_alive_while_idle(true);
                let mut probe = None;
                if let Some(tls) = tls {
                    let (config, name) = grpc_tls(addr, tls);
                    endpoint = endpoint
                        .tls_config(config)
                        .map_err(|e| bad(e.to_string()))?;
                    probe = Some(Arc::new(TlsProbe::new(addr, name, tls, connect_timeout)?));
                }
                // A file read returns the whole file, which may be large; the
                // server is trusted, so its replies are not size-capped.
                let rpc = LockServiceClient::new(endpoint.connect_lazy())
                    .max_decoding_message_size(usize::MAX);
                Ok(Conn::Grpc { rpc, probe })
            }
            Wire::Quic {
                config,
                server_name,
                endpoint,
            } => QuicConnector::new(
                addr,
                server_name.as_deref(),
                config.clone(),
                endpoint.clone(),
            )
            .map(|connector| Conn::Quic(Arc::new(connector)))
            .map_err(|e| bad(e.to_string())),
        }
    }

    /// Sends `call` and waits for its answer, telling the server it has
    /// `timeout` (so that it gives up then too). No local deadline here.
    pub async fn send(&self, call: Call, timeout: Duration) -> Result<Answer, AttemptError> {
        match self {
            Conn::Grpc { rpc, probe } => {
                let status = match grpc_send(rpc.clone(), call, timeout).await {
                    Ok(answer) => return Ok(answer),
                    Err(status) => status,
                };
                let failure = classify(&status);
                // In TLS 1.3 a server that refuses the client's certificate
                // says so after the handshake, and the alert is often lost
                // in a broken pipe on the way through hyper: ask again.
                if let (AttemptError::Transport(_), Some(probe)) = (&failure, probe) {
                    if let Some(tls) = probe.verdict().await {
                        return Err(AttemptError::Refused(Error::Tls(tls)));
                    }
                }
                Err(failure)
            }
            Conn::Quic(connector) => {
                let request = CallRequest {
                    call: Some(call),
                    timeout_ms: super::millis_ceil(timeout),
                };
                let response = connector.call(&request).await.map_err(quic_failure)?;
                response
                    .reply
                    .ok_or_else(|| AttemptError::Refused(Error::Server("an empty answer".into())))
            }
        }
    }
}

/// `host:port` of a gRPC address given as `host:port` or as a URI.
fn authority(addr: &str) -> &str {
    addr.split_once("://")
        .map_or(addr, |(_, rest)| rest)
        .trim_end_matches('/')
}

/// tonic's TLS settings for `tls`, and the server name they expect (by
/// default the host of `addr`).
fn grpc_tls(addr: &str, tls: &Tls) -> (tonic::transport::ClientTlsConfig, String) {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    let name = tls
        .server_name
        .clone()
        .or_else(|| quic::client::host_of(authority(addr)).map(str::to_owned))
        .unwrap_or_default();
    config = config.domain_name(name.clone());
    if let Some((cert, key)) = tls.identity() {
        config = config.identity(Identity::from_pem(cert, key));
    }
    (config, name)
}

/// A TLS handshake of its own with a gRPC server, made after an attempt
/// failed in transit, to tell a refusal by TLS (never worth a retry) from a
/// server that is down or restarting (worth one).
#[derive(Debug)]
pub(crate) struct TlsProbe {
    /// `host:port`.
    authority: String,
    /// The name the certificate must carry.
    name: rustls::pki_types::ServerName<'static>,
    /// The same trust and identity as the gRPC channel, offering `h2`.
    config: Arc<rustls::ClientConfig>,
    /// Bound on each step of the probe.
    timeout: Duration,
}

impl TlsProbe {
    fn new(addr: &str, name: String, tls: &Tls, timeout: Duration) -> Result<TlsProbe, Error> {
        let bad = |e: String| Error::BadRequest(format!("TLS for {addr:?}: {e}"));
        let config =
            crate::transport::tls::client_rustls_config(&tls.ca_pem, tls.identity(), &[b"h2"])
                .map_err(|e| bad(e.to_string()))?;
        let name = rustls::pki_types::ServerName::try_from(name).map_err(|e| bad(e.to_string()))?;
        Ok(TlsProbe {
            authority: authority(addr).to_owned(),
            name,
            config: Arc::new(config),
            timeout,
        })
    }

    /// The TLS error that refuses this client, if that is what happens.
    async fn verdict(&self) -> Option<String> {
        let authority = self.authority.clone();
        let name = self.name.clone();
        let config = self.config.clone();
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || probe(&authority, name, config, timeout))
            .await
            .ok()
            .flatten()
    }
}

/// Connects, completes a handshake, sends the HTTP/2 preface and reads: a
/// server that refuses the client's certificate answers with an alert.
fn probe(
    authority: &str,
    name: rustls::pki_types::ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Option<String> {
    use std::io::{Read as _, Write as _};
    use std::net::ToSocketAddrs as _;
    let addr = authority.to_socket_addrs().ok()?.next()?;
    let mut socket = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    socket.set_read_timeout(Some(timeout)).ok()?;
    socket.set_write_timeout(Some(timeout)).ok()?;
    let mut connection = rustls::ClientConnection::new(config, name).ok()?;
    let mut tls = rustls::Stream::new(&mut connection, &mut socket);
    if let Err(e) = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") {
        return tls_cause(&e);
    }
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).err().and_then(|e| tls_cause(&e))
}

/// Wraps `message` in a request whose gRPC deadline is `timeout`, so the
/// server also gives up (and, for an acquire, keeps the waiter's place).
fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// One call as the gRPC method of the same name.
async fn grpc_send(
    mut rpc: LockServiceClient<Channel>,
    call: Call,
    timeout: Duration,
) -> Result<Answer, tonic::Status> {
    Ok(match call {
        Call::ClientInit(args) => {
            Answer::ClientInit(rpc.client_init(request(args, timeout)).await?.into_inner())
        }
        Call::LockAcquire(args) => {
            Answer::LockAcquire(rpc.lock_acquire(request(args, timeout)).await?.into_inner())
        }
        Call::LockRelease(args) => {
            Answer::LockRelease(rpc.lock_release(request(args, timeout)).await?.into_inner())
        }
        Call::FileAppend(args) => {
            Answer::FileAppend(rpc.file_append(request(args, timeout)).await?.into_inner())
        }
        Call::RenewLease(args) => {
            Answer::RenewLease(rpc.renew_lease(request(args, timeout)).await?.into_inner())
        }
        Call::ClientClose(args) => {
            Answer::ClientClose(rpc.client_close(request(args, timeout)).await?.into_inner())
        }
        Call::FileRead(args) => {
            Answer::FileRead(rpc.file_read(request(args, timeout)).await?.into_inner())
        }
        Call::LockStatus(args) => {
            Answer::LockStatus(rpc.lock_status(request(args, timeout)).await?.into_inner())
        }
    })
}

/// What a QUIC failure means for the retry loop.
fn quic_failure(error: CallError) -> AttemptError {
    let message = error.to_string();
    match error {
        CallError::BadAddress(m) => AttemptError::Refused(Error::BadRequest(m)),
        CallError::Tls(m) => AttemptError::Refused(Error::Tls(m)),
        CallError::Connection(m) => AttemptError::Transport(m),
        CallError::BadResponse(m) => AttemptError::Refused(Error::Server(m)),
        CallError::Reset { known, .. } => match known {
            Some(
                ErrorCode::Unavailable
                | ErrorCode::IncompleteRequest
                | ErrorCode::ReplyStalled
                | ErrorCode::ResourceExhausted,
            ) => AttemptError::Transport(message),
            Some(ErrorCode::DeadlineExceeded) => AttemptError::TimedOut(message),
            Some(ErrorCode::FrameTooLarge) => AttemptError::Refused(Error::BadRequest(
                "the request is larger than the server accepts".into(),
            )),
            Some(ErrorCode::UnknownCall) => AttemptError::Refused(Error::Server(format!(
                "the server does not implement this call ({message})"
            ))),
            _ => AttemptError::Refused(Error::Server(message)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reset(code: ErrorCode) -> CallError {
        CallError::Reset {
            known: Some(code),
            code: code as u64,
        }
    }

    #[test]
    fn quic_failures_are_retried_only_when_a_retry_can_help() {
        for retried in [
            CallError::Connection("lost".into()),
            reset(ErrorCode::Unavailable),
            reset(ErrorCode::IncompleteRequest),
            reset(ErrorCode::ReplyStalled),
            reset(ErrorCode::ResourceExhausted),
        ] {
            let got = quic_failure(retried.clone());
            assert!(
                matches!(got, AttemptError::Transport(_)),
                "{retried:?}: {got:?}"
            );
        }
        assert!(matches!(
            quic_failure(reset(ErrorCode::DeadlineExceeded)),
            AttemptError::TimedOut(_)
        ));
        assert!(matches!(
            quic_failure(CallError::Tls("UnknownIssuer".into())),
            AttemptError::Refused(Error::Tls(_))
        ));
        assert!(matches!(
            quic_failure(reset(ErrorCode::FrameTooLarge)),
            AttemptError::Refused(Error::BadRequest(_))
        ));
        for refused in [
            reset(ErrorCode::MalformedFrame),
            reset(ErrorCode::UnknownCall),
            CallError::Reset {
                known: None,
                code: 77,
            },
            CallError::BadResponse("junk".into()),
        ] {
            let got = quic_failure(refused.clone());
            assert!(
                matches!(got, AttemptError::Refused(Error::Server(_))),
                "{refused:?}: {got:?}"
            );
        }
    }

    #[test]
    fn a_grpc_address_may_be_a_uri() {
        assert_eq!(authority("127.0.0.1:1"), "127.0.0.1:1");
        assert_eq!(authority("https://localhost:1/"), "localhost:1");
    }
}
