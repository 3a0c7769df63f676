//! The calls of `proto/lock.proto`, transport-independent.
//!
//! Owns: what each protobuf request means as a core [`Request`] and how each
//! core [`Reply`] is written back as the protobuf response of its method,
//! with its `Status` value. gRPC and QUIC both serve through these
//! functions, so the two transports answer every call identically.
//! Must not: decide anything about locks (the core does), or know how a
//! message travels (the transports do).

use crate::core::time::Millis;
use crate::core::types::{RefusalCode, Reply, Request};
use crate::proto::{
    self, call_request, call_response, ClientInitArgs, FileArgs, FileReadArgs, FileReadResponse,
    LeaseArgs, LeaseResponse, LockArgs, LockInfo, LockResponse, StatusResponse, Waiter,
};
use crate::server::{Handle, HeldReply, ShuttingDown};

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
                RefusalCode::InvalidArgument | RefusalCode::StagedLimit => {
                    proto::Status::InvalidArgument
                }
                RefusalCode::SessionClosed => proto::Status::SessionClosed,
                RefusalCode::RequestExpired => proto::Status::RequestExpired,
            };
            (status, refusal.message.clone())
        }
        _ => (proto::Status::Ok, String::new()),
    }
}

/// Serves one call given as an envelope's `call`: the transport-independent
/// entry for transports that carry [`proto::CallRequest`]s. A file read's
/// reply comes with its share of the read-reply budget, to be held until
/// the reply has left.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn dispatch(
    handle: &Handle,
    call: call_request::Call,
) -> Result<(call_response::Reply, Option<HeldReply>), ShuttingDown> {
    use call_request::Call;
    use call_response::Reply as Out;
    Ok(match call {
        Call::ClientInit(args) => (Out::ClientInit(client_init(handle, args).await?), None),
        Call::LockAcquire(args) => (Out::LockAcquire(lock_acquire(handle, args).await?), None),
        Call::LockRelease(args) => (Out::LockRelease(lock_release(handle, args).await?), None),
        Call::FileAppend(args) => (Out::FileAppend(file_append(handle, args).await?), None),
        Call::RenewLease(args) => (Out::RenewLease(renew_lease(handle, args).await?), None),
        Call::ClientClose(args) => (Out::ClientClose(client_close(handle, args).await?), None),
        Call::FileRead(args) => {
            let (response, held) = file_read(handle, args).await?;
            (Out::FileRead(response), held)
        }
        Call::LockStatus(_) => (Out::LockStatus(lock_status(handle).await?), None),
    })
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
        out.token = grant.token.to_string();
        out.fencing_token = grant.fence.0;
        out.lease_ms = grant.lease.0;
    }
    out
}

/// `ClientInit`: a hello that registers the client id.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn client_init(
    handle: &Handle,
    args: ClientInitArgs,
) -> Result<proto::Response, ShuttingDown> {
    let request = Request::ClientInit {
        client: args.client_id,
    };
    let reply = handle.call(args.request_id, request).await?;
    Ok(response(&reply))
}

/// `LockAcquire`: waits server-side as the arguments say.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn lock_acquire(handle: &Handle, args: LockArgs) -> Result<LockResponse, ShuttingDown> {
    let request = Request::Acquire {
        client: args.client_id,
        lock: args.lock_name.into(),
        wait: args.wait_timeout_ms.map(Millis),
        lease: args.lease_ms.map(Millis),
    };
    let reply = handle.call(args.request_id, request).await?;
    Ok(lock_response(&reply))
}

/// `LockRelease`.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn lock_release(handle: &Handle, args: LockArgs) -> Result<LockResponse, ShuttingDown> {
    let request = Request::Release {
        client: args.client_id,
        lock: args.lock_name.into(),
        token: args.token,
    };
    let reply = handle.call(args.request_id, request).await?;
    Ok(lock_response(&reply))
}

/// `FileAppend`: staged under the default lock's grant.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn file_append(handle: &Handle, args: FileArgs) -> Result<proto::Response, ShuttingDown> {
    let request = Request::Append {
        client: args.client_id,
        file: args.filename,
        content: args.content.into(),
        token: args.token,
    };
    let reply = handle.call(args.request_id, request).await?;
    Ok(response(&reply))
}

/// `RenewLease`.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn renew_lease(handle: &Handle, args: LeaseArgs) -> Result<LeaseResponse, ShuttingDown> {
    let request = Request::Renew {
        client: args.client_id,
        lock: args.lock_name.into(),
        token: args.token,
        lease: args.lease_ms.map(Millis),
    };
    let reply = handle.call(args.request_id, request).await?;
    let (status, error_message) = wire_status(&reply);
    let lease_ms = match reply {
        Reply::Renewed { lease } => lease.0,
        _ => 0,
    };
    Ok(LeaseResponse {
        status: status as i32,
        error_message,
        lease_ms,
    })
}

/// `ClientClose`: ends the client's session.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn client_close(
    handle: &Handle,
    args: ClientInitArgs,
) -> Result<proto::Response, ShuttingDown> {
    let request = Request::ClientClose {
        client: args.client_id,
    };
    let reply = handle.call(args.request_id, request).await?;
    Ok(response(&reply))
}

/// `FileRead`: the committed content of a data file, with its share of the
/// read-reply budget (none for a refusal).
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn file_read(
    handle: &Handle,
    args: FileReadArgs,
) -> Result<(FileReadResponse, Option<HeldReply>), ShuttingDown> {
    Ok(match handle.read_file(&args.filename).await? {
        Ok((content, held)) => {
            let response = FileReadResponse {
                status: proto::Status::Ok as i32,
                error_message: String::new(),
                content,
            };
            (response, Some(held))
        }
        Err(reply) => {
            let (status, error_message) = wire_status(&reply);
            let response = FileReadResponse {
                status: status as i32,
                error_message,
                content: Vec::new(),
            };
            (response, None)
        }
    })
}

/// `LockStatus`: every held or awaited lock.
///
/// # Errors
/// [`ShuttingDown`] when the server stops first.
pub async fn lock_status(handle: &Handle) -> Result<StatusResponse, ShuttingDown> {
    let reply = handle.call(String::new(), Request::Status).await?;
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
                lock_name: view.lock.to_string(),
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
    Ok(out)
}
