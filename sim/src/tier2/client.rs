//! The client hosts: the real client library running a workload, and the
//! checker.
//!
//! A workload client is a [`dlm::client::Client`] over a simulated channel
//! (to the server, or through the relay), or over QUIC on an endpoint of its
//! own (see `quic`), seeded so that its request ids and backoff jitter
//! replay. It loops like tier 1's clients: acquire the default
//! lock (or `x`, sometimes through a renewing [`dlm::client::LockGuard`]),
//! append unique markers, renew at a third of the lease, release (or close
//! the session); sometimes it stalls past its lease while holding. Every
//! operation is recorded in the history before it is invoked, so that one a
//! crash cuts short stays unknown. A crash drops the whole host; a restart
//! is a new incarnation with the same client id.
//!
//! The checker audits the server's status during the run (a holder with no
//! lease left is a bug), checks that nothing is held once every client has
//! stopped and the leases had time to run out, and reads the files.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dlm::client::{AcquireOptions, Client, ClientBuilder, Error, Grant};

use super::net;
use super::quic::{self, Handshakes};
use super::{ms, now_ms, Shared, Transport, CHECKER_ID, FILES};
use crate::history::{AppendRec, Outcome, TokenOp};
use crate::rng::SimRng;

/// The first retry's backoff ceiling of the workload's clients (ms).
const BACKOFF_BASE_MS: u64 = 10;

/// What a client learned of an operation, for the history.
fn outcome<T>(result: &Result<T, Error>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        // No answer, or an answer this client cannot interpret: either way
        // the operation may or may not have taken effect.
        Err(Error::Unavailable(_) | Error::Server(_)) => Outcome::Unknown,
        Err(_) => Outcome::Refused,
    }
}

/// A workload client to `target`, seeded; see [`connect`].
async fn build(
    id: i32,
    host: &str,
    target: &str,
    seed: u64,
    shared: &Arc<Shared>,
    count_reconnects: bool,
) -> Result<(Client, Option<Handshakes>), Error> {
    let builder = Client::builder(id)
        .seed(seed)
        .attempt_timeout(ms(300))
        .wait_attempt_timeout(ms(1_000))
        .retry_budget(ms(5_000))
        .backoff(ms(BACKOFF_BASE_MS), ms(200));
    connect(builder, host, target, seed, shared, count_reconnects).await
}

/// `builder` made into a client from `host` to `target` over the run's
/// transport: a simulated gRPC channel, whose connections are counted
/// here, or QUIC on an endpoint seeded by `seed`, whose handshakes are
/// returned to be counted.
async fn connect(
    builder: ClientBuilder,
    host: &str,
    target: &str,
    seed: u64,
    shared: &Arc<Shared>,
    count_reconnects: bool,
) -> Result<(Client, Option<Handshakes>), Error> {
    if shared.with(|s| s.transport) == Transport::Quic {
        let (client, handshakes) = quic::client(builder, host, target, seed, shared).await?;
        return Ok((client, count_reconnects.then_some(handshakes)));
    }
    let connections = AtomicU64::new(0);
    let counter = shared.clone();
    let channel = net::channel(host, target, shared.clone(), move || {
        if connections.fetch_add(1, Ordering::Relaxed) > 0 && count_reconnects {
            counter.with(|s| s.faults.reconnects += 1);
        }
    });
    Ok((builder.channel(channel).build()?, None))
}

/// One incarnation of workload client `index`, until its host is crashed.
pub(crate) async fn run(shared: Arc<Shared>, index: usize) -> turmoil::Result {
    let (id, host, lease, target, seed, incarnation) = shared.with(|s| {
        let c = &mut s.clients[index];
        c.incarnation += 1;
        c.alive = true;
        c.op = None;
        let target = if c.via_relay { "relay" } else { "server" };
        let seed = c.seed ^ c.incarnation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (c.id, c.host.clone(), c.lease, target, seed, c.incarnation)
    });
    shared.with(|s| {
        s.log(|| format!("c{id} boots (incarnation {incarnation}, via {target}, lease {lease} ms)"))
    });
    let (client, handshakes) = match build(id, &host, target, seed, &shared, true).await {
        Ok(built) => built,
        Err(e) => {
            shared.with(|s| s.problems.push(format!("client {id} cannot be built: {e}")));
            std::future::pending::<()>().await;
            return Ok(());
        }
    };
    let mut worker = Worker {
        shared,
        index,
        id,
        incarnation,
        lease,
        client,
        handshakes,
        rng: SimRng::new(seed),
        seq: 0,
    };
    worker.init().await;
    loop {
        worker.round().await;
    }
}

