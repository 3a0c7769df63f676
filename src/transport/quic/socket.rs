//! The UDP socket under quinn on tokio (server and client): quinn's own
//! tokio socket, less one system call per batch of datagrams received.
//!
//! quinn reads until the socket says it is empty: every batch of datagrams
//! (one `recvmmsg` with room for [`quinn::udp::BATCH_SIZE`]) is followed by
//! one more `recvmmsg` that fails with `EAGAIN`, and only then does the
//! connection see the packet. With one request in flight (a lone client, or
//! a server between group commits) that empty read is one of the four
//! system calls of each side's turn. Here a batch that did not fill the room
//! it had is taken as the end of the queue: the read readiness is cleared
//! as if the empty read had happened, and the next poll waits.
//!
//! No wake-up can be lost by that. tokio clears readiness only if no event
//! came in since the readiness was read (its tick), and the socket is
//! registered edge-triggered, so a datagram that arrives after the short
//! read raises a new event and wakes the reader. (A datagram that arrived
//! before the read and was taken by it also raises one: the reader then wakes
//! once for nothing, as it does with quinn's socket.)
//!
//! A batch also ends short when the kernel has an error to report after the
//! datagrams it returned; a socket of quinn's (not connected, no
//! `IP_RECVERR`) is never given one.
//!
//! The rule holds only where quinn reads a batch with one `recvmmsg`
//! (Linux and Android: `SHORT_BATCH_ENDS_QUEUE`). Elsewhere quinn-udp may
//! read one datagram per call while offering room for more (OpenBSD,
//! NetBSD, illumos), so every read would look short and datagrams would
//! wait for the next one to arrive: there the socket reads until empty, as
//! quinn's does.
//!
//! Must not: change what is sent or received; sends are quinn's, unchanged.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;

/// Whether a batch shorter than its room means the queue is empty: where
/// quinn-udp reads batches with `recvmmsg`.
const SHORT_BATCH_ENDS_QUEUE: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// A bound UDP socket on tokio, for [`quinn::Endpoint::new_with_abstract_socket`].
pub struct UdpSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpSocket").field("io", &self.io).finish()
    }
}

impl UdpSocket {
    /// Takes over a bound socket (made non-blocking here). Needs a tokio
    /// runtime.
    ///
    /// # Errors
    /// When the socket cannot be set up for quinn or handed to tokio.
    pub fn wrap(socket: std::net::UdpSocket) -> io::Result<Arc<UdpSocket>> {
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Arc::new(UdpSocket {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
        }))
    }
}

impl AsyncUdpSocket for UdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            wait: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            self.state.send((&self.io).into(), transmit)
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            let room = bufs.len().min(meta.len());
            let mut short = None;
            let read = self.io.try_io(Interest::READABLE, || {
                let n = self.state.recv((&self.io).into(), bufs, meta)?;
                if SHORT_BATCH_ENDS_QUEUE && n < room {
                    // The queue is empty (it had fewer datagrams than there
                    // was room for): tokio clears the readiness on
                    // `WouldBlock`, and the datagrams go out below.
                    short = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (short, read) {
                (Some(n), _) | (None, Ok(n)) => return Poll::Ready(Ok(n)),
                // Empty (readiness cleared: wait again), or an error the
                // next datagram may not have (an ICMP report): as quinn's
                // socket does, read on.
                (None, Err(_)) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

type WaitWritable = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// One connection's wait for the socket to take more datagrams. Each
/// connection has its own (tokio keeps one waker per direction for
/// `poll_send_ready`, so a shared one would lose wake-ups).
struct Writable {
    socket: Arc<UdpSocket>,
    wait: Option<WaitWritable>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable")
            .field("waiting", &self.wait.is_some())
            .finish()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let wait = this.wait.get_or_insert_with(|| {
            let socket = this.socket.clone();
            Box::pin(async move { socket.io.writable().await })
        });
        let result = ready!(wait.as_mut().poll(cx));
        this.wait = None;
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` receive buffers and their metadata.
    fn room(n: usize) -> (Vec<Vec<u8>>, Vec<RecvMeta>) {
        (vec![vec![0u8; 2048]; n], vec![RecvMeta::default(); n])
    }

    fn recv(
        socket: &UdpSocket,
        cx: &mut Context,
        bufs: &mut [Vec<u8>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        socket.poll_recv(cx, &mut slices, meta)
    }

    /// Waits (at most 30 s: a guard, not a timing) for the next batch;
    /// returns its datagrams.
    async fn next_batch(
        socket: &UdpSocket,
        bufs: &mut [Vec<u8>],
        meta: &mut [RecvMeta],
    ) -> Vec<Vec<u8>> {
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            std::future::poll_fn(|cx| recv(socket, cx, bufs, meta)),
        )
        .await
        .expect("the reader is woken while datagrams wait")
        .unwrap();
        (0..n).map(|i| bufs[i][..meta[i].len].to_vec()).collect()
    }

    #[tokio::test]
    async fn every_datagram_is_read_in_batches_and_a_datagram_after_a_pause_still_wakes_the_reader()
    {
        let socket = UdpSocket::wrap(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let to = socket.local_addr().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Sizes that differ, so that receive offload cannot merge them.
        let sent = [vec![1u8], vec![2, 2], vec![3, 3, 3]];
        for datagram in &sent {
            peer.send_to(datagram, to).unwrap();
        }
        // Room for two: a full batch and a short one (or, if the kernel
        // delivered them late, more batches); each read must end with the
        // reader waiting, never with datagrams left unread.
        let (mut bufs, mut meta) = room(2);
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let batch = next_batch(&socket, &mut bufs, &mut meta).await;
            assert!(!batch.is_empty() && batch.len() <= 2);
            got.extend(batch);
        }
        assert_eq!(got, sent);
        // The queue is empty: the next poll waits (after a short batch,
        // without even reading).
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(recv(&socket, &mut cx, &mut bufs, &mut meta).is_pending());
        // A datagram sent now raises a new event: the reader wakes and gets it.
        peer.send_to(&[4, 4, 4, 4], to).unwrap();
        assert_eq!(
            next_batch(&socket, &mut bufs, &mut meta).await,
            [vec![4u8, 4, 4, 4]]
        );
    }

    #[tokio::test]
    async fn datagrams_go_both_ways() {
        let a = UdpSocket::wrap(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = UdpSocket::wrap(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let mut writable = a.clone().create_io_poller();
        std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx))
            .await
            .unwrap();
        let transmit = Transmit {
            destination: b.local_addr().unwrap(),
            ecn: None,
            contents: b"hello",
            segment_size: None,
            src_ip: None,
        };
        a.try_send(&transmit).unwrap();
        let (mut bufs, mut meta) = room(4);
        let batch = next_batch(&b, &mut bufs, &mut meta).await;
        assert_eq!(batch, [b"hello".to_vec()]);
        assert_eq!(meta[0].addr, a.local_addr().unwrap());
    }
}
