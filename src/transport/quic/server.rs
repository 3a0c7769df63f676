//! The QUIC server: an accept loop over a caller's [`Endpoint`], a task per
//! connection, whose calls (one per stream) run inside it.
//!
//! Owns: the life of connections and streams, and the limits on them. A
//! stream's task reads one request frame, hands the call to
//! [`calls::dispatch`], and writes one response frame. While the call waits
//! (a long acquire) it watches for the client giving up — `STOP_SENDING` on
//! the stream, or the connection ending — and then drops the call's future,
//! which is how the core learns that a call was cut off. A bad request resets
//! only its own stream. A stop drains: new connections are refused and new
//! calls reset with `UNAVAILABLE`, while the calls in progress finish and
//! their replies reach the peer, for up to the drain grace. Must not: know
//! what a call means (that is [`calls`]), or bind sockets (the caller does).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use quinn::{Endpoint, Incoming, RecvStream, SendStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::frame::{self, FrameError};
use super::{ErrorCode, DRAIN_GRACE, MIN_REQUEST_RATE, REPLY_STALL_LIMIT, REQUEST_TIMEOUT};
use crate::proto::{CallRequest, CallResponse};
use crate::server::Handle;
use crate::transport::calls;
use crate::transport::MAX_CONNECTIONS;

/// What the server accepts from a peer.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request frame body, in bytes.
    pub max_request_bytes: usize,
    /// Most connections at once; more are refused during the handshake.
    pub max_connections: usize,
    /// How long a request may keep the server waiting for its next bytes
    /// (or its end); then its stream is reset with `INCOMPLETE_REQUEST`.
    pub request_timeout: Duration,
    /// The slowest a request may arrive on average, in bytes per second
    /// past its first `request_timeout` ([`MIN_REQUEST_RATE`]; 0: no
    /// bound); then the same.
    pub min_request_rate: u64,
    /// How long a file read's reply may wait for the peer to take any more
    /// of it (flow control credit, then the acknowledgement of its end).
    pub reply_stall: Duration,
    /// How long a stop waits for the calls in progress and their replies
    /// ([`DRAIN_GRACE`]).
    pub drain_grace: Duration,
}

impl Limits {
    /// The limits for a server whose largest append is `max_append_bytes`.
    pub fn for_max_append(max_append_bytes: usize) -> Limits {
        Limits {
            max_request_bytes: max_append_bytes.saturating_add(super::FRAME_OVERHEAD),
            max_connections: MAX_CONNECTIONS,
            request_timeout: REQUEST_TIMEOUT,
            min_request_rate: MIN_REQUEST_RATE,
            reply_stall: REPLY_STALL_LIMIT,
            drain_grace: DRAIN_GRACE,
        }
    }
}

/// Serves calls arriving on `endpoint` until `shutdown` resolves, then
/// drains: new connections are refused and new calls reset with
/// `UNAVAILABLE` (clients retry, elsewhere if they can), while each
/// connection finishes the calls it has and closes once their replies are
/// acknowledged. After `limits.drain_grace` the connections still open are
/// closed (their calls cut off). Returns once the endpoint is idle.
pub async fn serve(
    endpoint: Endpoint,
    handle: Handle,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    // Each connection's drain signal: dropping the sender starts its drain.
    // (Ordered, so that the connections learn of it in the same order in
    // every run of a simulation.)
    let mut drains: BTreeMap<tokio::task::Id, oneshot::Sender<()>> = BTreeMap::new();
    let draining = Arc::new(AtomicBool::new(false));
    let mut refused: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        // `biased`: branches in a fixed order rather than tokio's random
        // one, so that a simulation replays from its seed.
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let (drain, drained) = oneshot::channel();
                        let served = Served {
                            handle: handle.clone(),
                            limits,
                            draining: draining.clone(),
                        };
                        let task = connections.spawn(serve_connection(incoming, served, drained, slot));
                        drains.insert(task.id(), drain);
                    }
                    Err(_) => {
                        // One line for the first refusal and then one per
                        // thousand, as over gRPC: a flood at the cap (cheap
                        // to send, with any source address) must not turn
                        // into a flood of log lines.
                        refused += 1;
                        if refused == 1 || refused.is_multiple_of(1000) {
                            tracing::warn!(
                                peer = %incoming.remote_address(),
                                refused,
                                "too many QUIC connections (--max-connections); refusing new ones"
                            );
                        }
                        incoming.refuse();
                    }
                }
            }
            Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => {
                drains.remove(&task_id(&ended));
            }
        }
    }
    draining.store(true, Ordering::Relaxed);
    drains.clear();
    let grace = tokio::time::sleep(limits.drain_grace);
    tokio::pin!(grace);
    let mut accepting = true;
    while !connections.is_empty() {
        tokio::select! {
            biased;
            () = &mut grace => {
                tracing::warn!(
                    open = connections.len(),
                    "QUIC connections still open after the drain grace; closing them"
                );
                break;
            }
            _ = connections.join_next() => {}
            incoming = endpoint.accept(), if accepting => match incoming {
                Some(incoming) => incoming.refuse(),
                None => accepting = false,
            },
        }
    }
    endpoint.close(ErrorCode::NoError.varint(), b"server shutting down");
    connections.shutdown().await;
    // Lets the close reach the peers; bounded by the idle timeout.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// The id of a connection's task, however it ended.
