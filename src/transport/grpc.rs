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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status as GrpcStatus};

use super::budget::{RequestBudget, RequestShare};
use super::calls;
use super::tls::ServerTls;
use super::{
    Keepalive, DRAIN_GRACE, MAX_CONNECTIONS, MIN_REQUEST_RATE, REPLY_STALL_LIMIT, REQUEST_TIMEOUT,
};
use crate::proto::lock_service_server::{LockService, LockServiceServer};
use crate::proto::{
    self, ClientInitArgs, FileArgs, FileReadArgs, FileReadResponse, LeaseArgs, LeaseResponse,
    LockArgs, LockResponse, StatusArgs, StatusResponse,
};
use crate::server::{Handle, HeldReply, ShuttingDown};

pub use calls::wire_status;

/// Largest gRPC message sent (a file read's whole file travels in one).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Room in a request for everything but the appended bytes (ids, names).
const REQUEST_OVERHEAD: usize = 64 << 10;

/// The smallest limit on a request: tonic's own default.
const MIN_REQUEST_BYTES: usize = 4 << 20;

/// Most calls (HTTP/2 streams) one connection may have open at once, as
/// over QUIC. tonic's default is no limit at all (it overrides hyper's
/// 200), which let one connection hold any number of half-sent requests,
/// each with its declared length reserved.
pub const MAX_STREAMS_PER_CONNECTION: u32 = super::quic::MAX_STREAMS_PER_CONNECTION;

/// What the gRPC server accepts from its peers.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request message; a larger one is refused with OUT_OF_RANGE
    /// before it is buffered whole.
    pub max_request_bytes: usize,
    /// Most connections at once; more are closed as soon as they are
    /// accepted (each holds a file descriptor, and the log needs some).
    pub max_connections: usize,
    /// How quiet connections are watched. A connection is also closed if it
    /// is not set up `interval + timeout` after it was accepted (its TLS
    /// handshake, or in plain text the 24 bytes of the HTTP/2 preface):
    /// HTTP/2 pings start only once a connection is set up, so without this
    /// a peer that connected and sent nothing would hold a connection slot
    /// for ever. A client that set up its connection may stay idle as long
    /// as it answers the pings, as with the original Go server.
    pub keepalive: Keepalive,
    /// How long a stop waits for open calls ([`DRAIN_GRACE`]).
    pub drain_grace: Duration,
    /// How long a request's body may keep the server waiting for its next
    /// piece ([`REQUEST_TIMEOUT`]); then the call is answered
    /// DEADLINE_EXCEEDED and what arrived of it is dropped.
    pub request_timeout: Duration,
    /// The slowest a request's body may arrive on average, in bytes per
    /// second past its first `request_timeout` ([`MIN_REQUEST_RATE`]; 0: no
    /// bound); then the same.
    pub min_request_rate: u64,
    /// How long a file read's reply may wait for the peer to take any more
    /// of it ([`REPLY_STALL_LIMIT`]); then its connection is closed, which
    /// gives the reply's share of the read-reply budget back.
    pub reply_stall: Duration,
}