/// The workload of one client incarnation.
struct Worker {
    shared: Arc<Shared>,
    index: usize,
    id: i32,
    incarnation: u64,
    /// Lease asked for on every acquire and renew (ms).
    lease: u64,
    client: Client,
    /// Over QUIC: the endpoint's handshakes, to count reconnects.
    handshakes: Option<Handshakes>,
    rng: SimRng,
    /// Numbers the markers of this incarnation.
    seq: u64,
}

impl Worker {
    /// An operation starts: recorded for liveness and traced.
    fn begin(&self, op: &'static str, detail: impl FnOnce() -> String) -> u64 {
        let now = now_ms();
        self.shared.with(|s| {
            s.clients[self.index].op = Some((op, now));
            s.trace
                .log(now, format!("c{} -> {op} {}", self.id, detail()));
        });
        now
    }

    /// The operation ended with `result`. One that does not wait for a
    /// lock must be answered promptly once the run has settled.
    fn end(&self, op: &'static str, result: impl FnOnce() -> String) -> u64 {
        let now = now_ms();
        let reconnects = self.handshakes.as_ref().map_or(0, Handshakes::reconnects);
        self.shared.with(|s| {
            s.faults.reconnects += reconnects;
            let client = &mut s.clients[self.index];
            let invoked = client.op.take().map(|(_, invoked)| invoked);
            if s.healed {
                client.ops_since_heal += 1;
            }
            let result = result();
            if reconnects > 0 {
                s.trace.log(
                    now,
                    format!(
                        "c{} made {reconnects} new connection(s) since its last answer",
                        self.id
                    ),
                );
            }
            if let Some(invoked) = invoked.filter(|_| !matches!(op, "acquire" | "lock")) {
                // A round trip, and two more when the call had to dial: the
                // handshake goes first, and before it the call may have
                // gone out on a connection the server no longer knows (the
                // client was stalled across a server restart: seeds 18108
                // and 19367 over QUIC), answered by a stateless reset,
                // after which the retry waits its first backoff.
                let redialled = reconnects > 0;
                let trips = 2 + 4 * u64::from(redialled);
                let backoff = if redialled { BACKOFF_BASE_MS } else { 0 };
                s.prompt(self.index, trips, backoff, invoked, now, || {
                    format!("{op} ({result})")
                });
            }
            s.trace.log(now, format!("c{} <- {op} {result}", self.id));
        });
        now
    }

    /// The client learned that it holds `token`: recorded, and checked to
    /// have reached it promptly after the server's last answer about it
    /// (the grant, or the renew that confirmed a grant that came late).
    fn granted(&self, lock: &str, token: &str, fence: u64) {
        let now = now_ms();
        self.shared.with(|s| {
            s.history.grant_acked(self.id, lock, token, fence);
            let Some(&grant) = s.grant_answers.get(&(lock.to_owned(), fence)) else {
                return;
            };
            // The grant itself, or a later answer to this client: the
            // library renews a grant that came late before handing it out.
            let answered = s
                .client_answers
                .get(&self.id)
                .map_or(grant, |&a| a.max(grant));
            s.prompt(self.index, 1, 0, answered, now, || {
                format!("the grant of {lock:?} fence {fence}")
            });
        });
    }

    async fn pause(&mut self, lo: u64, hi: u64) {
        let d = self.rng.between(lo, hi);
        tokio::time::sleep(ms(d)).await;
    }

    /// Records an operation the server accepted with `token`.
    fn token_op(&self, token: &str, what: &'static str, invoked: u64, acked: u64) {
        self.shared.with(|s| {
            s.history.token_ops.push(TokenOp {
                token: token.to_owned(),
                what,
                invoked,
                acked,
            })
        });
    }

    /// Records a release attempt of `token` as unknown until it ends;
    /// returns its place.
    fn release_started(&self, token: &str) -> Option<usize> {
        self.shared.with(|s| {
            s.history.grants.get_mut(token).map(|g| {
                g.releases.push(Outcome::Unknown);
                g.releases.len() - 1
            })
        })
    }

    fn release_ended(&self, token: &str, slot: Option<usize>, outcome: Outcome) {
        self.shared.with(|s| {
            if let (Some(grant), Some(slot)) = (s.history.grants.get_mut(token), slot) {
                grant.releases[slot] = outcome;
            }
        });
    }

    /// Says hello until the server answers.
    async fn init(&mut self) {
        loop {
            self.begin("init", String::new);
            let result = self.client.init().await;
            self.end("init", || format!("{result:?}"));
            if result.is_ok() {
                return;
            }
            self.pause(10, 100).await;
        }
    }

