//! The client's error type and the two mappings into it: from a dlm reply
//! status (the server answered and refused) and from a gRPC status (the call
//! itself failed, which may be worth a retry).
//!
//! This file decides *what* a failure means; it never retries, sleeps or
//! talks to the network. Retrying is [`super::call`]'s job.

use crate::proto;

/// Why a client operation failed.
///
/// The first group are the server's own answers: the request reached it and
/// was refused, nothing changed, and retrying the same request would get the
/// same answer. [`Error::Unavailable`] is the only one that says the outcome
/// is unknown.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A try-acquire (`wait: Some(0)`) found the lock held by another client.
    /// Try again later, or acquire with a wait.
    #[error("the lock is held by another client")]
    LockHeld,
    /// The acquire's wait ended before the lock was granted; the caller is
    /// no longer queued. Acquire again to queue again (at the back).
    #[error("the wait ended before the lock was granted")]
    WaitTimedOut,
    /// The token is stale: the lease ran out or the grant was released, and
    /// the lock may belong to someone else now. Stop acting as the holder;
    /// nothing staged under the token will ever become visible. Acquire again.
    #[error("the lease was lost: the token is stale or its lease ran out")]
    LeaseLost,
    /// The lock is not held by anyone, so there is nothing to release, renew
    /// or append under. Acquire it first.
    #[error("the lock is not held")]
    NotHeld,
    /// The token is current but belongs to another client id. Use the client
    /// id that acquired it.
    #[error("permission denied: the grant belongs to another client")]
    PermissionDenied,
    /// The client's session was closed (`close`) while the call was waiting.
    /// Call `init` and start over.
    #[error("the client session was closed")]
    SessionClosed,
    /// The server refused a malformed argument (file name, content size,
    /// lease, wait timeout, lock name) or the client was given a bad address.
    /// Fix the argument; retrying will not help.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No server answered within the retry budget (or the wait), or every
    /// answer was a transport failure, or the server had already forgotten
    /// the answer to the operation's request id when a retry reached it
    /// (`REQUEST_EXPIRED`). The outcome is unknown: the operation
    /// may or may not have taken effect. Check with `status`, or repeat it
    /// (a repeat is a new operation with a new request id).
    #[error("no server answered: {0}")]
    Unavailable(String),
    /// The TLS handshake failed: the server's certificate is not signed by
    /// the CA the client was given (or is for another name), or the server
    /// requires a client certificate and refused this client's (or its
    /// absence). Fix the certificates; retrying will not help.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The server failed or answered something this client does not know
    /// (an `ERROR` status, a newer status value, an unexpected gRPC status).
    /// The message says what; it is not worth a blind retry.
    #[error("server error: {0}")]
    Server(String),
}

impl Error {
    /// The error a dlm reply status stands for, or `None` for `OK`.
    ///
    /// `status` is the raw enum value of the reply's `status` field and
    /// `message` its `error_message`.
    pub(crate) fn from_reply(status: i32, message: &str) -> Option<Error> {
        use proto::Status;
        let error = match Status::try_from(status) {
            Ok(Status::Ok) => return None,
            Ok(Status::Error) => Error::Server(message.to_owned()),
            Ok(Status::LockHeld) => Error::LockHeld,
            Ok(Status::LockNotHeld) => Error::NotHeld,
            Ok(Status::InvalidToken) => Error::LeaseLost,
            Ok(Status::PermissionDenied) => Error::PermissionDenied,
            Ok(Status::WaitTimeout) => Error::WaitTimedOut,
            Ok(Status::InvalidArgument) => Error::BadRequest(message.to_owned()),
            Ok(Status::SessionClosed) => Error::SessionClosed,
            Ok(Status::RequestExpired) => Error::Unavailable(message.to_owned()),
            Err(_) => Error::Server(format!("unknown reply status {status}: {message}")),
        };
        Some(error)
    }

    /// Whether the error says the grant is gone for good (so a holder must
    /// stop acting as one), as opposed to a failure to reach the server.
    pub fn is_lease_gone(&self) -> bool {
        matches!(
            self,
            Error::LeaseLost | Error::NotHeld | Error::PermissionDenied | Error::SessionClosed
        )
    }
}

/// What one failed attempt means for the retry loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AttemptError {
    /// The attempt ran out of time: our deadline, or the server cut the call
    /// at the gRPC deadline. Retry; for a waiting acquire this is routine.
    TimedOut(String),
    /// The call failed on the way (connection refused or reset, server
    /// unavailable or crashed mid-call). Retry, preferably elsewhere.
    Transport(String),
    /// The server answered and refused, or the failure is not transient.
    /// Do not retry.
    Refused(Error),
    /// The server had forgotten the answer to this request id
    /// (`REQUEST_EXPIRED`): the outcome is unknown. An operation that may be
    /// repeated (a hello, a renew, an acquire) is sent again under a new id;
    /// any other ends as [`Error::Unavailable`].
    Expired(String),
}

/// The TLS error somewhere in `error`'s chain of causes, if any: rustls
/// errors travel inside `io::Error`s through hyper and tonic.
pub(crate) fn tls_cause(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                return Some(tls.to_string());
            }
        }
        next = error.source();
    }
    None
}