impl Limits {
    /// The limits for a server whose largest append is `max_append_bytes`:
    /// its requests may be 4 MiB, or the append and its envelope if that is
    /// more.
    pub fn for_max_append(max_append_bytes: usize) -> Limits {
        Limits {
            max_request_bytes: max_append_bytes
                .saturating_add(REQUEST_OVERHEAD)
                .max(MIN_REQUEST_BYTES),
            max_connections: MAX_CONNECTIONS,
            keepalive: Keepalive::DEFAULT,
            drain_grace: DRAIN_GRACE,
            request_timeout: REQUEST_TIMEOUT,
            min_request_rate: MIN_REQUEST_RATE,
            reply_stall: REPLY_STALL_LIMIT,
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

    /// The tonic service, with the message limits and the request timeout
    /// of `limits`, whose file reads hold their share of the server's
    /// read-reply budget until their bytes have left.
    pub fn into_server(self, limits: &Limits) -> HoldReplies<LockServiceServer<GrpcService>> {
        HoldReplies {
            budget: self.handle.request_budget().clone(),
            inner: LockServiceServer::new(self)
                .max_decoding_message_size(limits.max_request_bytes)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            request_timeout: limits.request_timeout,
            min_request_rate: limits.min_request_rate,
            reply_stall: limits.reply_stall,
        }
    }
}

/// A file read's share of the read-reply budget, and the way to close its
/// connection (none for a connection that [`serve`] did not accept, such
/// as a simulation's), as a response extension from [`GrpcService`] to
/// [`HoldReplies`].
#[derive(Clone)]
struct Held(Arc<HeldReply>, Option<Arc<Cutter>>);

/// The tonic service `S`, with each response's `Held` share (a file read's
/// part of the read-reply budget) moved into its body's data: HTTP/2 keeps
/// a data frame's bytes until they are written to the connection (as its
/// flow control allows), and drops them then, or when the stream or
/// connection ends; the share goes with the last of them. Without it, the
/// share went back as soon as tonic had the encoded reply, while a peer
/// that never read it kept it in memory.
///
/// A read's reply is handed to HTTP/2 in chunks of [`REPLY_CHUNK`] (hyper
/// holds one chunk while it waits for the peer's flow control to have
/// room, and asks for the next after handing that one to h2), and a peer
/// that takes no more of it for `reply_stall` loses its connection: a peer
/// that answers pings but never reads would otherwise hold the share, and
/// every other read waiting for the budget, for as long as its connection
/// lived. (hyper gives no way to reset one stream from outside, and does
/// not ask a body for more while it waits for room.)
///
/// Each request's body may also keep the server waiting at most
/// `request_timeout` for each next piece of it, and arrive no slower than
/// `min_request_rate` on average past that ([`TimedBody`]). tonic sets
/// aside room for a whole message as soon as its 5-byte prefix arrives;
/// without the limits, a peer that sent the prefix and part of the message,
/// and then only answered pings (or sent a byte now and then), held that
/// room (up to the largest request, on each of its streams) for as long as
/// its connection lived.
///
/// Each request's body also counts against the server's request budget as
/// it arrives, until it is dropped (tonic drops it once it has read it to
/// its end and decoded the message); one whose next bytes find no room is
/// answered RESOURCE_EXHAUSTED ([`crate::transport::budget`]).
#[derive(Clone)]
pub struct HoldReplies<S> {
    inner: S,
    budget: Arc<RequestBudget>,
    request_timeout: Duration,
    min_request_rate: u64,
    reply_stall: Duration,
}

impl<S: NamedService> NamedService for HoldReplies<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for HoldReplies<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>,
    S::Future: Unpin,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = HoldReply<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let limit = self.request_timeout;
        let min_rate = self.min_request_rate;
        let share = self.budget.share();
        HoldReply {
            inner: self.inner.call(request.map(|body| {
                tonic::body::Body::new(TimedBody {
                    body,
                    limit,
                    started: tokio::time::Instant::now(),
                    received: 0,
                    min_rate,
                    timer: None,
                    share,
                })
            })),
            stall: self.reply_stall,
        }
    }
}

/// A request body that may keep the server waiting at most `limit` for each
/// next frame, and whose frames must come at `min_rate` bytes per second on
/// average past its first `limit` ([`super::request_deadline`]). A request
/// that arrives with its headers never starts the timer; an upload at the
/// rate or faster never runs out of it. Its bytes count against the request
/// budget (`share`) until the body is dropped.
struct TimedBody {
    body: tonic::body::Body,
    limit: Duration,
    /// When the request began, and how many bytes of it came since.
    started: tokio::time::Instant,
    received: u64,
    /// Bytes per second (0: no bound on the whole body).
    min_rate: u64,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The bytes received so far, counted against the request budget.
    share: RequestShare,
}

impl TimedBody {
    /// When the body has kept the server waiting too long: `limit` after
    /// now, or earlier if it arrives too slowly on the whole.
    fn deadline(&self) -> tokio::time::Instant {
        // A limit past what an instant can hold (a caller's `Duration::MAX`)
        // is as good as none: a year stands in for it.
        let now = tokio::time::Instant::now();
        let next = now
            .checked_add(self.limit)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        super::request_deadline(self.started, self.limit, self.received, self.min_rate)
            .map_or(next, |overall| overall.min(next))
    }
}

