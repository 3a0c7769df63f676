//! The QUIC wire below the client library, as `proto/QUIC.md` describes it:
//! a bad request resets only its own stream with a clear code, and a peer
//! that opens streams without end is held to the stream limit while others
//! are served. (A client killed in the middle of an acquire is a scenario of
//! `blackbox.rs`, over every transport.)

// Only the core is barred from spawning tasks (clippy.toml); tests may.
#![allow(clippy::disallowed_methods)]

#[macro_use]
mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use common::{ServerProcess, Wire};
use dlm::client::AcquireOptions;
use dlm::proto::{
    call_request::Call, call_response::Reply, CallRequest, CallResponse, FileArgs, StatusArgs,
};
use dlm::transport::quic::client::QuicConnector;
use dlm::transport::quic::{self, frame, ErrorCode, MAX_STREAMS_PER_CONNECTION};
use prost::Message as _;

/// A raw QUIC connector to `server`, trusting its development CA.
fn connector(server: &ServerProcess) -> QuicConnector {
    let ca = std::fs::read(server.ca().expect("QUIC servers print their CA")).unwrap();
    let config = quic::client_config(&ca, None).unwrap();
    QuicConnector::new(server.client_addr(), None, config, None).unwrap()
}

/// A name can resolve to an address nothing answers on before the one the
/// server is on (`localhost` to `::1` first, the server on 127.0.0.1): the
/// connector tries the next address alongside and calls through it, instead
/// of failing after a whole idle timeout on the first.
#[tokio::test]
async fn a_dead_first_address_does_not_stop_the_connection() {
    let server = ServerProcess::start_over(Wire::Quic, &[]);
    // Bound and never read: datagrams to it vanish, as to a host that is
    // down (no ICMP refusal to end the handshake early).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let live: std::net::SocketAddr = server.client_addr().parse().unwrap();
    let connector = connector(&server).resolving_to(vec![silent.local_addr().unwrap(), live]);
    let connection = connector
        .connection()
        .await
        .expect("connected through the live address");
    assert_eq!(connection.remote_address(), live);
    let response = connector.call(&status_request()).await.unwrap();
    assert!(is_ok_status(&response), "{response:?}");
}

fn status_request() -> CallRequest {
    CallRequest {
        call: Some(Call::LockStatus(StatusArgs {})),
        timeout_ms: 0,
    }
}

/// Whether `response` is an OK status reply.
fn is_ok_status(response: &CallResponse) -> bool {
    matches!(&response.reply, Some(Reply::LockStatus(s)) if s.status == 0)
}

/// Sends `bytes` as the whole request side of a new stream: the server's
/// response bytes, or the code it reset the stream with.
async fn send_raw(connection: &quinn::Connection, bytes: &[u8]) -> Result<Vec<u8>, u64> {
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    // The server may stop reading early (that is the point of some cases).
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    match recv.read_to_end(1 << 20).await {
        Ok(bytes) => Ok(bytes),
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Err(code.into_inner()),
        Err(other) => panic!("stream failed otherwise: {other}"),
    }
}

/// A protobuf varint.
fn varint(value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(value, &mut out);
    out
}

#[tokio::test]
async fn malformed_and_oversize_frames_reset_only_their_own_stream() {
    let server = ServerProcess::start_over(Wire::Quic, &["--max-append-bytes", "1024"]);
    let connector = connector(&server);
    let connection = connector.connection().await.unwrap();
    let good = frame::encode(&status_request());
    let oversize_append = frame::encode(&CallRequest {
        call: Some(Call::FileAppend(FileArgs {
            client_id: 1,
            filename: "file_0".into(),
            content: vec![b'x'; 200 << 10],
            token: "t".into(),
            request_id: "r".into(),
        })),
        timeout_ms: 0,
    });
    let mut trailing = good.clone();
    trailing.push(0);
    let mut cut_short = varint(50);
    cut_short.extend_from_slice(&[0; 10]);
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("an empty stream", vec![], ErrorCode::MalformedFrame),
        (
            "a length prefix of 11 bytes",
            vec![0xff; 11],
            ErrorCode::MalformedFrame,
        ),
        (
            "a body that is not protobuf",
            vec![3, 0xff, 0xff, 0xff],
            ErrorCode::MalformedFrame,
        ),
        ("a frame cut short", cut_short, ErrorCode::MalformedFrame),
        ("bytes after the frame", trailing, ErrorCode::MalformedFrame),
        (
            "a prefix declaring 1 TiB",
            varint(1 << 40),
            ErrorCode::FrameTooLarge,
        ),
        (
            "a 200 KiB append",
            oversize_append,
            ErrorCode::FrameTooLarge,
        ),
        (
            "an envelope without a call",
            frame::encode(&CallRequest::default()),
            ErrorCode::UnknownCall,
        ),
    ];
    for (name, bytes, code) in cases {
        assert_eq!(
            send_raw(&connection, &bytes).await,
            Err(code as u64),
            "{name}"
        );
        // Only that stream was reset: the connection serves the next one.
        let answer = send_raw(&connection, &good).await.expect(name);
        let response = CallResponse::decode_length_delimited(answer.as_slice()).unwrap();
        assert!(is_ok_status(&response), "after {name}: {response:?}");
    }
    assert!(connection.close_reason().is_none());
    // Other clients are unaffected.
    let other = server.client(1);
    let grant = other.acquire("", AcquireOptions::try_once()).await.unwrap();
    other.release(&grant).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_opened_at_once_are_all_answered() {
    let server = ServerProcess::start_over(Wire::Quic, &[]);
    let connector = Arc::new(connector(&server));
    connector.connection().await.unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let connector = connector.clone();
        calls.spawn(async move { connector.call(&status_request()).await });
    }
    let mut answered = 0;
    while let Some(result) = calls.join_next().await {
        let response = result.unwrap().unwrap();
        assert!(is_ok_status(&response), "{response:?}");
        answered += 1;
    }
    assert_eq!(answered, 10_000);
    server.client(1).init().await.unwrap();
}

