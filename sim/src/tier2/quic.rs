//! Tier 2 over QUIC: the same hosts and faults, with dlm's QUIC transport
//! (`dlm::transport::quic`) in place of gRPC, on turmoil's UDP through
//! [`crate::quic_turmoil`].
//!
//! - the server serves [`dlm::transport::quic::server::serve`] on UDP
//!   `PORT` until its node fails, on an endpoint whose secret (stateless
//!   resets, connection-id key) outlives its restarts, as `dlm server`'s does;
//! - clients are [`dlm::client::Client`]s with `Transport::Quic` over an
//!   endpoint of their own (one per incarnation);
//! - the relay is a QUIC proxy: it reads each call's request frame, forwards
//!   it over its own connection to the server, maybe a second time (QUIC
//!   itself never delivers a stream twice), and writes the first answer back.
//!
//! turmoil's `fail_rate`, holds and partitions now drop or delay datagrams,
//! which QUIC retransmits; a connection to a server that restarted is reset
//! by the new server (a stateless reset), and the client connects again.
//! Every datagram is logged in the run's [`PacketLog`], whose summary ends
//! the trace, so the schedule hash covers the packet schedule too.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dlm::client::{Client, ClientBuilder, Error, Transport};
use dlm::proto::call_request::Call;
use dlm::proto::{CallRequest, CallResponse};
use dlm::server::Handle;
use dlm::transport::quic::client::{CallError, QuicConnector};
use dlm::transport::quic::server::Limits;
use dlm::transport::quic::{self, frame, ErrorCode};
use quinn::{Endpoint, RecvStream, SendStream, VarInt};

use super::{ms, Shared, PORT, SERVER_HOST};
use crate::quic_turmoil::{PacketLog, SimQuic, Tap};

/// The QUIC side of a run: its certificates and secret, and the log of
/// every datagram.
pub(crate) struct QuicWorld {
    pub material: SimQuic,
    pub packets: Arc<PacketLog>,
}

impl QuicWorld {
    /// The QUIC material of the run of `seed`.
    pub fn new(seed: u64) -> QuicWorld {
        QuicWorld {
            material: SimQuic::new(seed, SERVER_HOST),
            packets: Arc::default(),
        }
    }
}

/// The run's QUIC material; only called in a QUIC run.
fn material(shared: &Shared) -> SimQuic {
    shared.with(|s| {
        s.quic
            .as_ref()
            .expect("a QUIC run has its QUIC material")
            .material
            .clone()
    })
}

/// The tap of `host`'s sockets: silent while the host goes down, its
/// datagrams logged.
fn tap(host: &str, shared: &Arc<Shared>) -> Tap {
    let host: Arc<str> = host.into();
    let log = shared.with(|s| s.quic.as_ref().map(|q| q.packets.clone()));
    let (name, shared) = (host.clone(), shared.clone());
    Tap {
        host,
        silent: Some(Arc::new(move || {
            shared.with(|s| s.crashing.contains(&*name))
        })),
        log,
    }
}

/// `host:PORT` with `host`'s simulated address (dlm's client takes an
/// address, and a simulated host has no DNS).
fn address_of(host: &str) -> String {
    format!("{}:{PORT}", turmoil::lookup(host))
}

/// Serves `handle` over QUIC on UDP `PORT` of the server host until
/// `failed` resolves. `boot` seeds this boot's endpoint.
///
/// # Errors
/// When the port cannot be bound.
pub(crate) async fn serve(
    shared: &Arc<Shared>,
    handle: Handle,
    failed: impl Future<Output = ()>,
    boot: u64,
    max_append_bytes: usize,
) -> std::io::Result<()> {
    let endpoint = material(shared)
        .server_endpoint(PORT, boot, tap(SERVER_HOST, shared))
        .await?;
    let limits = Limits::for_max_append(max_append_bytes);
    quic::server::serve(endpoint, handle, limits, failed).await;
    Ok(())
}

/// Counts the connections a client endpoint opens after its first.
pub(crate) struct Handshakes {
    endpoint: Endpoint,
    seen: AtomicU64,
}

impl Handshakes {
    /// Connections opened since the last call, beyond the first one.
    pub fn reconnects(&self) -> u64 {
        let now = self.endpoint.stats().outgoing_handshakes;
        let before = self.seen.swap(now, Ordering::Relaxed);
        now.saturating_sub(before.max(1))
    }
}

/// `builder` (a client with its timing and seed) made to speak QUIC from
/// `host` to `target` over a new endpoint seeded by `seed`.
///
/// # Errors
/// When no UDP port can be bound, or the builder refuses.
pub(crate) async fn client(
    builder: ClientBuilder,
    host: &str,
    target: &str,
    seed: u64,
    shared: &Arc<Shared>,
) -> Result<(Client, Handshakes), Error> {
    let endpoint = SimQuic::client_endpoint(seed, tap(host, shared))
        .await
        .map_err(|e| Error::Unavailable(format!("binding a UDP port: {e}")))?;
    let client = builder
        .endpoint(address_of(target))
        .transport(Transport::Quic(material(shared).client_tls()))
        .quic_endpoint(endpoint.clone())
        .build()?;
    let handshakes = Handshakes {
        endpoint,
        seen: AtomicU64::new(0),
    };
    Ok((client, handshakes))
}