impl http_body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = GrpcStatus;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, GrpcStatus>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            if let Some(Ok(Some(data))) = frame.as_ref().map(|f| f.as_ref().map(|f| f.data_ref())) {
                this.received += data.len() as u64;
                if let Err(no_room) = this.share.grow(data.len() as u64) {
                    return Poll::Ready(Some(Err(GrpcStatus::resource_exhausted(
                        no_room.message(),
                    ))));
                }
            }
            if this.timer.is_some() {
                let deadline = this.deadline();
                if let Some(timer) = this.timer.as_mut() {
                    timer.as_mut().reset(deadline);
                }
            }
            return Poll::Ready(frame);
        }
        if this.timer.is_none() {
            this.timer = Some(Box::pin(tokio::time::sleep_until(this.deadline())));
        }
        if let Some(timer) = this.timer.as_mut() {
            std::task::ready!(timer.as_mut().poll(cx));
        }
        Poll::Ready(Some(Err(GrpcStatus::deadline_exceeded(format!(
            "the request stopped arriving (nothing for {} s) or arrives too slowly",
            this.limit.as_secs_f64()
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// [`HoldReplies`]' answer: the inner service's, with a read's share moved
/// into its body. (A future of its own rather than a boxed `async` block:
/// every gRPC call goes through it.)
pub struct HoldReply<F> {
    inner: F,
    stall: Duration,
}

impl<F, E> Future for HoldReply<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let mut response = std::task::ready!(Pin::new(&mut this.inner).poll(cx))?;
        Poll::Ready(Ok(match response.extensions_mut().remove::<Held>() {
            None => response,
            Some(Held(held, cutter)) => {
                let progress = Arc::new(AtomicU64::new(0));
                let done = cutter.map(|cutter| {
                    let (done, watched) = tokio::sync::oneshot::channel();
                    tokio::spawn(watch_reply(progress.clone(), watched, cutter, this.stall));
                    done
                });
                let share = Arc::new(Share {
                    _held: held,
                    _done: done,
                });
                response.map(|body| {
                    tonic::body::Body::new(HoldingBody {
                        body,
                        rest: bytes::Bytes::new(),
                        share,
                        progress,
                    })
                })
            }
        }))
    }
}

/// The most of a read's reply handed to HTTP/2 at once: one frame of h2's
/// default size, so that progress shows even when many replies share a
/// slow connection.
const REPLY_CHUNK: usize = 16 << 10;

/// A read's share of the budget while its reply is in hyper's and h2's
/// hands; when the last chunk holding it is dropped, the share goes back
/// and `_done` tells the reply's watchdog to end.
struct Share {
    _held: Arc<HeldReply>,
    _done: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Closes a read's connection if its reply makes no progress (no chunk
/// taken by hyper, none written out by h2) for `stall` (noticed within a
/// quarter of it); ends as soon as the reply's share is given back.
async fn watch_reply(
    progress: Arc<AtomicU64>,
    mut done: tokio::sync::oneshot::Receiver<()>,
    cutter: Arc<Cutter>,
    stall: Duration,
) {
    let check = (stall / 4).max(Duration::from_millis(1));
    let mut seen = progress.load(Ordering::Relaxed);
    let mut since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = &mut done => return,
            () = tokio::time::sleep(check) => {}
        }
        let now = progress.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, tokio::time::Instant::now());
        } else if since.elapsed() >= stall {
            tracing::debug!("a read's reply was not taken in time; closing its connection");
            cutter.cut();
            return;
        }
    }
}

/// A read's response body: its data in chunks of at most [`REPLY_CHUNK`],
/// each holding the read's share of the budget, each taken and each
/// written out counted as progress.
struct HoldingBody {
    body: tonic::body::Body,
    /// What is left of the last data frame.
    rest: bytes::Bytes,
    share: Arc<Share>,
    progress: Arc<AtomicU64>,
}

impl HoldingBody {
    /// The next chunk of `rest`, holding the share.
    fn chunk(&mut self) -> bytes::Bytes {
        let n = self.rest.len().min(REPLY_CHUNK);
        self.progress.fetch_add(1, Ordering::Relaxed);
        bytes::Bytes::from_owner(HoldingBytes {
            bytes: self.rest.split_to(n),
            _share: self.share.clone(),
            progress: self.progress.clone(),
        })
    }
}

/// A data frame's bytes with the share they hold; dropped once h2 wrote
/// them out (or the stream ended).
struct HoldingBytes {
    bytes: bytes::Bytes,
    _share: Arc<Share>,
    progress: Arc<AtomicU64>,
}