/// Polls `future` once: whether it is still pending.
async fn is_pending<F: Future + Unpin>(future: &mut F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx).is_pending())).await
}

#[tokio::test]
async fn a_peer_that_opens_streams_without_end_is_held_to_the_stream_limit() {
    let server = ServerProcess::start_over(Wire::Quic, &[]);
    let connector = connector(&server);
    let connection = connector.connection().await.unwrap();
    // Every stream the server allows, each left with half a request.
    let mut stalled = Vec::new();
    for _ in 0..MAX_STREAMS_PER_CONNECTION {
        let (mut send, recv) = connection.open_bi().await.unwrap();
        send.write_all(&varint(5)).await.unwrap();
        stalled.push((send, recv));
    }
    // One more is not granted: QUIC's stream credit is used up.
    let mut next = Box::pin(connection.open_bi());
    assert!(is_pending(&mut next).await);

    // Meanwhile other clients are served as usual.
    let other = server.client(1);
    let grant = other.acquire("", AcquireOptions::try_once()).await.unwrap();
    other.release(&grant).await.unwrap();

    // Giving up the stalled streams frees their slots (QUIC announces new
    // credit once an eighth of the limit is free), and the waiting one opens.
    for (mut send, recv) in stalled {
        send.reset(ErrorCode::Cancelled.varint()).unwrap();
        drop(recv);
    }
    let (mut send, mut recv) = next.await.unwrap();
    send.write_all(&frame::encode(&status_request()))
        .await
        .unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(1 << 20).await.unwrap();
    let response = CallResponse::decode_length_delimited(answer.as_slice()).unwrap();
    assert!(is_ok_status(&response), "{response:?}");
}

