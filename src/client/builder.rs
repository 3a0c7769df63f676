//! [`ClientBuilder`]: the knobs of a [`Client`] and their defaults.
//!
//! Only configuration: building validates the addresses and the TLS
//! material and makes lazily connected channels; nothing is dialled and
//! nothing is retried here.

use std::sync::Arc;
use std::time::Duration;

use super::call::{Entropy, Servers, Timing};
use super::conn::Wire;
use super::retry::BackoffPolicy;
use super::{Client, Error, Inner, Transport};

/// Deadline of one attempt of a call that does not wait.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest single attempt of an acquire that waits server-side.
pub const DEFAULT_WAIT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call that does not wait keeps retrying.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(60);
/// Ceiling of the first retry's delay.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(20);
/// Largest ceiling of a retry's delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Configures a [`Client`]; made by [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    /// The id the client presents; the server keys grants and sessions by it.
    client_id: i32,
    /// Server addresses in failover order.
    endpoints: Vec<String>,
    /// What the servers are spoken to with.
    transport: Transport,
    /// The caller's QUIC endpoint, if it brought one (e.g. one over a
    /// simulated socket); else each server gets one bound on first use.
    quic_endpoint: Option<quinn::Endpoint>,
    /// A ready-made gRPC channel used instead of `endpoints`, if given.
    channel: Option<tonic::transport::Channel>,
    /// Deadlines, budget and backoff.
    timing: Timing,
}

impl ClientBuilder {
    /// Adds a server address: `host:port` (for gRPC also a full `http://`
    /// or `https://` URI). With [`Transport::Quic`] it is the server's QUIC
    /// address (`--listen-quic`).
    #[must_use]
    pub fn endpoint(mut self, addr: impl Into<String>) -> Self {
        self.endpoints.push(addr.into());
        self
    }

    /// Adds several server addresses, tried in this order on failover.
    #[must_use]
    pub fn endpoints<I, S>(mut self, addrs: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.endpoints.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// Speaks `transport` to every server (default: plain-text gRPC).
    /// Retries, request ids and failover work the same over each.
    #[must_use]
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Makes QUIC connections over `endpoint` instead of binding a UDP
    /// socket per server; for an endpoint over a custom
    /// [`quinn::AsyncUdpSocket`] and [`quinn::Runtime`]. Only used with
    /// [`Transport::Quic`].
    #[must_use]
    pub fn quic_endpoint(mut self, endpoint: quinn::Endpoint) -> Self {
        self.quic_endpoint = Some(endpoint);
        self
    }

    /// Deadline of one attempt of a call that does not wait, and of
    /// connecting (default 5 s). It is sent to the server as the call's
    /// deadline as well. Kept within 50 ms ..= 1 day: a zero timeout would
    /// retry without pause, and one past what a gRPC deadline can carry
    /// would fail every call.
    #[must_use]
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.timing.attempt_timeout = attempt_bounds(timeout);
        self
    }

    /// Longest single attempt of an acquire that waits (default 10 s). A
    /// longer wait is made of several attempts that re-attach to the same
    /// place in the queue; a shorter value notices a dead server sooner.
    #[must_use]
    pub fn wait_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.timing.wait_attempt_timeout = attempt_bounds(timeout);
        self
    }

    /// How long a call that does not wait keeps retrying before it fails with
    /// [`Error::Unavailable`] (default 60 s). An acquire with a finite wait
    /// retries for the wait or this, whichever is longer; one that waits
    /// forever retries forever.
    #[must_use]
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.timing.retry_budget = budget;
        self
    }

    /// Backoff between retries: the delay before retry `n` is drawn
    /// uniformly from `0..=min(base · 2^n, max)` (defaults 20 ms and 1 s).
    #[must_use]
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.timing.backoff = BackoffPolicy { base, max };
        self
    }

    /// Speaks gRPC over `channel` instead of dialling endpoints: one server,
    /// reached however the channel connects (a custom connector, a simulated
    /// network). Endpoints and transport settings are then ignored.
    #[must_use]
    pub fn channel(mut self, channel: tonic::transport::Channel) -> Self {
        self.channel = Some(channel);
        self
    }

    /// Draws request ids and backoff jitter from `seed` instead of the
    /// operating system, so that a simulation replays exactly. Request ids
    /// are then only as unique as the seeds: give each client its own.
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.timing.entropy = Entropy::seeded(seed);
        self
    }

    /// Makes the client. Connections are made on first use, so this
    /// succeeds while the servers are still down.
    ///
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] when no address was given or one is malformed,
    /// or the TLS certificates or keys cannot be used.
    pub fn build(self) -> Result<Client, Error> {
        let servers = match self.channel {
            Some(channel) => Servers::from_channel(channel),
            None => {
                let wire = Wire::new(&self.transport, self.quic_endpoint)?;
                Servers::new(&self.endpoints, &wire, self.timing.attempt_timeout)?
            }
        };
        Ok(Client {
            inner: Arc::new(Inner {
                client_id: self.client_id,
                servers,
                timing: self.timing,
                closes: std::sync::atomic::AtomicU64::new(0),
                guards: std::sync::Mutex::default(),
            }),
        })
    }
}

impl ClientBuilder {
    /// A builder for `client_id` with every default.
    pub(crate) fn new(client_id: i32) -> ClientBuilder {
        ClientBuilder {
            client_id,
            endpoints: Vec::new(),
            transport: Transport::default(),
            quic_endpoint: None,
            channel: None,
            timing: Timing {
                attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
                wait_attempt_timeout: DEFAULT_WAIT_ATTEMPT_TIMEOUT,
                retry_budget: DEFAULT_RETRY_BUDGET,
                backoff: BackoffPolicy {
                    base: DEFAULT_BACKOFF_BASE,
                    max: DEFAULT_BACKOFF_MAX,
                },
                entropy: Entropy::default(),
                halve_before: None,
            },
        }
    }
}

/// An attempt's timeout kept within 50 ms ..= 1 day.
fn attempt_bounds(timeout: Duration) -> Duration {
    timeout.clamp(super::call::MIN_ATTEMPT, Duration::from_secs(86_400))
}
