//! tonic over turmoil's TCP: the server side takes a stream of accepted
//! turmoil streams; the client side a channel whose connector dials them.
//!
//! turmoil's TCP never retransmits: a segment lost to a partition or a link
//! failure hangs the connection for good. Clients therefore get HTTP/2
//! keep-alive pings on their channels: a connection that stops answering is
//! closed after a few hundred milliseconds and the channel reconnects, the
//! way a real TCP stack would eventually give up on a dead peer.
//!
//! Every stream is a [`SimStream`], which goes silent when its host is
//! going down — from the instant a power cut strikes, and while the runtime
//! of a crashed or restarted host is dropped. Farewell segments would break
//! replay: tokio drops a dying runtime's tasks in an order that depends on
//! process-wide task ids, a failing server's graceful shutdown wakes its
//! connections in an order drawn from tokio's unseeded RNG, and every
//! segment turmoil carries draws its latency from the simulation's RNG. A
//! host that goes silent is also what a power loss looks like; peers notice
//! through their deadlines and keep-alive.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};
use turmoil::net::{TcpListener, TcpStream};

use super::{ms, Shared, PORT};

/// A turmoil TCP stream that goes silent when its host goes down: writes
/// vanish, reads never complete, and dropping it sends nothing (the stream
/// is leaked, not closed).
pub(crate) struct SimStream {
    /// Always `Some` until dropped.
    inner: Option<TcpStream>,
    /// The host it lives on.
    host: Arc<str>,
    shared: Arc<Shared>,
}

impl SimStream {
    fn new(inner: TcpStream, host: Arc<str>, shared: Arc<Shared>) -> SimStream {
        SimStream {
            inner: Some(inner),
            host,
            shared,
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.inner.as_mut().expect("a live stream"))
    }

    /// Whether the host is going down.
    fn silent(&self) -> bool {
        self.shared.with(|s| s.crashing.contains(&*self.host))
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        if self.silent() {
            std::mem::forget(self.inner.take());
        }
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.silent() {
            // The host is crashed before anything could wake this.
            return Poll::Pending;
        }
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.silent() {
            return Poll::Ready(Ok(buf.len()));
        }
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.silent() {
            return Poll::Ready(Ok(()));
        }
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.silent() {
            return Poll::Ready(Ok(()));
        }
        self.stream().poll_shutdown(cx)
    }
}

/// A stream accepted by a turmoil listener, as tonic's server wants it.
pub(crate) struct Accepted(SimStream);

impl Connected for Accepted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        let stream = self.0.inner.as_ref();
        TcpConnectInfo {
            local_addr: stream.and_then(|s| s.local_addr().ok()),
            remote_addr: stream.and_then(|s| s.peer_addr().ok()),
        }
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

type AcceptFuture = Pin<Box<dyn Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send>>;

/// The connections accepted on `PORT`, one after another.
pub(crate) struct Incoming {
    listener: Arc<TcpListener>,
    accept: Option<AcceptFuture>,
    host: Arc<str>,
    shared: Arc<Shared>,
}

impl Incoming {
    /// Listens on `PORT` of the current host, `host`.
    ///
    /// # Errors
    /// The port is taken.
    pub async fn bind(host: &str, shared: Arc<Shared>) -> io::Result<Incoming> {
        let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
        Ok(Incoming {
            listener: Arc::new(listener),
            accept: None,
            host: host.into(),
            shared,
        })
    }
}

impl Stream for Incoming {
    type Item = io::Result<Accepted>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let listener = self.listener.clone();
        let accept = self
            .accept
            .get_or_insert_with(|| Box::pin(async move { listener.accept().await }));
        match accept.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.accept = None;
                let (host, shared) = (self.host.clone(), self.shared.clone());
                Poll::Ready(Some(
                    result.map(|(stream, _)| Accepted(SimStream::new(stream, host, shared))),
                ))
            }
        }
    }
}

/// A lazily connected gRPC channel from host `from` to `to`'s `PORT` over
/// turmoil TCP, with keep-alive pings that close a hung connection;
/// `on_connect` is told of every connection attempt.
pub(crate) fn channel(
    from: &str,
    to: &str,
    shared: Arc<Shared>,
    on_connect: impl Fn() + Send + Sync + 'static,
) -> Channel {
    let from: Arc<str> = from.into();
    let connector = tower::service_fn(move |uri: Uri| {
        on_connect();
        let (from, shared) = (from.clone(), shared.clone());
        async move {
            let authority = uri
                .authority()
                .map(|a| a.as_str().to_owned())
                .ok_or_else(|| io::Error::other("no authority in the URI"))?;
            let stream = TcpStream::connect(authority).await?;
            Ok::<_, io::Error>(TokioIo::new(SimStream::new(stream, from, shared)))
        }
    });
    Endpoint::from_shared(format!("http://{to}:{PORT}"))
        .expect("a valid URI")
        .connect_timeout(ms(300))
        .http2_keep_alive_interval(ms(150))
        .keep_alive_timeout(ms(150))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connector)
}