/// The waiters of `lock` as the server shows them: (client id, cut off).
async fn waiters(server: &ServerProcess, lock: &str) -> Vec<(i32, bool)> {
    let status = server.client(99).status().await.unwrap();
    status
        .locks
        .iter()
        .find(|l| l.name == lock)
        .map(|l| {
            l.waiters
                .iter()
                .map(|w| (w.client_id, w.detached))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the server shows exactly `expected` waiting for `lock`.
async fn until_waiters(server: &ServerProcess, lock: &str, expected: &[(i32, bool)]) {
    while waiters(server, lock).await != expected {
        tokio::task::yield_now().await;
    }
}

fn acquire(client_id: i32, lock: &str, request_id: &str) -> CallRequest {
    CallRequest {
        call: Some(Call::LockAcquire(dlm::proto::LockArgs {
            client_id,
            lock_name: lock.into(),
            request_id: request_id.into(),
            ..Default::default()
        })),
        timeout_ms: 0,
    }
}

#[tokio::test]
async fn giving_up_a_call_or_losing_the_connection_cuts_the_waiter_off() {
    let server = ServerProcess::start_over(Wire::Quic, &[]);
    let holder = server.client(1);
    let held = holder
        .acquire("q", AcquireOptions::default())
        .await
        .unwrap();

    // A waiter whose call is given up (STOP_SENDING on its stream) is cut off
    // but keeps its place; the same request id on a new stream takes it back.
    let connector = Arc::new(connector(&server));
    let waiting = tokio::spawn({
        let connector = connector.clone();
        async move { connector.call(&acquire(2, "q", "r-2")).await }
    });
    until_waiters(&server, "q", &[(2, false)]).await;
    waiting.abort();
    until_waiters(&server, "q", &[(2, true)]).await;
    let retried = tokio::spawn({
        let connector = connector.clone();
        async move { connector.call(&acquire(2, "q", "r-2")).await }
    });
    until_waiters(&server, "q", &[(2, false)]).await;

    // A waiter whose connection closes is cut off too.
    let other = Arc::new(self::connector(&server));
    let lost = tokio::spawn({
        let other = other.clone();
        async move { other.call(&acquire(3, "q", "r-3")).await }
    });
    until_waiters(&server, "q", &[(2, false), (3, false)]).await;
    other
        .connection()
        .await
        .unwrap()
        .close(ErrorCode::NoError.varint(), b"gone");
    assert!(lost.await.unwrap().is_err());
    until_waiters(&server, "q", &[(2, false), (3, true)]).await;

    // The re-attached waiter is granted when the holder releases.
    holder.release(&held).await.unwrap();
    let response = retried.await.unwrap().unwrap();
    assert!(
        matches!(&response.reply, Some(Reply::LockAcquire(r)) if r.status == 0 && !r.token.is_empty()),
        "{response:?}"
    );
}

#[tokio::test]
async fn a_connection_that_hears_nothing_is_closed_and_the_next_call_reconnects() {
    let server = ServerProcess::start_over(Wire::Quic, &[]);
    let connector = connector(&server);
    let first = connector.connection().await.unwrap();
    assert!(is_ok_status(
        &connector.call(&status_request()).await.unwrap()
    ));

    // A frozen server answers nothing, not even the client's pings: the
    // client closes the connection at its idle timeout.
    server.signal(libc::SIGSTOP);
    let limit = quic::CLIENT_IDLE_TIMEOUT * 2;
    let closed = tokio::time::timeout(limit, first.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::TimedOut)),
        "{closed:?}"
    );

    // Once the server is back, the next call goes over a new connection.
    server.signal(libc::SIGCONT);
    assert!(is_ok_status(
        &connector.call(&status_request()).await.unwrap()
    ));
    let second = connector.connection().await.unwrap();
    assert_ne!(first.stable_id(), second.stable_id());
}

#[tokio::test]
async fn a_quiet_connection_to_a_live_server_outlasts_the_idle_timeout() {
    let server = ServerProcess::start_over(Wire::Quic, &[]);
    let holder = server.client(1);
    let held = holder
        .acquire("k", AcquireOptions::default())
        .await
        .unwrap();
    let connector = connector(&server);
    let first = connector.connection().await.unwrap();
    // A waiting acquire the server holds past the idle timeout: nothing but
    // pings and their acknowledgements cross, and the connection lives.
    let wait = quic::CLIENT_IDLE_TIMEOUT + std::time::Duration::from_secs(1);
    let given_up = tokio::time::timeout(wait, connector.call(&acquire(2, "k", "r-k"))).await;
    assert!(given_up.is_err(), "the lock was free: {given_up:?}");
    assert!(first.close_reason().is_none(), "{:?}", first.close_reason());
    holder.release(&held).await.unwrap();
}

/// `call`, bounded: a reply that never comes fails the test instead of
/// stalling the suite.
async fn answered<F: Future>(call: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(60), call)
        .await
        .expect("the call was answered")
}

/// Many clients on one lock, each on a connection of its own and with no
/// retries (a retry would be answered from the dedup table and hide a reply
/// that never left): every acquire and release is answered, whichever call
/// ran the group commit that made it durable; the lock is never held by two
/// clients at once; and each grant's fencing number is above the previous
/// holder's. (It caught, in every run, an experiment of the nineteenth round
/// that let a waiting call hold the grant of the call it waited for; the
/// simulations' retrying clients did not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_handoffs_are_all_answered_and_exclusive() {
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
    const CLIENTS: i32 = 64;
    const CYCLES: usize = 10;
    let server = ServerProcess::start_over(Wire::Quic, &[]);
    let holder = Arc::new(AtomicI32::new(0));
    let last_fence = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client in 1..=CLIENTS {
        let connector = connector(&server);
        let (holder, last_fence) = (holder.clone(), last_fence.clone());
        clients.push(tokio::spawn(async move {
            for cycle in 0..CYCLES {
                let request = acquire(client, "c", &format!("a-{client}-{cycle}"));
                let response: CallResponse = answered(connector.call(&request)).await.unwrap();
                let Some(Reply::LockAcquire(grant)) = response.reply else {
                    panic!("client {client}: {response:?}")
                };
                assert!(grant.status == 0 && !grant.token.is_empty(), "{grant:?}");
                assert_eq!(holder.swap(client, Ordering::SeqCst), 0, "two holders");
                let before = last_fence.swap(grant.fencing_token, Ordering::SeqCst);
                assert!(
                    before < grant.fencing_token,
                    "fence {before} then {grant:?}"
                );
                assert_eq!(holder.swap(0, Ordering::SeqCst), client);
                let release = CallRequest {
                    call: Some(Call::LockRelease(dlm::proto::LockArgs {
                        client_id: client,
                        lock_name: "c".into(),
                        token: grant.token,
                        request_id: format!("r-{client}-{cycle}"),
                        ..Default::default()
                    })),
                    timeout_ms: 0,
                };
                let response: CallResponse = answered(connector.call(&release)).await.unwrap();
                assert!(
                    matches!(&response.reply, Some(Reply::LockRelease(r)) if r.status == 0),
                    "client {client}: {response:?}"
                );
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    assert!(waiters(&server, "c").await.is_empty());
}
