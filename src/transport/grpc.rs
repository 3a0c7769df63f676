//! gRPC transport (tonic): the original `lock.LockService`, wire compatible,
//! plus dlm's extensions; plain text by default, TLS with `--tls`.
//!
//! Owns: the tonic service and server. Each method hands its message to
//! [`super::calls`], which maps it to the core and back; a reply of the core
//! is always an `Ok` gRPC response carrying a dlm status. Only a server that
//! is shutting down answers with a gRPC error (UNAVAILABLE), which clients
//! retry. Must not: decide anything about locks, or map messages itself.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status as GrpcStatus};

use super::calls;
use super::tls::ServerTls;
use crate::proto::lock_service_server::{LockService, LockServiceServer};
use crate::proto::{
    self, ClientInitArgs, FileArgs, FileReadArgs, FileReadResponse, LeaseArgs, LeaseResponse,
    LockArgs, LockResponse, StatusArgs, StatusResponse,
};
use crate::server::{Handle, ShuttingDown};

pub use calls::wire_status;

/// Largest gRPC message accepted: room for the largest append allowed.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

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
    pub fn into_server(self) -> LockServiceServer<GrpcService> {
        LockServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
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
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.tonic_config())?;
    }
    // tonic's own `tcp_nodelay` does not apply to an incoming stream we hand
    // it, so set it on every accepted socket: with Nagle on, a reply written
    // right after an HTTP/2 window update waits ~40 ms for a delayed ACK.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    builder
        .add_service(GrpcService::new(handle).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
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