fn task_id(ended: &Result<(tokio::task::Id, ()), tokio::task::JoinError>) -> tokio::task::Id {
    match ended {
        Ok((id, ())) => *id,
        Err(error) => error.id(),
    }
}

/// What every call of a server shares.
#[derive(Clone)]
struct Served {
    handle: Handle,
    limits: Limits,
    /// Set when the server drains: new calls are refused.
    draining: Arc<AtomicBool>,
}

/// One connection: its calls run inside this task (not a task each) until
/// the connection ends, then the calls still running are dropped (cut off).
/// When `drain` fires (its sender dropped), the connection is closed once
/// the calls it has are done (calls that arrive meanwhile are refused by
/// [`serve_stream`]).
///
/// Polling the calls here rather than spawning them keeps a call's reply on
/// the thread that served it: a spawned call that finished woke this task
/// and quinn's connection driver at once, and the runtime handed one of
/// them to the other worker (a wake-up and a contended connection lock per
/// call, ~10-20 µs of a lone client's round trip on the bench machine).
async fn serve_connection(
    incoming: Incoming,
    served: Served,
    mut drain: oneshot::Receiver<()>,
    _slot: OwnedSemaphorePermit,
) {
    let peer = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            tracing::debug!(%peer, %error, "QUIC handshake failed");
            return;
        }
    };
    tracing::debug!(%peer, "QUIC connection");
    let mut calls = FuturesUnordered::new();
    // The streams of the latest responses, which may not be acknowledged
    // yet (quinn sends and resends a finished stream's bytes until they
    // are, as long as the connection lives). Kept rather than awaited: a
    // wait for each acknowledgement cost a wake-up per call. A drain waits
    // for these (`settling`) before it closes the connection.
    let mut recent: VecDeque<SendStream> = VecDeque::new();
    let mut settling = FuturesUnordered::new();
    let mut draining = false;
    loop {
        // `biased`: a fixed order, so that a simulation replays.
        tokio::select! {
            biased;
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    calls.push(serve_stream(served.clone(), send, recv));
                }
                Err(error) => {
                    tracing::debug!(%peer, %error, "QUIC connection ended");
                    break;
                }
            },
            Some(answered) = calls.next(), if !calls.is_empty() => {
                if let Some(send) = answered {
                    if draining {
                        settling.push(send.stopped());
                    } else {
                        if recent.len() == RECENT_RESPONSES {
                            recent.pop_front();
                        }
                        recent.push_back(send);
                    }
                }
            }
            Some(_) = settling.next(), if !settling.is_empty() => {}
            _ = &mut drain, if !draining => {
                draining = true;
                settling.extend(recent.drain(..).map(|send| send.stopped()));
            }
        }
        if draining && calls.is_empty() && settling.is_empty() {
            connection.close(ErrorCode::NoError.varint(), b"server shutting down");
            break;
        }
    }
    drop(calls);
    drop(connection);
}

/// How many of a connection's latest responses a drain waits to see
/// acknowledged (one per stream the connection may have open): older ones
/// are taken as acknowledged, which on a live connection they all but
/// certainly are.
const RECENT_RESPONSES: usize = super::MAX_STREAMS_PER_CONNECTION as usize;

/// Resets both directions of a stream with `code`.
fn refuse(send: &mut SendStream, recv: &mut RecvStream, code: ErrorCode) {
    let _ = recv.stop(code.varint());
    let _ = send.reset(code.varint());
}

