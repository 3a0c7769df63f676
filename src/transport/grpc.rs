//! gRPC transport (tonic): the original `lock.LockService`, wire compatible,
//! plus dlm's extensions.
//!
//! Owns: mapping protobuf messages to [`Request`]s and [`Reply`]s to
//! protobuf messages with their `Status` values. A reply of the core is always
//! an `Ok` gRPC response carrying a dlm status; only a server that is
//! shutting down answers with a gRPC error (UNAVAILABLE), which clients retry.
//! Must not: decide anything about locks.

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status as GrpcStatus};

use crate::core::time::Millis;
use crate::core::types::{RefusalCode, Reply, Request};
use crate::proto::lock_service_server::{LockService, LockServiceServer};
use crate::proto::{
    self, ClientInitArgs, FileArgs, FileReadArgs, FileReadResponse, LeaseArgs, LeaseResponse,
    LockArgs, LockInfo, LockResponse, StatusArgs, StatusResponse, Waiter,
};
use crate::server::{Handle, ShuttingDown};

/// Largest gRPC message accepted: room for the largest append allowed.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The tonic service over a server handle.
#[derive(Clone)]
pub struct GrpcService {
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

    async fn call(&self, request_id: String, request: Request) -> Result<Reply, GrpcStatus> {
        self.handle
            .call(request_id, request)
            .await
            .map_err(|ShuttingDown| GrpcStatus::unavailable("the server is shutting down"))
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves.
///
/// # Errors
/// Transport failures.
pub async fn serve(
    listener: TcpListener,
    handle: Handle,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(GrpcService::new(handle).into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}

/// The wire status of a reply, with its message.
pub fn wire_status(reply: &Reply) -> (proto::Status, String) {
    match reply {
        Reply::Refused(refusal) => {
            let status = match refusal.code {
                RefusalCode::Error => proto::Status::Error,
                RefusalCode::LockHeld => proto::Status::LockHeld,
                RefusalCode::LockNotHeld => proto::Status::LockNotHeld,
                RefusalCode::InvalidToken => proto::Status::InvalidToken,
                RefusalCode::PermissionDenied => proto::Status::PermissionDenied,
                RefusalCode::WaitTimeout => proto::Status::WaitTimeout,
                RefusalCode::InvalidArgument => proto::Status::InvalidArgument,
                RefusalCode::SessionClosed => proto::Status::SessionClosed,
            };
            (status, refusal.message.clone())
        }
        _ => (proto::Status::Ok, String::new()),
    }
}

fn response(reply: &Reply) -> proto::Response {
    let (status, error_message) = wire_status(reply);
    proto::Response {
        status: status as i32,
        error_message,
    }
}

fn lock_response(reply: &Reply) -> LockResponse {
    let (status, error_message) = wire_status(reply);
    let mut out = LockResponse {
        status: status as i32,
        error_message,
        ..LockResponse::default()
    };
    if let Reply::Granted(grant) = reply {
        out.token = grant.token.clone();
        out.fencing_token = grant.fence.0;
        out.lease_ms = grant.lease.0;
    }
    out
}

#[tonic::async_trait]
impl LockService for GrpcService {
    async fn client_init(
        &self,
        req: GrpcRequest<ClientInitArgs>,
    ) -> Result<GrpcResponse<proto::Response>, GrpcStatus> {
        let args = req.into_inner();
        let reply = self
            .call(
                args.request_id,
                Request::ClientInit {
                    client: args.client_id,
                },
            )
            .await?;
        Ok(GrpcResponse::new(response(&reply)))
    }

    async fn lock_acquire(
        &self,
        req: GrpcRequest<LockArgs>,
    ) -> Result<GrpcResponse<LockResponse>, GrpcStatus> {
        let args = req.into_inner();
        let request = Request::Acquire {
            client: args.client_id,
            lock: args.lock_name,
            wait: args.wait_timeout_ms.map(Millis),
            lease: args.lease_ms.map(Millis),
        };
        let reply = self.call(args.request_id, request).await?;
        Ok(GrpcResponse::new(lock_response(&reply)))
    }

    async fn lock_release(
        &self,
        req: GrpcRequest<LockArgs>,
    ) -> Result<GrpcResponse<LockResponse>, GrpcStatus> {
        let args = req.into_inner();
        let request = Request::Release {
            client: args.client_id,
            lock: args.lock_name,
            token: args.token,
        };
        let reply = self.call(args.request_id, request).await?;
        Ok(GrpcResponse::new(lock_response(&reply)))
    }

    async fn file_append(
        &self,
        req: GrpcRequest<FileArgs>,
    ) -> Result<GrpcResponse<proto::Response>, GrpcStatus> {
        let args = req.into_inner();
        let request = Request::Append {
            client: args.client_id,
            file: args.filename,
            content: args.content.into(),
            token: args.token,
        };
        let reply = self.call(args.request_id, request).await?;
        Ok(GrpcResponse::new(response(&reply)))
    }

    async fn renew_lease(
        &self,
        req: GrpcRequest<LeaseArgs>,
    ) -> Result<GrpcResponse<LeaseResponse>, GrpcStatus> {
        let args = req.into_inner();
        let request = Request::Renew {
            client: args.client_id,
            lock: args.lock_name,
            token: args.token,
            lease: args.lease_ms.map(Millis),
        };
        let reply = self.call(args.request_id, request).await?;
        let (status, error_message) = wire_status(&reply);
        let lease_ms = match reply {
            Reply::Renewed { lease } => lease.0,
            _ => 0,
        };
        Ok(GrpcResponse::new(LeaseResponse {
            status: status as i32,
            error_message,
            lease_ms,
        }))
    }

    async fn client_close(
        &self,
        req: GrpcRequest<ClientInitArgs>,
    ) -> Result<GrpcResponse<proto::Response>, GrpcStatus> {
        let args = req.into_inner();
        let reply = self
            .call(
                args.request_id,
                Request::ClientClose {
                    client: args.client_id,
                },
            )
            .await?;
        Ok(GrpcResponse::new(response(&reply)))
    }

    async fn file_read(
        &self,
        req: GrpcRequest<FileReadArgs>,
    ) -> Result<GrpcResponse<FileReadResponse>, GrpcStatus> {
        let args = req.into_inner();
        let read = self
            .handle
            .read_file(&args.filename)
            .await
            .map_err(|ShuttingDown| GrpcStatus::unavailable("the server is shutting down"))?;
        Ok(GrpcResponse::new(match read {
            Ok(content) => FileReadResponse {
                status: proto::Status::Ok as i32,
                error_message: String::new(),
                content,
            },
            Err(reply) => {
                let (status, error_message) = wire_status(&reply);
                FileReadResponse {
                    status: status as i32,
                    error_message,
                    content: Vec::new(),
                }
            }
        }))
    }

    async fn lock_status(
        &self,
        _req: GrpcRequest<StatusArgs>,
    ) -> Result<GrpcResponse<StatusResponse>, GrpcStatus> {
        let reply = self.call(String::new(), Request::Status).await?;
        let (status, error_message) = wire_status(&reply);
        let mut out = StatusResponse {
            status: status as i32,
            error_message,
            ..StatusResponse::default()
        };
        if let Reply::Status { locks, last_fence } = reply {
            out.last_fencing_token = last_fence.0;
            out.locks = locks
                .into_iter()
                .map(|view| LockInfo {
                    lock_name: view.lock,
                    holder_client_id: view.holder.unwrap_or_default(),
                    fencing_token: view.fence.0,
                    lease_left_ms: view.lease_left.0,
                    waiters: view
                        .waiters
                        .into_iter()
                        .map(|(client_id, detached)| Waiter {
                            client_id,
                            detached,
                        })
                        .collect(),
                    staged_appends: view.staged_appends,
                })
                .collect();
        }
        Ok(GrpcResponse::new(out))
    }
}