impl AsRef<[u8]> for HoldingBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for HoldingBytes {
    fn drop(&mut self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }
}

impl http_body::Body for HoldingBody {
    type Data = bytes::Bytes;
    type Error = GrpcStatus;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, GrpcStatus>>> {
        let this = &mut *self;
        loop {
            if !this.rest.is_empty() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(this.chunk()))));
            }
            match std::task::ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.body.size_hint();
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower().saturating_add(rest));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// Closes one accepted connection from outside hyper: its next read fails,
/// and hyper drops the connection with its streams and their bodies.
#[derive(Debug, Default)]
pub struct Cutter {
    cut: AtomicBool,
    reader: AtomicWaker,
}

impl Cutter {
    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.reader.wake();
    }
}

/// What tonic puts in each request's extensions about its connection: the
/// TCP addresses, and the way to close it.
#[derive(Clone, Debug)]
pub struct ConnectInfo {
    /// The connection's addresses (tonic's `Request::remote_addr` looks
    /// for a bare `TcpConnectInfo`, so it says `None` here).
    pub tcp: TcpConnectInfo,
    cutter: Arc<Cutter>,
}

/// A server stopping is the one failure a gRPC caller sees as a gRPC error.
fn unavailable(_: ShuttingDown) -> GrpcStatus {
    GrpcStatus::unavailable("the server is shutting down")
}