/// Classifies a gRPC-level failure (the dlm status never travels this way).
pub(crate) fn classify(status: &tonic::Status) -> AttemptError {
    use tonic::Code;
    if let Some(tls) = tls_cause(status) {
        return AttemptError::Refused(Error::Tls(tls));
    }
    let reason = format!("{}: {}", status.code(), status.message());
    match status.code() {
        Code::DeadlineExceeded | Code::Cancelled => AttemptError::TimedOut(reason),
        // RESOURCE_EXHAUSTED from the server: its request budget was full
        // (`--max-inflight-request-bytes`); nothing was done. Retried with
        // backoff, as gRPC advises.
        Code::Unavailable | Code::Unknown | Code::ResourceExhausted => {
            AttemptError::Transport(reason)
        }
        Code::InvalidArgument | Code::OutOfRange => {
            AttemptError::Refused(Error::BadRequest(status.message().to_owned()))
        }
        // Not dlm's PERMISSION_DENIED status (that travels in the reply, and
        // means the grant is another client's): a gRPC-level refusal comes
        // from something in front of the service (a proxy, an auth layer)
        // and says nothing about the grant.
        Code::PermissionDenied | Code::Unauthenticated => AttemptError::Refused(Error::Server(
            format!("refused before reaching the lock service ({reason})"),
        )),
        Code::Unimplemented => AttemptError::Refused(Error::Server(format!(
            "the server does not implement this call ({reason})"
        ))),
        // tonic reports an HTTP/2 stream reset or GOAWAY (INTERNAL_ERROR,
        // PROTOCOL_ERROR, even NO_ERROR; ENHANCE_YOUR_CALM) as INTERNAL or
        // RESOURCE_EXHAUSTED with the HTTP/2 error as their source: the call
        // failed on the way and may have taken effect, so it is retried with
        // its request id. A status the server sent has no source.
        Code::Internal if std::error::Error::source(status).is_some() => {
            AttemptError::Transport(reason)
        }
        _ => AttemptError::Refused(Error::Server(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Status;

    #[test]
    fn ok_is_no_error() {
        assert_eq!(Error::from_reply(Status::Ok as i32, "ignored"), None);
    }

    #[test]
    fn every_refusal_maps_to_its_variant() {
        let cases = [
            (Status::Error, Error::Server("boom".into())),
            (Status::LockHeld, Error::LockHeld),
            (Status::LockNotHeld, Error::NotHeld),
            (Status::InvalidToken, Error::LeaseLost),
            (Status::PermissionDenied, Error::PermissionDenied),
            (Status::WaitTimeout, Error::WaitTimedOut),
            (Status::InvalidArgument, Error::BadRequest("boom".into())),
            (Status::SessionClosed, Error::SessionClosed),
            (Status::RequestExpired, Error::Unavailable("boom".into())),
        ];
        for (status, expected) in cases {
            assert_eq!(
                Error::from_reply(status as i32, "boom"),
                Some(expected),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_newer_status_value_is_a_server_error_that_names_it() {
        let error = Error::from_reply(42, "from the future").unwrap();
        assert_eq!(
            error,
            Error::Server("unknown reply status 42: from the future".into())
        );
    }

    #[test]
    fn transient_grpc_failures_are_retried_and_others_are_not() {
        use tonic::Code;
        for code in [Code::Unavailable, Code::Unknown] {
            let got = classify(&tonic::Status::new(code, "x"));
            assert!(
                matches!(got, AttemptError::Transport(_)),
                "{code:?}: {got:?}"
            );
        }
        for code in [Code::DeadlineExceeded, Code::Cancelled] {
            let got = classify(&tonic::Status::new(code, "x"));
            assert!(
                matches!(got, AttemptError::TimedOut(_)),
                "{code:?}: {got:?}"
            );
        }
        assert_eq!(
            classify(&tonic::Status::invalid_argument("bad name")),
            AttemptError::Refused(Error::BadRequest("bad name".into()))
        );
        for refusal in [
            tonic::Status::permission_denied("no"),
            tonic::Status::unauthenticated("who"),
        ] {
            match classify(&refusal) {
                AttemptError::Refused(error) => {
                    assert!(!error.is_lease_gone(), "{error:?}");
                    assert!(matches!(error, Error::Server(_)), "{error:?}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            classify(&tonic::Status::internal("bug")),
            AttemptError::Refused(Error::Server(_))
        ));
        // The server's request budget was full: nothing was done; retried.
        assert!(matches!(
            classify(&tonic::Status::resource_exhausted("full")),
            AttemptError::Transport(_)
        ));
        // The same codes made by tonic from an HTTP/2 reset carry it as
        // their source: a failure on the way, retried.
        for code in [Code::Internal, Code::ResourceExhausted] {
            let mut reset = tonic::Status::new(code, "h2 protocol error");
            reset.set_source(std::sync::Arc::new(std::io::Error::other("stream reset")));
            assert!(
                matches!(classify(&reset), AttemptError::Transport(_)),
                "{code:?}"
            );
        }
    }

    #[test]
    fn lease_gone_covers_exactly_the_refusals_of_a_dead_grant() {
        assert!(Error::LeaseLost.is_lease_gone());
        assert!(Error::NotHeld.is_lease_gone());
        assert!(!Error::Unavailable("down".into()).is_lease_gone());
        assert!(!Error::LockHeld.is_lease_gone());
    }
}
