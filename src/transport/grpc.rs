//! gRPC transport (tonic): the original `lock.LockService`, wire compatible,
//! plus dlm's extensions; plain text by default, TLS with `--tls`.
//!
//! Owns: the tonic service and server. Each method hands its message to
//! [`super::calls`], which maps it to the core and back; a reply of the core
//! is always an `Ok` gRPC response carrying a dlm status. Only a server that
//! is shutting down answers with a gRPC error (UNAVAILABLE), which clients
//! retry. Must not: decide anything about locks, or map messages itself.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status as GrpcStatus};

use super::calls;
use super::tls::ServerTls;
use super::{Keepalive, MAX_CONNECTIONS};
use crate::proto::lock_service_server::{LockService, LockServiceServer};
use crate::proto::{
    self, ClientInitArgs, FileArgs, FileReadArgs, FileReadResponse, LeaseArgs, LeaseResponse,
    LockArgs, LockResponse, StatusArgs, StatusResponse,
};
use crate::server::{Handle, ShuttingDown};

pub use calls::wire_status;

/// Largest gRPC message sent (a file read's whole file travels in one).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Room in a request for everything but the appended bytes (ids, names).
const REQUEST_OVERHEAD: usize = 64 << 10;

/// The smallest limit on a request: tonic's own default.
const MIN_REQUEST_BYTES: usize = 4 << 20;

/// What the gRPC server accepts from its peers.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request message; a larger one is refused with
    /// RESOURCE_EXHAUSTED before it is buffered whole.
    pub max_request_bytes: usize,
    /// Most connections at once; more are closed as soon as they are
    /// accepted (each holds a file descriptor, and the log needs some).
    pub max_connections: usize,
    /// How quiet connections are watched.
    pub keepalive: Keepalive,
}

impl Limits {
    /// The limits for a server whose largest append is `max_append_bytes`:
    /// its requests, at most 4 MiB or the append and its envelope.
    pub fn for_max_append(max_append_bytes: usize) -> Limits {
        Limits {
            max_request_bytes: max_append_bytes
                .saturating_add(REQUEST_OVERHEAD)
                .max(MIN_REQUEST_BYTES),
            max_connections: MAX_CONNECTIONS,
            keepalive: Keepalive::DEFAULT,
        }
    }
}

/// The tonic service over a server handle.
#[derive(Clone)]
pub struct GrpcService {
    /// Where every call goes.
    handle: Handle,
}

impl GrpcService {
    /// A service feeding `handle`.
    pub fn new(handle: Handle) -> GrpcService {
        GrpcService { handle }
    }

    /// The tonic server wrapper, with message limits set.
    pub fn into_server(self, max_request_bytes: usize) -> LockServiceServer<GrpcService> {
        LockServiceServer::new(self)
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// A server stopping is the one failure a gRPC caller sees as a gRPC error.
fn unavailable(_: ShuttingDown) -> GrpcStatus {
    GrpcStatus::unavailable("the server is shutting down")
}

/// Serves gRPC on `listener` until `shutdown` resolves; over TLS when `tls`
/// is given (and with client certificates required when it has a client CA).
///
/// # Errors
/// Transport failures, or a TLS configuration tonic refuses.
pub async fn serve(
    listener: TcpListener,
    handle: Handle,
    tls: Option<&ServerTls>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive.interval))
        .http2_keepalive_timeout(Some(limits.keepalive.timeout));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.tonic_config())?;
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let incoming = TcpListenerStream::new(listener).filter_map(move |accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            // tonic logs it and goes on accepting.
            Err(e) => return Some(Err(e)),
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = ?stream.peer_addr().ok(), "too many gRPC connections; closing");
            return None;
        };
        // tonic's own `tcp_nodelay` does not apply to an incoming stream we
        // hand it, so set it on every accepted socket: with Nagle on, a
        // reply written right after an HTTP/2 window update waits ~40 ms for
        // a delayed ACK.
        let _ = stream.set_nodelay(true);
        Some(Ok(Slotted {
            stream,
            _slot: slot,
        }))
    });
    builder
        .add_service(GrpcService::new(handle).into_server(limits.max_request_bytes))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// An accepted connection holding one of the server's connection slots
/// until tonic drops it.
struct Slotted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Slotted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[tonic::async_trait]
impl LockService for GrpcService {
    async fn client_init(
        &self,
        req: GrpcRequest<ClientInitArgs>,
    ) -> Result<GrpcResponse<proto::Response>, GrpcStatus> {
        let out = calls::client_init(&self.handle, req.into_inner()).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }

    async fn lock_acquire(
        &self,
        req: GrpcRequest<LockArgs>,
    ) -> Result<GrpcResponse<LockResponse>, GrpcStatus> {
        let out = calls::lock_acquire(&self.handle, req.into_inner()).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }

    async fn lock_release(
        &self,
        req: GrpcRequest<LockArgs>,
    ) -> Result<GrpcResponse<LockResponse>, GrpcStatus> {
        let out = calls::lock_release(&self.handle, req.into_inner()).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }

    async fn file_append(
        &self,
        req: GrpcRequest<FileArgs>,
    ) -> Result<GrpcResponse<proto::Response>, GrpcStatus> {
        let out = calls::file_append(&self.handle, req.into_inner()).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }

    async fn renew_lease(
        &self,
        req: GrpcRequest<LeaseArgs>,
    ) -> Result<GrpcResponse<LeaseResponse>, GrpcStatus> {
        let out = calls::renew_lease(&self.handle, req.into_inner()).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }

    async fn client_close(
        &self,
        req: GrpcRequest<ClientInitArgs>,
    ) -> Result<GrpcResponse<proto::Response>, GrpcStatus> {
        let out = calls::client_close(&self.handle, req.into_inner()).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }

    async fn file_read(
        &self,
        req: GrpcRequest<FileReadArgs>,
    ) -> Result<GrpcResponse<FileReadResponse>, GrpcStatus> {
        let out = calls::file_read(&self.handle, req.into_inner()).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }

    async fn lock_status(
        &self,
        _req: GrpcRequest<StatusArgs>,
    ) -> Result<GrpcResponse<StatusResponse>, GrpcStatus> {
        let out = calls::lock_status(&self.handle).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }
}