/// Serves gRPC on `listener` until `shutdown` resolves; over TLS when `tls`
/// is given (and with client certificates required when it has a client CA).
///
/// Connections are accepted here rather than by tonic: each takes one of
/// `limits.max_connections` slots (more are closed at once), and must be
/// set up within `interval + timeout` of its keepalive (its TLS handshake,
/// then the 24 bytes of the HTTP/2 preface), or it is closed: HTTP/2 pings
/// start only once a connection is set up, so without this a peer that
/// connected and sent nothing would hold its slot for ever. A connection
/// that is set up may then stay idle as long as it answers the pings.
///
/// # Errors
/// Transport failures, or TLS material rustls refuses.
pub async fn serve(
    listener: TcpListener,
    handle: Handle,
    tls: Option<&ServerTls>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let acceptor = match tls {
        Some(tls) => Some(TlsAcceptor::from(Arc::new(tls.grpc_rustls_config()?))),
        None => None,
    };
    let (tx, rx) = mpsc::channel(64);
    let accepting = AbortOnDrop(tokio::task::spawn(accept(listener, acceptor, limits, tx)));
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    let serving = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive.interval))
        .http2_keepalive_timeout(Some(limits.keepalive.timeout))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(GrpcService::new(handle).into_server(&limits))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown);
    // The drain after a stop is bounded; past it the server future is
    // dropped (its connections' tasks end with the runtime).
    let grace = async move {
        if stopping_rx.await.is_ok() {
            tokio::time::sleep(limits.drain_grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let served = tokio::select! {
        biased;
        served = serving => served,
        () = grace => {
            tracing::warn!("gRPC connections still open after the drain grace; dropping them");
            Ok(())
        }
    };
    drop(accepting);
    Ok(served?)
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The accept loop: slots, TCP_NODELAY, TLS handshakes (each in a task of
/// its own, ended with the loop), and the set-up deadline; set-up
/// connections go to tonic through `to`.
async fn accept(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    limits: Limits,
    to: mpsc::Sender<io::Result<Slotted>>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let set_up_within = limits.keepalive.idle_limit();
    let mut handshakes = tokio::task::JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        // `biased`: a fixed order.
        let accepted = tokio::select! {
            biased;
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: let some close rather
                // than spin.
                tracing::debug!(%error, "accepting a gRPC connection failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // One line for the first refusal and then one per thousand: a
            // flood at the cap must not turn into a flood of log lines.
            refused += 1;
            if refused == 1 || refused.is_multiple_of(1000) {
                tracing::warn!(
                    peer = ?stream.peer_addr().ok(),
                    refused,
                    "too many gRPC connections (--max-connections); closing new ones"
                );
            }
            continue;
        };
        // With Nagle on, a reply written right after an HTTP/2 window
        // update waits ~40 ms for a delayed ACK.
        let _ = stream.set_nodelay(true);
        let mut deadline = Box::pin(tokio::time::sleep(set_up_within));
        match &acceptor {
            None => {
                let conn = Slotted::new(Conn::Plain(stream), slot, deadline);
                if to.send(Ok(conn)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                let to = to.clone();
                handshakes.spawn(async move {
                    let tls = tokio::select! {
                        biased;
                        tls = handshake => tls,
                        () = &mut deadline => return,
                    };
                    match tls {
                        Ok(tls) => {
                            let conn = Slotted::new(Conn::Tls(Box::new(tls)), slot, deadline);
                            let _ = to.send(Ok(conn)).await;
                        }
                        Err(error) => tracing::debug!(%error, "TLS handshake failed"),
                    }
                });
            }
        }
    }
}

/// The length of the HTTP/2 client preface (`PRI * HTTP/2.0…`).
const PREFACE_BYTES: usize = 24;

/// An accepted connection, plain or TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection holding one of the server's connection slots
/// until tonic drops it, and closed if its first [`PREFACE_BYTES`] bytes
/// (after TLS: decrypted) have not come by its set-up deadline.
struct Slotted {
    conn: Conn,
    _slot: OwnedSemaphorePermit,
    /// When the connection must be set up by; `None` once it is.
    set_up: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes still to read before the connection counts as set up.
    unread_preface: usize,
    /// Closes the connection when a read's reply stalls.
    cutter: Arc<Cutter>,
}

impl Slotted {
    fn new(
        conn: Conn,
        slot: OwnedSemaphorePermit,
        deadline: Pin<Box<tokio::time::Sleep>>,
    ) -> Slotted {
        Slotted {
            conn,
            _slot: slot,
            set_up: Some(deadline),
            unread_preface: PREFACE_BYTES,
            cutter: Arc::default(),
        }
    }
}

impl Connected for Slotted {
    type ConnectInfo = ConnectInfo;

    fn connect_info(&self) -> ConnectInfo {
        let tcp = match &self.conn {
            Conn::Plain(stream) => stream.connect_info(),
            Conn::Tls(tls) => tls.get_ref().0.connect_info(),
        };
        ConnectInfo {
            tcp,
            cutter: self.cutter.clone(),
        }
    }
}

impl AsyncRead for Slotted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // hyper always has a read pending (the connection's one task
        // reads and writes): the cut wakes it here.
        this.cutter.reader.register(cx.waker());
        if let Some(cut) = this.cut() {
            return Poll::Ready(Err(cut));
        }
        let before = buf.filled().len();
        let read = match &mut this.conn {
            Conn::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        };
        let Some(deadline) = this.set_up.as_mut() else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                let got = buf.filled().len() - before;
                this.unread_preface = this.unread_preface.saturating_sub(got);
                if this.unread_preface == 0 {
                    this.set_up = None;
                }
                Poll::Ready(Ok(()))
            }
            // Only when nothing is waiting: bytes already here are read
            // first. hyper always has a read pending while it waits for the
            // preface, so the sleep's wake-up lands here.
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => Poll::Ready(Err(
                io::Error::new(io::ErrorKind::TimedOut, "connection not set up in time"),
            )),
            other => other,
        }
    }
}

impl Slotted {
    /// The error a cut connection's reads and writes end in.
    fn cut(&self) -> Option<io::Error> {
        self.cutter.cut.load(Ordering::Acquire).then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "a read's reply was not taken in time",
            )
        })
    }
}