/// The name of a call, for the trace.
fn method(request: &CallRequest) -> &'static str {
    match &request.call {
        Some(Call::ClientInit(_)) => "init",
        Some(Call::LockAcquire(_)) => "acquire",
        Some(Call::LockRelease(_)) => "release",
        Some(Call::FileAppend(_)) => "append",
        Some(Call::RenewLease(_)) => "renew",
        Some(Call::ClientClose(_)) => "close",
        Some(Call::FileRead(_)) => "read",
        Some(Call::LockStatus(_)) => "status",
        None => "empty",
    }
}

/// The relay host over QUIC: accepts connections on UDP `PORT` (with the
/// server's certificate: clients take it for the server) and relays each
/// call to the server, some twice, until the host goes down.
pub(crate) async fn relay(shared: Arc<Shared>) -> turmoil::Result {
    let material = material(&shared);
    let seed = shared.with(|s| s.relay_rng.next_u64());
    let inbound = material
        .server_endpoint(PORT, seed, tap("relay", &shared))
        .await?;
    let outbound = SimQuic::client_endpoint(seed ^ 1, tap("relay", &shared)).await?;
    let ca = material.certs().ca_pem.clone().into_bytes();
    let upstream = QuicConnector::new(
        &address_of(SERVER_HOST),
        Some(SERVER_HOST),
        quic::client_config(&ca, None)?,
        Some(outbound),
    )?;
    let upstream = Arc::new(upstream);
    while let Some(incoming) = inbound.accept().await {
        let (upstream, shared) = (upstream.clone(), shared.clone());
        // The task ban of clippy.toml is for dlm's core; this is a host.
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                let (upstream, shared) = (upstream.clone(), shared.clone());
                #[allow(clippy::disallowed_methods)]
                tokio::spawn(relay_call(send, recv, upstream, shared));
            }
        });
    }
    shared.with(|s| s.problems.push("the QUIC relay stopped accepting".into()));
    std::future::pending::<()>().await;
    Ok(())
}

/// Whether to send a call twice, and after how long.
fn duplicate(shared: &Shared, method: &'static str) -> Option<u64> {
    shared.with(|s| {
        if s.healed || !s.relay_rng.chance(s.scenario.duplicate) {
            return None;
        }
        s.faults.duplicates += 1;
        let delay = s.relay_rng.between(0, s.scenario.duplicate_delay_max);
        s.log(|| format!("relay duplicates a {method} after {delay} ms"));
        Some(delay)
    })
}

/// One call through the relay: the request frame in, forwarded (maybe
/// twice) with the client's deadline, the first answer (or the server's
/// reset code) back.
async fn relay_call(
    mut send: SendStream,
    mut recv: RecvStream,
    upstream: Arc<QuicConnector>,
    shared: Arc<Shared>,
) {
    let request = match frame::read_frame::<CallRequest>(&mut recv, usize::MAX).await {
        Ok(request) => request,
        Err(error) => {
            if let Some(code) = error.code() {
                let _ = send.reset(code.varint());
            }
            return;
        }
    };
    drop(recv);
    // The relay gives up when the client would: its deadline travels with
    // the request, as gRPC's does in its header.
    let deadline = (request.timeout_ms > 0).then(|| ms(request.timeout_ms));
    let answered = Arc::new(AtomicBool::new(false));
    if let Some(delay) = duplicate(&shared, method(&request)) {
        let (second, upstream, shared, answered) = (
            request.clone(),
            upstream.clone(),
            shared.clone(),
            answered.clone(),
        );
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            tokio::time::sleep(ms(delay)).await;
            if answered.load(Ordering::Relaxed) {
                shared.with(|s| s.faults.reorders += 1);
            }
            let _ = within(deadline, upstream.call(&second)).await;
        });
    }
    let stopped = send.stopped();
    let answer = tokio::select! {
        biased;
        answer = within(deadline, upstream.call(&request)) => answer,
        // The client gave up: dropping the upstream call tells the server.
        _ = stopped => return,
    };
    answered.store(true, Ordering::Relaxed);
    match answer {
        Some(Ok(response)) => write_answer(&mut send, &response).await,
        Some(Err(CallError::Reset { code, .. })) => {
            let _ = send.reset(VarInt::from_u64(code).unwrap_or(ErrorCode::Unavailable.varint()));
        }
        Some(Err(_)) => {
            let _ = send.reset(ErrorCode::Unavailable.varint());
        }
        None => {
            let _ = send.reset(ErrorCode::DeadlineExceeded.varint());
        }
    }
}

/// `call`, cut off after `deadline` (`None` when it passed).
async fn within<T>(deadline: Option<Duration>, call: impl Future<Output = T>) -> Option<T> {
    match deadline {
        Some(deadline) => tokio::time::timeout(deadline, call).await.ok(),
        None => Some(call.await),
    }
}

async fn write_answer(send: &mut SendStream, response: &CallResponse) {
    if send.write_all(&frame::encode(response)).await.is_ok() {
        let _ = send.finish();
    }
}