/// One call: request frame in, response frame out. Returns the stream of a
/// response written whole, whose acknowledgement may still be to come.
async fn serve_stream(
    served: Served,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Option<SendStream> {
    let Served {
        handle,
        limits,
        draining,
    } = served;
    if draining.load(Ordering::Relaxed) {
        // The server is stopping. (If the connection closes before this
        // reset leaves, the client sees the close instead: quinn-proto
        // sends nothing else after a close, and tells nobody when a reset
        // is acknowledged. Either way the client retries.)
        refuse(&mut send, &mut recv, ErrorCode::Unavailable);
        return None;
    }
    let read = frame::read_frame_paced::<CallRequest>(
        &mut recv,
        limits.max_request_bytes,
        limits.request_timeout,
        limits.min_request_rate,
        handle.request_budget(),
    )
    .await;
    let request = match read {
        Ok(request) => request,
        Err(error) => {
            if let Some(code) = error.code() {
                tracing::debug!(stream = %send.id(), %error, "refusing a bad request frame");
                refuse(&mut send, &mut recv, code);
            } else if let FrameError::Reset(_) = error {
                // The client reset its request: it gave the call up. The
                // answer's direction is reset too (dropping it would
                // finish it: an empty response, which is no frame at all).
                let _ = send.reset(ErrorCode::Cancelled.varint());
            }
            return None;
        }
    };
    drop(recv);
    let Some(call) = request.call else {
        let _ = send.reset(ErrorCode::UnknownCall.varint());
        return None;
    };
    let deadline = (request.timeout_ms > 0).then(|| Duration::from_millis(request.timeout_ms));
    let stopped = send.stopped();
    // `biased`: an answer that is ready goes out even if the client gave up
    // or the deadline passed in the same instant, and a simulation replays
    // (tokio's random pick of a branch is not seeded).
    let answer = tokio::select! {
        biased;
        answer = calls::dispatch(&handle, call) => answer,
        // The client gave up or the connection ended: dropping the call's
        // future tells the core.
        _ = stopped => return None,
        () = sleep_opt(deadline) => {
            let _ = send.reset(ErrorCode::DeadlineExceeded.varint());
            return None;
        }
    };
    match answer {
        Ok((reply, None)) => {
            let frame = frame::encode(&CallResponse { reply: Some(reply) });
            if send.write_all(&frame).await.is_ok() && send.finish().is_ok() {
                return Some(send);
            }
        }
        Ok((reply, Some(held))) => {
            let frame = frame::encode(&CallResponse { reply: Some(reply) });
            // A read's share of the budget is given back once the peer has
            // the whole reply (quinn holds what it has not yet
            // acknowledged), or the stream or connection ends, or the peer
            // stopped taking it: a peer that answers pings but never reads
            // would otherwise hold the share, and every other read waiting
            // for the budget, for as long as its connection lives.
            if let Err(Stalled) = write_reply(&mut send, &frame, limits.reply_stall).await {
                tracing::debug!(stream = %send.id(), "a read's reply was not taken in time; resetting it");
                let _ = send.reset(ErrorCode::ReplyStalled.varint());
            }
            drop(frame);
            drop(held);
        }
        Err(_shutting_down) => {
            let _ = send.reset(ErrorCode::Unavailable.varint());
        }
    }
    None
}

/// The peer took no more of a reply for the stall limit.
struct Stalled;

/// Writes a whole reply `frame`, finishes the stream and waits until the
/// peer has acknowledged all of it (or stopped the stream, or the
/// connection ended). `Err(Stalled)` when at some point the peer took no
/// more of it for `stall`: quinn accepts bytes only as the peer's flow
/// control allows, that is as fast as the peer's application reads. The
/// last window's worth (up to quinn's 1.25 MB) may still be on its way when
/// all of it is accepted; its acknowledgement is the peer's QUIC stack's,
/// whatever its application does, so that wait has no limit of its own (a
/// slow link must not turn a reader into a stalled one).
async fn write_reply(send: &mut SendStream, frame: &[u8], stall: Duration) -> Result<(), Stalled> {
    let mut rest = frame;
    while !rest.is_empty() {
        match tokio::time::timeout(stall, send.write(rest)).await {
            Ok(Ok(n)) => rest = &rest[n..],
            // Stopped, reset or lost: nobody is waiting for it any more.
            Ok(Err(_)) => return Ok(()),
            Err(_elapsed) => return Err(Stalled),
        }
    }
    if send.finish().is_ok() {
        let _ = send.stopped().await;
    }
    Ok(())
}

/// Sleeps for `duration`; forever when `None`.
async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => std::future::pending().await,
    }
}