/// Writes fail once the connection is cut too: h2 reads only after its
/// pending writes are flushed, so a peer that also stopped reading the
/// socket would otherwise keep the cut from being seen.
impl AsyncWrite for Slotted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(cut) = self.cut() {
            return Poll::Ready(Err(cut));
        }
        match &mut self.conn {
            Conn::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(cut) = self.cut() {
            return Poll::Ready(Err(cut));
        }
        match &mut self.conn {
            Conn::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.conn {
            Conn::Plain(stream) => stream.is_write_vectored(),
            Conn::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(cut) = self.cut() {
            return Poll::Ready(Err(cut));
        }
        match &mut self.conn {
            Conn::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.conn {
            Conn::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Conn::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
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
        let cutter = req
            .extensions()
            .get::<ConnectInfo>()
            .map(|info| info.cutter.clone());
        let (response, held) = calls::file_read(&self.handle, req.into_inner())
            .await
            .map_err(unavailable)?;
        let mut response = GrpcResponse::new(response);
        if let Some(held) = held {
            // Taken off by [`HoldReplies`], which ties it to the body.
            response
                .extensions_mut()
                .insert(Held(Arc::new(held), cutter));
        }
        Ok(response)
    }

    async fn lock_status(
        &self,
        _req: GrpcRequest<StatusArgs>,
    ) -> Result<GrpcResponse<StatusResponse>, GrpcStatus> {
        let out = calls::lock_status(&self.handle).await;
        out.map(GrpcResponse::new).map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::net::{TcpListener, TcpStream};

    use super::{serve, Limits, MAX_STREAMS_PER_CONNECTION, MIN_REQUEST_RATE};
    use crate::server::{Node, ServerConfig};

    /// A server on a fresh directory, serving gRPC on 127.0.0.1:0 until
    /// the sender is used or dropped.
    async fn start(
        limits: Limits,
    ) -> (
        Node,
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
        tempfile::TempDir,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(tmp.path().to_path_buf());
        config.log_prealloc = 0;
        let (node, _) = Node::start_fs(&config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let handle = node.handle();
        let serving = tokio::spawn(async move {
            serve(listener, handle, None, limits, async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
        (node, addr, stop_tx, serving, tmp)
    }

    /// A gRPC request's headers for `method`.
    fn request(addr: std::net::SocketAddr, method: &str) -> http::Request<()> {
        http::Request::post(format!("http://{addr}/lock.LockService/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    }

    /// The server tells each connection it may open at most as many calls
    /// at once as over QUIC (tonic's default is no bound).
    #[tokio::test]
    async fn a_connection_may_have_a_bounded_number_of_calls_open() {
        let (node, addr, stop, serving, _tmp) = start(Limits::for_max_append(1 << 20)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, mut connection) = h2::client::handshake(tcp).await.unwrap();
        // One whole call, answered while the connection is driven: the
        // server's settings come before its answer.
        let (answer, mut body) = client
            .send_request(request(addr, "LockStatus"), false)
            .unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        let answered = async {
            let answer = answer.await.unwrap();
            assert_eq!(answer.status(), 200);
        };
        tokio::select! {
            () = answered => {}
            ended = &mut connection => panic!("the connection ended first: {ended:?}"),
        }
        assert_eq!(
            connection.max_concurrent_send_streams(),
            MAX_STREAMS_PER_CONNECTION as usize
        );
        drop(client);
        drop(connection);
        let _ = stop.send(());
        serving.await.unwrap();
        node.shutdown().await.unwrap();
    }

    /// A server whose request timeout is `request_timeout` and minimum
    /// request rate `min_rate`, and one raw h2 call to `method` on it whose
    /// request body is still open.
    struct OpenCall {
        node: Node,
        stop: tokio::sync::oneshot::Sender<()>,
        serving: tokio::task::JoinHandle<()>,
        _tmp: tempfile::TempDir,
        client: h2::client::SendRequest<Bytes>,
        driving: tokio::task::JoinHandle<Result<(), h2::Error>>,
    }

    impl OpenCall {
        async fn start(
            request_timeout: Duration,
            min_rate: u64,
            method: &str,
        ) -> (OpenCall, h2::client::ResponseFuture, h2::SendStream<Bytes>) {
            let limits = Limits {
                request_timeout,
                min_request_rate: min_rate,
                ..Limits::for_max_append(1 << 20)
            };
            let (node, addr, stop, serving, _tmp) = start(limits).await;
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
            let driving = tokio::spawn(connection);
            let (answer, body) = client.send_request(request(addr, method), false).unwrap();
            let open = OpenCall {
                node,
                stop,
                serving,
                _tmp,
                client,
                driving,
            };
            (open, answer, body)
        }

        async fn stop(self) {
            let _ = self.stop.send(());
            self.serving.await.unwrap();
            self.node.shutdown().await.unwrap();
            drop(self.client);
            self.driving.abort();
        }
    }

    /// The `grpc-status` of an answer (in its headers, or in its trailers
    /// after its body). Bounded: a hang becomes a failure.
    async fn grpc_status(answer: h2::client::ResponseFuture) -> String {
        let answer = tokio::time::timeout(Duration::from_secs(60), answer)
            .await
            .expect("the call is answered")
            .unwrap();
        if let Some(status) = answer.headers().get("grpc-status") {
            return status.to_str().unwrap().to_owned();
        }
        let mut rest = answer.into_body();
        while let Some(data) = rest.data().await {
            let _ = data.unwrap();
        }
        let trailers = rest.trailers().await.unwrap().expect("trailers");
        trailers
            .get("grpc-status")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }

    /// A peer that stopped halfway through a request (and answers pings)
    /// holds the room set aside for it only until the request timeout: the
    /// call is then answered DEADLINE_EXCEEDED.
    #[tokio::test]
    async fn a_half_sent_request_is_refused_after_the_request_timeout() {
        let (open, answer, mut body) =
            OpenCall::start(Duration::from_millis(200), MIN_REQUEST_RATE, "FileAppend").await;
        // A message of 100 bytes, of which two are sent, and then nothing:
        // the connection stays up (h2 answers the server's pings).
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2]), false)
            .unwrap();
        // DEADLINE_EXCEEDED.
        assert_eq!(grpc_status(answer).await, "4");
        open.stop().await;
    }

    /// A `ClientInit` request as a gRPC message (prefix and body), ~30
    /// bytes.
    fn client_init_message() -> Vec<u8> {
        use prost::Message as _;
        let message = crate::proto::ClientInitArgs {
            client_id: 7,
            request_id: "r".repeat(20),
        }
        .encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        framed
    }

    /// The request timeout is on a pause, not on the whole request: a body
    /// that keeps coming, slowly, past it is served.
    #[tokio::test]
    async fn a_slow_request_that_keeps_coming_is_served() {
        let (open, answer, mut body) =
            // 5 bytes a second (below), faster than the minimum.
            OpenCall::start(Duration::from_millis(1000), 4, "ClientInit").await;
        let framed = client_init_message();
        // A piece every 200 ms (the pace of a slow link, not a wait for the
        // server): ~5 s in all, past the 1 s limit, never 1 s without data.
        let pieces: Vec<&[u8]> = framed.chunks(1).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let last = i + 1 == pieces.len();
            body.send_data(Bytes::copy_from_slice(piece), last).unwrap();
            if !last {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        assert_eq!(grpc_status(answer).await, "0");
        open.stop().await;
    }

    /// A body that never pauses for the request timeout but trickles in
    /// below the minimum rate is refused DEADLINE_EXCEEDED before it ends:
    /// otherwise a byte now and then would hold its room for ever.
    #[tokio::test]
    async fn a_request_that_trickles_in_below_the_minimum_rate_is_refused() {
        // At most 1 s + 1 s per 4 bytes; the body below comes at 2 bytes a
        // second, so it is refused after about 2 s, long before its end.
        let (open, answer, mut body) =
            OpenCall::start(Duration::from_millis(1000), 4, "ClientInit").await;
        let framed = client_init_message();
        let sending = tokio::spawn(async move {
            // The pace of the trickle (not a wait for the server).
            for (i, piece) in framed.chunks(1).enumerate() {
                let last = i + 1 == framed.len();
                if body.send_data(Bytes::copy_from_slice(piece), last).is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        assert_eq!(grpc_status(answer).await, "4");
        sending.abort();
        open.stop().await;
    }

    /// A peer that stopped halfway through a request (and answers pings)
    /// does not keep a stopping server from stopping.
    #[tokio::test]
    async fn a_half_sent_request_does_not_hold_up_a_stop() {
        let limits = Limits {
            drain_grace: Duration::from_millis(100),
            ..Limits::for_max_append(1 << 20)
        };
        let (node, addr, stop, serving, _tmp) = start(limits).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut client, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let mut ping_pong = connection.ping_pong().expect("a ping handle");
        let driving = tokio::spawn(connection);
        let (_answer, mut body) = client
            .send_request(request(addr, "FileAppend"), false)
            .unwrap();
        // A message of 100 bytes, of which two are sent.
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2]), false)
            .unwrap();
        // The server answers a ping after the frames sent before it: the
        // half-sent call is open on its side when the stop comes.
        ping_pong.ping(h2::Ping::opaque()).await.unwrap();
        let _ = stop.send(());
        // Not a timing assertion: the bound turns a hang into a failure.
        tokio::time::timeout(Duration::from_secs(60), serving)
            .await
            .expect("serving ends after the grace")
            .unwrap();
        node.shutdown().await.unwrap();
        drop(client);
        driving.abort();
    }
}