    /// One acquire and what follows it.
    async fn round(&mut self) {
        let default = self.rng.chance(0.7);
        let lock = if default { "" } else { "x" };
        let wait = self.rng.chance(0.25).then(|| self.rng.between(50, 2_000));
        let opts = AcquireOptions {
            wait: wait.map(ms),
            lease: Some(ms(self.lease)),
        };
        if !default && self.rng.chance(0.4) {
            return self.guarded(opts).await;
        }
        self.begin("acquire", || format!("{lock:?} wait {wait:?}"));
        let result = self.client.acquire(lock, opts).await;
        self.end("acquire", || match &result {
            Ok(g) => format!("granted fence {} token {}", g.fence, short(&g.token)),
            Err(e) => format!("{e:?}"),
        });
        match result {
            Ok(grant) => {
                self.granted(lock, &grant.token, grant.fence);
                self.hold(grant).await;
            }
            Err(Error::SessionClosed) => self.init().await,
            Err(_) => self.pause(0, 50).await,
        }
    }

    /// Works under `grant` until it is released, closed or lost.
    async fn hold(&mut self, grant: Grant) {
        let token = grant.token.clone();
        let mut renewed_at = now_ms();
        let mut appends_left = if grant.lock.is_empty() {
            self.rng.between(0, 3)
        } else {
            0
        };
        loop {
            let now = now_ms();
            let (healed, pause) = self.shared.with(|s| (s.healed, s.scenario.pause));
            if !healed && self.rng.chance(pause) {
                let stall = self.lease * self.rng.between(15, 30) / 10;
                self.shared.with(|s| {
                    s.faults.client_pauses += 1;
                    s.log(|| {
                        format!(
                            "c{} stalls {stall} ms holding fence {} (lease {})",
                            self.id, grant.fence, self.lease
                        )
                    });
                });
                tokio::time::sleep(ms(stall)).await;
            } else if now >= renewed_at + self.lease / 3 {
                let invoked = self.begin("renew", || format!("fence {}", grant.fence));
                let result = self.client.renew(&grant, Some(ms(self.lease))).await;
                let acked = self.end("renew", || format!("{result:?}"));
                match result {
                    Ok(_) => {
                        self.token_op(&token, "renew", invoked, acked);
                        renewed_at = invoked;
                    }
                    Err(_) => return,
                }
            } else if appends_left > 0 {
                let file = self.rng.between(0, FILES as u64 - 1) as usize;
                self.seq += 1;
                let marker = format!("<{}.{}.{}>", self.id, self.incarnation, self.seq);
                let index = self.shared.with(|s| {
                    s.history.appends.push(AppendRec {
                        token: token.clone(),
                        file,
                        marker: marker.clone(),
                        outcome: Outcome::Unknown,
                    });
                    s.history.appends.len() - 1
                });
                let invoked = self.begin("append", || {
                    format!("{marker} to file_{file} fence {}", grant.fence)
                });
                let result = self
                    .client
                    .append(&grant, &format!("file_{file}"), marker.clone().into_bytes())
                    .await;
                let acked = self.end("append", || format!("{result:?}"));
                let got = outcome(&result);
                self.shared.with(|s| s.history.appends[index].outcome = got);
                if got != Outcome::Ok {
                    return;
                }
                self.token_op(&token, "append", invoked, acked);
                appends_left -= 1;
            } else if self.rng.chance(0.05) {
                self.begin("close", String::new);
                let result = self.client.close().await;
                self.end("close", || format!("{result:?}"));
                if result.is_ok() {
                    self.init().await;
                }
                return;
            } else {
                let slot = self.release_started(&token);
                let invoked = self.begin("release", || format!("fence {}", grant.fence));
                let result = self.client.release(&grant).await;
                let acked = self.end("release", || format!("{result:?}"));
                let got = outcome(&result);
                self.release_ended(&token, slot, got);
                if got == Outcome::Ok {
                    self.token_op(&token, "release", invoked, acked);
                }
                self.pause(0, 100).await;
                return;
            }
            self.pause(1, 20).await;
        }
    }

    /// Holds lock `x` through a guard that renews in the background.
    async fn guarded(&mut self, opts: AcquireOptions) {
        self.begin("lock", || format!("\"x\" wait {:?}", opts.wait));
        let result = self.client.lock("x", opts).await;
        self.end("lock", || match &result {
            Ok(g) => format!("granted fence {} token {}", g.fence(), short(g.token())),
            Err(e) => format!("{e:?}"),
        });
        let guard = match result {
            Ok(guard) => guard,
            Err(Error::SessionClosed) => return self.init().await,
            Err(_) => return self.pause(0, 50).await,
        };
        let token = guard.token().to_owned();
        self.granted("x", &token, guard.fence());
        let hold = self.lease / 2;
        self.pause(0, hold).await;
        let slot = self.release_started(&token);
        let invoked = self.begin("release", || format!("guard fence {}", guard.fence()));
        let result = guard.release().await;
        let acked = self.end("release", || format!("{result:?}"));
        let got = outcome(&result);
        self.release_ended(&token, slot, got);
        if got == Outcome::Ok {
            self.token_op(&token, "release", invoked, acked);
        }
        self.pause(0, 100).await;
    }
}

fn short(token: &str) -> &str {
    &token[..token.len().min(8)]
}

/// The checker host: audits leases during the run; at the end checks that
/// nothing is left held and reads the files, whenever the driver asks.
pub(crate) async fn checker(shared: Arc<Shared>) -> turmoil::Result {
    let built = async {
        let (reader, _) =
            build(CHECKER_ID, "checker", "server", 0xc4ec_4e55, &shared, false).await?;
        let auditor = Client::builder(CHECKER_ID + 1)
            .seed(0xa0d1_7000)
            .attempt_timeout(ms(200))
            .retry_budget(ms(400))
            .backoff(ms(10), ms(100));
        let (auditor, _) =
            connect(auditor, "checker", "server", 0xa0d1_7000, &shared, false).await?;
        Ok::<_, Error>((reader, auditor))
    };
    let (reader, auditor) = match built.await {
        Ok(clients) => clients,
        Err(e) => {
            shared.with(|s| s.problems.push(format!("the checker cannot be built: {e}")));
            std::future::pending::<()>().await;
            return Ok(());
        }
    };
    let mut done = 0;
    let mut next_audit = 0;
    loop {
        let now = now_ms();
        let (audit, asked, quiet) = shared.with(|s| {
            (
                s.checker.audit,
                s.checker.reads_asked,
                s.checker.quiet_check,
            )
        });
        if asked > done {
            if quiet {
                quiet_check(&shared, &reader).await;
            }
            let mut files = Vec::with_capacity(FILES);
            for file in 0..FILES {
                loop {
                    match reader.read(&format!("file_{file}")).await {
                        Ok(content) => break files.push(content),
                        Err(e) => {
                            shared.with(|s| {
                                s.log(|| format!("checker: reading file_{file} failed: {e}"))
                            });
                            tokio::time::sleep(ms(50)).await;
                        }
                    }
                }
            }
            shared.with(|s| {
                s.log(|| {
                    format!(
                        "checker read the files: {:?}",
                        files.iter().map(Vec::len).collect::<Vec<_>>()
                    )
                });
                s.checker.reads.push(files);
                s.checker.reads_done += 1;
            });
            done += 1;
        } else if audit && now >= next_audit {
            next_audit = now + 200;
            if let Ok(report) = auditor.status().await {
                let now = now_ms();
                for lock in report.locks {
                    if let Some(holder) = lock.holder.filter(|_| lock.lease_left.is_zero()) {
                        let what = format!(
                            "lease: lock {:?} held by client {holder} (fence {})",
                            lock.name, lock.fence
                        );
                        shared.with(|s| {
                            // Once per grant: the audit sees it every time.
                            if !s.problems.iter().any(|p| p.starts_with(&what)) {
                                s.problems
                                    .push(format!("{what} at {now} with no lease left"));
                            }
                        });
                    }
                }
            }
        }
        tokio::time::sleep(ms(5)).await;
    }
}

/// Once every client stopped and their leases had time to run out, nothing
/// may be held or waited for.
async fn quiet_check(shared: &Shared, reader: &Client) {
    let report = loop {
        match reader.status().await {
            Ok(report) => break report,
            Err(_) => tokio::time::sleep(ms(50)).await,
        }
    };
    let now = now_ms();
    shared.with(|s| {
        s.checker.quiet_check = false;
        for lock in &report.locks {
            if let Some(holder) = lock.holder {
                s.problems.push(format!(
                    "lease: lock {:?} still held by client {holder} (fence {}, {} ms left) at {now}, after every client stopped",
                    lock.name,
                    lock.fence,
                    lock.lease_left.as_millis()
                ));
            }
            if !lock.waiters.is_empty() {
                s.problems.push(format!(
                    "queue: lock {:?} still has waiters {:?} at {now}, after every client stopped",
                    lock.name, lock.waiters
                ));
            }
        }
    });
}
