//! The client against a scripted in-process gRPC server on `127.0.0.1:0`:
//! request ids across retries, failover, refusals, re-attaching waits, and
//! the guard's renewals. The scripted server records every call, and tests
//! wait on that record, never on the clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response};

use super::*;
use crate::proto::lock_service_server::{LockService, LockServiceServer};
use crate::proto::Status;

/// One call as the scripted server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: &'static str,
    request_id: String,
    token: String,
    wait_ms: Option<u64>,
}

/// What the scripted server does next.
#[derive(Debug)]
struct Script {
    /// Calls to fail with UNAVAILABLE before any is served.
    fail_next: u32,
    /// Init, acquire and release calls to answer with REQUEST_EXPIRED (the
    /// server forgot their id) before any is served.
    expire_next: u32,
    /// Acquire calls to leave unanswered (until the caller gives up).
    hang_acquires: u32,
    /// Acquires of new request ids whose first attempt is left unanswered.
    hang_first_attempts: u32,
    /// Renew calls to leave unanswered (until the caller gives up).
    hang_renewals: u32,
    /// Acquires are answered only after their wait, as a server does when
    /// the lock stays held.
    answer_after_wait: bool,
    /// Request ids seen by acquire calls.
    acquire_ids: Vec<String>,
    /// Status of acquire replies.
    acquire: Status,
    /// Status of renew replies.
    renew: Status,
    /// Tokens whose renewals are refused with `INVALID_TOKEN` (gone).
    gone: Vec<String>,
    /// Grants made: request id and lease of each; grant `n` (from 1) has
    /// token `t-n` and fence `6 + n`. A repeated request id gets its grant
    /// again, as from the server's dedup memory.
    granted: Vec<(String, u64)>,
    /// Replies carry no lease (`lease_ms` 0), as the original Go service's,
    /// whose messages have no such field.
    no_lease_field: bool,
}

struct Scripted {
    script: Mutex<Script>,
    seen: watch::Sender<Vec<Seen>>,
}

impl Scripted {
    /// Records a call; `Err` if the script says to fail it.
    fn record(&self, seen: Seen) -> Result<(), tonic::Status> {
        self.seen.send_modify(|all| all.push(seen));
        let mut script = self.script.lock().unwrap();
        if script.fail_next > 0 {
            script.fail_next -= 1;
            return Err(tonic::Status::unavailable("scripted failure"));
        }
        Ok(())
    }

    /// Whether the script says to answer this call REQUEST_EXPIRED.
    fn expire(&self) -> bool {
        let mut script = self.script.lock().unwrap();
        let expire = script.expire_next > 0;
        script.expire_next = script.expire_next.saturating_sub(1);
        expire
    }

    fn seen(method: &'static str, request_id: &str, token: &str) -> Seen {
        Seen {
            method,
            request_id: request_id.to_owned(),
            token: token.to_owned(),
            wait_ms: None,
        }
    }
}

fn ok() -> proto::Response {
    proto::Response {
        status: Status::Ok as i32,
        error_message: String::new(),
    }
}

#[tonic::async_trait]
impl LockService for Scripted {
    async fn client_init(
        &self,
        request: Request<proto::ClientInitArgs>,
    ) -> Result<Response<proto::Response>, tonic::Status> {
        self.record(Scripted::seen("init", &request.get_ref().request_id, ""))?;
        if self.expire() {
            return Ok(Response::new(proto::Response {
                status: Status::RequestExpired as i32,
                error_message: "forgotten".into(),
            }));
        }
        Ok(Response::new(ok()))
    }

    async fn lock_acquire(
        &self,
        request: Request<proto::LockArgs>,
    ) -> Result<Response<proto::LockResponse>, tonic::Status> {
        let args = request.into_inner();
        let mut seen = Scripted::seen("acquire", &args.request_id, "");
        seen.wait_ms = args.wait_timeout_ms;
        self.record(seen)?;
        if self.expire() {
            return Ok(Response::new(proto::LockResponse {
                status: Status::RequestExpired as i32,
                error_message: "forgotten".into(),
                ..Default::default()
            }));
        }
        let (hang, status, n, lease_ms, after_wait) = {
            let mut script = self.script.lock().unwrap();
            let new_id = !script.acquire_ids.contains(&args.request_id);
            if new_id {
                script.acquire_ids.push(args.request_id.clone());
            }
            let hang = script.hang_acquires > 0 || (new_id && script.hang_first_attempts > 0);
            if script.hang_acquires > 0 {
                script.hang_acquires -= 1;
            } else if hang {
                script.hang_first_attempts -= 1;
            }
            let lease_ms = args.lease_ms.unwrap_or(30_000);
            let known = script
                .granted
                .iter()
                .position(|(id, _)| *id == args.request_id);
            let n = match known {
                Some(i) => i,
                None if hang => 0,
                None => {
                    script.granted.push((args.request_id.clone(), lease_ms));
                    script.granted.len() - 1
                }
            };
            let lease_ms = match script.no_lease_field {
                true => 0,
                false => script.granted.get(n).map_or(lease_ms, |g| g.1),
            };
            (
                hang,
                script.acquire,
                n + 1,
                lease_ms,
                script.answer_after_wait,
            )
        };
        if hang {
            std::future::pending::<()>().await;
        }
        if after_wait {
            let wait = args.wait_timeout_ms.unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        Ok(Response::new(proto::LockResponse {
            status: status as i32,
            error_message: String::new(),
            token: format!("t-{n}"),
            fencing_token: 6 + n as u64,
            lease_ms,
        }))
    }

    async fn lock_release(
        &self,
        request: Request<proto::LockArgs>,
    ) -> Result<Response<proto::LockResponse>, tonic::Status> {
        let args = request.into_inner();
        self.record(Scripted::seen("release", &args.request_id, &args.token))?;
        if self.expire() {
            return Ok(Response::new(proto::LockResponse {
                status: Status::RequestExpired as i32,
                error_message: "forgotten".into(),
                ..Default::default()
            }));
        }
        Ok(Response::new(proto::LockResponse {
            status: Status::Ok as i32,
            ..Default::default()
        }))
    }

    async fn file_append(
        &self,
        request: Request<proto::FileArgs>,
    ) -> Result<Response<proto::Response>, tonic::Status> {
        let args = request.into_inner();
        self.record(Scripted::seen("append", &args.request_id, &args.token))?;
        Ok(Response::new(ok()))
    }

    async fn renew_lease(
        &self,
        request: Request<proto::LeaseArgs>,
    ) -> Result<Response<proto::LeaseResponse>, tonic::Status> {
        let args = request.into_inner();
        self.record(Scripted::seen("renew", &args.request_id, &args.token))?;
        let hang = {
            let mut script = self.script.lock().unwrap();
            let hang = script.hang_renewals > 0;
            script.hang_renewals = script.hang_renewals.saturating_sub(1);
            hang
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let (status, granted_lease) = {
            let script = self.script.lock().unwrap();
            let status = if script.gone.contains(&args.token) {
                Status::InvalidToken
            } else {
                script.renew
            };
            let n: Option<usize> = args.token.strip_prefix("t-").and_then(|n| n.parse().ok());
            let lease = n
                .and_then(|n| script.granted.get(n.checked_sub(1)?))
                .map(|g| g.1);
            let lease = match script.no_lease_field {
                true => Some(0),
                false => args.lease_ms.or(lease),
            };
            (status, lease)
        };
        Ok(Response::new(proto::LeaseResponse {
            status: status as i32,
            error_message: String::new(),
            lease_ms: granted_lease.unwrap_or(60),
        }))
    }

    async fn client_close(
        &self,
        request: Request<proto::ClientInitArgs>,
    ) -> Result<Response<proto::Response>, tonic::Status> {
        self.record(Scripted::seen("close", &request.get_ref().request_id, ""))?;
        Ok(Response::new(ok()))
    }

    async fn file_read(
        &self,
        _request: Request<proto::FileReadArgs>,
    ) -> Result<Response<proto::FileReadResponse>, tonic::Status> {
        self.record(Scripted::seen("read", "", ""))?;
        Ok(Response::new(proto::FileReadResponse {
            status: Status::Ok as i32,
            error_message: String::new(),
            content: b"BBAA".to_vec(),
        }))
    }

    async fn lock_status(
        &self,
        _request: Request<proto::StatusArgs>,
    ) -> Result<Response<proto::StatusResponse>, tonic::Status> {
        self.record(Scripted::seen("status", "", ""))?;
        Ok(Response::new(proto::StatusResponse {
            status: Status::Ok as i32,
            error_message: String::new(),
            locks: vec![
                proto::LockInfo {
                    lock_name: String::new(),
                    holder_client_id: 0,
                    fencing_token: 7,
                    lease_left_ms: 1500,
                    waiters: vec![proto::Waiter {
                        client_id: 2,
                        detached: true,
                    }],
                    staged_appends: 3,
                },
                proto::LockInfo {
                    lock_name: "idle".into(),
                    ..Default::default()
                },
            ],
            last_fencing_token: 7,
        }))
    }
}

/// A scripted server listening on a fresh loopback port.
struct Server {
    addr: String,
    state: Arc<Scripted>,
}

impl Server {
    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Scripted {
            script: Mutex::new(Script {
                fail_next: 0,
                expire_next: 0,
                hang_acquires: 0,
                hang_first_attempts: 0,
                hang_renewals: 0,
                answer_after_wait: false,
                acquire_ids: Vec::new(),
                acquire: Status::Ok,
                renew: Status::Ok,
                gone: Vec::new(),
                granted: Vec::new(),
                no_lease_field: false,
            }),
            seen: watch::channel(Vec::new()).0,
        });
        let service = LockServiceServer::from_arc(state.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Server { addr, state }
    }

    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.state.script.lock().unwrap()
    }

    fn calls(&self, method: &str) -> Vec<Seen> {
        let seen = self.state.seen.borrow();
        seen.iter()
            .filter(|s| s.method == method)
            .cloned()
            .collect()
    }

    /// Waits until the server has seen `n` calls of `method`.
    async fn wait_for_calls(&self, method: &str, n: usize) {
        let mut seen = self.state.seen.subscribe();
        let reached = seen.wait_for(|all| all.iter().filter(|s| s.method == method).count() >= n);
        tokio::time::timeout(Duration::from_secs(10), reached)
            .await
            .expect("the calls arrive")
            .unwrap();
    }
}

/// An address where nothing listens: connections are refused at once.
async fn dead_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

fn quick(client_id: i32) -> ClientBuilder {
    Client::builder(client_id)
        .attempt_timeout(Duration::from_secs(2))
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
}

#[tokio::test]
async fn retries_carry_one_request_id_and_new_operations_get_new_ones() {
    let server = Server::start().await;
    server.script().fail_next = 2;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    client.init().await.unwrap();
    client.init().await.unwrap();
    let inits = server.calls("init");
    assert_eq!(inits.len(), 4, "{inits:?}");
    assert!(inits[..3]
        .iter()
        .all(|s| s.request_id == inits[0].request_id));
    assert_ne!(inits[3].request_id, inits[0].request_id);
    // UUID#SEQ: one random prefix per client, numbers counting up, in the
    // one spelling the server keeps floors for.
    let (prefix, first) = inits[0].request_id.rsplit_once('#').unwrap();
    assert!(uuid::Uuid::parse_str(prefix).is_ok(), "{prefix}");
    assert_eq!(first, "1");
    assert!(crate::core::dedup::sequenced(&inits[0].request_id).is_some());
    assert_eq!(inits[3].request_id, format!("{prefix}#2"));
    let other = quick(1).endpoint(&server.addr).build().unwrap();
    other.init().await.unwrap();
    let last = server.calls("init").pop().unwrap().request_id;
    assert!(last.ends_with("#1") && !last.starts_with(prefix), "{last}");
}

#[tokio::test]
async fn a_refused_connection_fails_over_to_the_next_server() {
    let server = Server::start().await;
    let client = quick(1)
        .endpoints([dead_addr().await, server.addr.clone()])
        .build()
        .unwrap();
    client.init().await.unwrap();
    // The client stays on the server that answered.
    client.close().await.unwrap();
    assert_eq!(server.calls("init").len(), 1);
    assert_eq!(server.calls("close").len(), 1);
}

#[tokio::test]
async fn building_does_not_need_a_server_and_retries_end_in_unavailable() {
    let client = quick(1)
        .endpoint(dead_addr().await)
        .retry_budget(Duration::from_millis(100))
        .build()
        .unwrap();
    match client.init().await {
        Err(Error::Unavailable(message)) => assert!(message.contains("init"), "{message}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[test]
fn a_client_needs_a_well_formed_address() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _inside = runtime.enter();
    assert!(matches!(
        Client::builder(1).build(),
        Err(Error::BadRequest(_))
    ));
    assert!(matches!(
        Client::builder(1).endpoint("not a uri at all").build(),
        Err(Error::BadRequest(_))
    ));
}

#[tokio::test]
async fn a_refusal_is_returned_at_once_as_its_variant() {
    let server = Server::start().await;
    server.script().acquire = Status::LockHeld;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let result = client.acquire("x", AcquireOptions::try_once()).await;
    assert_eq!(result, Err(Error::LockHeld));
    let acquires = server.calls("acquire");
    assert_eq!(acquires.len(), 1);
    assert_eq!(acquires[0].wait_ms, Some(0));

    server.script().renew = Status::InvalidToken;
    let grant = Grant {
        lock: "x".into(),
        token: "stale".into(),
        fence: 1,
        lease: Duration::from_secs(1),
    };
    assert_eq!(client.renew(&grant, None).await, Err(Error::LeaseLost));
    assert_eq!(server.calls("renew").len(), 1);
}

#[tokio::test]
async fn a_grant_carries_the_servers_token_fence_and_lease() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let grant = client
        .acquire(
            "",
            AcquireOptions::forever().lease(Duration::from_millis(1500)),
        )
        .await
        .unwrap();
    assert_eq!(
        grant,
        Grant {
            lock: String::new(),
            token: "t-1".into(),
            fence: 7,
            lease: Duration::from_millis(1500),
        }
    );
    assert_eq!(server.calls("acquire")[0].wait_ms, None);
}

#[tokio::test]
async fn a_cut_off_wait_comes_back_with_the_same_request_id() {
    let server = Server::start().await;
    server.script().hang_acquires = 2;
    let client = quick(1)
        .endpoint(&server.addr)
        .wait_attempt_timeout(Duration::from_millis(100))
        .attempt_timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let grant = client
        .acquire("x", AcquireOptions::wait_for(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(grant.fence, 7);
    let acquires = server.calls("acquire");
    assert_eq!(acquires.len(), 3, "{acquires:?}");
    assert!(acquires
        .iter()
        .all(|s| s.request_id == acquires[0].request_id));
    // Each attempt asks for what is left of the caller's wait.
    let waits: Vec<u64> = acquires.iter().map(|s| s.wait_ms.unwrap()).collect();
    assert!(
        waits[0] <= 60_000 && waits[1] < waits[0] && waits[2] < waits[1],
        "{waits:?}"
    );
}

#[tokio::test]
async fn a_grant_collected_after_a_third_of_its_lease_is_confirmed_before_it_is_returned() {
    let server = Server::start().await;
    // The first attempt is cut off; the retry collects a grant that the
    // client cannot know is still alive (more than a third of its lease
    // passed since it asked), and the renewal says it is gone.
    server.script().hang_acquires = 1;
    server.script().gone.push("t-1".into());
    let client = quick(1)
        .endpoint(&server.addr)
        .wait_attempt_timeout(Duration::from_secs(1))
        .attempt_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let opts = AcquireOptions::forever().lease(Duration::from_millis(1500));
    let grant = client.acquire("x", opts).await.unwrap();
    // Not the dead grant: a fresh acquire (a new request id) got the next.
    assert_eq!((grant.token.as_str(), grant.fence), ("t-2", 8));
    let acquires = server.calls("acquire");
    assert_eq!(acquires.len(), 3, "{acquires:?}");
    assert_eq!(acquires[0].request_id, acquires[1].request_id);
    assert_ne!(acquires[1].request_id, acquires[2].request_id);
    let renews = server.calls("renew");
    assert_eq!(renews[0].token, "t-1", "{renews:?}");
    // The fresh grant was confirmed only if the machine was slow enough
    // for its reply to take a third of the lease; either way with its token.
    assert!(renews[1..].iter().all(|r| r.token == "t-2"), "{renews:?}");
}

#[tokio::test]
async fn an_acquire_gives_up_when_grant_after_grant_runs_out_before_it_arrives() {
    let server = Server::start().await;
    // Every grant arrives after a cut-off attempt, and is gone.
    server.script().hang_first_attempts = 3;
    server.script().gone = vec!["t-1".into(), "t-2".into(), "t-3".into()];
    let client = quick(1)
        .endpoint(&server.addr)
        .wait_attempt_timeout(Duration::from_millis(300))
        .attempt_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let opts = AcquireOptions::forever().lease(Duration::from_millis(300));
    assert_eq!(client.acquire("x", opts).await, Err(Error::LeaseLost));
    // Three rounds: each a cut-off attempt and the retry, then a renewal.
    assert_eq!(server.calls("acquire").len(), 6);
    assert_eq!(server.calls("renew").len(), 3);
}

#[tokio::test]
async fn a_try_once_whose_late_grant_ran_out_finds_the_lock_busy() {
    let server = Server::start().await;
    server.script().hang_acquires = 1;
    server.script().gone.push("t-1".into());
    let client = quick(1)
        .endpoint(&server.addr)
        .attempt_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let opts = AcquireOptions::try_once().lease(Duration::from_millis(300));
    assert_eq!(client.acquire("x", opts).await, Err(Error::LockHeld));
    assert_eq!(server.calls("acquire").len(), 2);
    assert_eq!(server.calls("renew").len(), 1);
}

#[tokio::test]
async fn a_grant_that_comes_back_at_once_is_returned_without_a_renewal() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let grant = client
        .acquire(
            "x",
            AcquireOptions::forever().lease(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(grant.token, "t-1");
    assert!(server.calls("renew").is_empty());
}

#[tokio::test]
async fn a_wait_that_ends_in_lock_held_is_a_wait_timeout() {
    let server = Server::start().await;
    server.script().acquire = Status::LockHeld;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let result = client
        .acquire("x", AcquireOptions::wait_for(Duration::from_millis(5)))
        .await;
    assert_eq!(result, Err(Error::WaitTimedOut));
}

#[tokio::test]
async fn a_wait_longer_than_the_retry_budget_still_ends_in_a_wait_timeout() {
    let server = Server::start().await;
    {
        let mut script = server.script();
        script.acquire = Status::LockHeld;
        script.answer_after_wait = true;
    }
    let client = quick(1)
        .retry_budget(Duration::from_millis(50))
        .endpoint(&server.addr)
        .build()
        .unwrap();
    let result = client
        .acquire("x", AcquireOptions::wait_for(Duration::from_millis(200)))
        .await;
    assert_eq!(result, Err(Error::WaitTimedOut));
}

#[tokio::test]
async fn waits_and_budgets_too_long_to_count_are_no_limit_rather_than_a_panic() {
    let server = Server::start().await;
    let client = quick(1)
        .retry_budget(Duration::MAX)
        .endpoint(&server.addr)
        .build()
        .unwrap();
    let grant = client
        .acquire("x", AcquireOptions::wait_for(Duration::MAX))
        .await
        .unwrap();
    assert_eq!(grant.token, "t-1");
    assert_eq!(server.calls("acquire")[0].wait_ms, None, "waits forever");
}

#[tokio::test]
async fn appends_need_a_grant_of_the_default_lock() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let mut grant = Grant {
        lock: "other".into(),
        token: "t".into(),
        fence: 1,
        lease: Duration::from_secs(1),
    };
    assert!(matches!(
        client.append(&grant, "file_0", "A").await,
        Err(Error::BadRequest(_))
    ));
    assert!(server.calls("append").is_empty());
    grant.lock.clear();
    client.append(&grant, "file_0", "A").await.unwrap();
    assert_eq!(server.calls("append")[0].token, "t");
    assert_eq!(client.read("file_0").await.unwrap(), b"BBAA");
}

#[tokio::test]
async fn status_is_translated_and_an_unheld_lock_has_no_holder() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let report = client.status().await.unwrap();
    assert_eq!(report.last_fence, 7);
    assert_eq!(report.locks[0].holder, Some(0));
    assert_eq!(report.locks[0].lease_left, Duration::from_millis(1500));
    assert_eq!(
        report.locks[0].waiters,
        [WaiterStatus {
            client_id: 2,
            detached: true
        }]
    );
    assert_eq!(report.locks[0].staged_appends, 3);
    assert_eq!(report.locks[1].holder, None);
}

/// The original Go service's replies have no lease field: decoded, it is 0.
/// A client takes that as a short lease of unknown length (renewed every
/// second by a guard), not as a grant that has already run out.
#[tokio::test]
async fn a_reply_without_a_lease_is_a_short_lease_not_a_lost_one() {
    let server = Server::start().await;
    server.script().no_lease_field = true;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let grant = client
        .acquire("", AcquireOptions::default())
        .await
        .expect("a grant with no lease field is a grant");
    assert_eq!(grant.lease, Duration::from_secs(3));
    assert_eq!(
        client.renew(&grant, None).await.unwrap(),
        Duration::from_secs(3)
    );
    let guard = client
        .lock("x", AcquireOptions::default())
        .await
        .expect("a guard");
    server.wait_for_calls("renew", 2).await;
    assert!(!guard.is_lease_lost());
    guard.release().await.unwrap();
}

#[tokio::test]
async fn the_guard_renews_until_released() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let guard = client
        .lock(
            "x",
            AcquireOptions::forever().lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    assert_eq!(
        (guard.lock_name(), guard.token(), guard.fence()),
        ("x", "t-1", 7)
    );
    server.wait_for_calls("renew", 3).await;
    assert!(!guard.is_lease_lost());
    let renews = server.calls("renew");
    assert!(renews.iter().all(|s| s.token == "t-1"));
    guard.release().await.unwrap();
    assert_eq!(server.calls("release")[0].token, "t-1");
}

#[tokio::test]
async fn the_guard_reports_a_refused_renewal() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let guard = client
        .lock(
            "x",
            AcquireOptions::forever().lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    server.script().renew = Status::InvalidToken;
    let mut lost = guard.lease_lost();
    tokio::time::timeout(Duration::from_secs(10), lost.wait_for(|lost| *lost))
        .await
        .expect("the loss is reported")
        .unwrap();
    assert!(guard.is_lease_lost());
}

#[tokio::test]
async fn the_guard_presumes_the_lease_lost_when_no_renewal_gets_through() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let guard = client
        .lock(
            "x",
            AcquireOptions::forever().lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    // Every renewal now fails in transport; retries cannot outlast the lease.
    server.script().fail_next = u32::MAX;
    let mut lost = guard.lease_lost();
    tokio::time::timeout(Duration::from_secs(10), lost.wait_for(|lost| *lost))
        .await
        .expect("the loss is presumed")
        .unwrap();
}

/// A renewal that hangs on one server leaves time to try the next before
/// the lease runs out: each of its attempts gets at most half the time left,
/// not the whole attempt timeout (here far longer than the lease).
#[tokio::test]
async fn a_renewal_hanging_on_one_server_fails_over_before_the_lease_runs_out() {
    let first = Server::start().await;
    let second = Server::start().await;
    let client = quick(1)
        .endpoints([first.addr.clone(), second.addr.clone()])
        .attempt_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let guard = client
        .lock("x", AcquireOptions::forever().lease(Duration::from_secs(3)))
        .await
        .unwrap();
    first.script().hang_renewals = u32::MAX;
    // The second server knows grant t-1's lease, as a replica would.
    second.script().granted.push(("elsewhere".into(), 3000));
    // The first renewal (after 1 s) hangs on the first server for about a
    // second, then goes to the second, which renews; the next follows.
    second.wait_for_calls("renew", 2).await;
    assert!(!guard.is_lease_lost());
    assert!(!first.calls("renew").is_empty());
}

#[tokio::test]
async fn dropping_the_guard_stops_renewing_without_releasing() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let guard = client
        .lock(
            "x",
            AcquireOptions::forever().lease(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    server.wait_for_calls("renew", 1).await;
    drop(guard);
    // A later call is answered after anything the dropped task could have
    // had in flight; then the count must stay put across another round trip.
    client.init().await.unwrap();
    let renews = server.calls("renew").len();
    client.init().await.unwrap();
    client.init().await.unwrap();
    assert_eq!(server.calls("renew").len(), renews);
    assert!(server.calls("release").is_empty());
}

/// A guard whose lease has run out by the clock says so, even when its
/// renewal task has not had a chance to run (a blocked or busy runtime):
/// here it is checked before the task is ever polled.
#[tokio::test(flavor = "current_thread")]
async fn a_guard_past_its_lease_is_lost_even_if_its_renewal_task_never_ran() {
    let client = quick(1).endpoint(dead_addr().await).build().unwrap();
    let lease = Duration::from_millis(300);
    let grant = Grant {
        lock: "l".into(),
        token: "t".into(),
        fence: 1,
        lease,
    };
    let now = tokio::time::Instant::now();
    let fresh = LockGuard::start(
        client.clone(),
        acquire::Acquired {
            grant: grant.clone(),
            lease_from: super::clock::Stamp::at(now),
        },
    );
    assert!(!fresh.is_lease_lost(), "a fresh lease is held");
    // Less the margin: 2 ms, and 0.3 ms for 0.1 % of the lease.
    assert_eq!(
        fresh.expires_at(),
        now + lease - Duration::from_micros(2_300)
    );
    let stale = LockGuard::start(
        client,
        acquire::Acquired {
            grant,
            lease_from: super::clock::Stamp::at(now.checked_sub(lease * 2).unwrap()),
        },
    );
    assert!(
        !*stale.lease_lost().borrow(),
        "the renewal task has not run yet"
    );
    assert!(
        stale.is_lease_lost(),
        "but the clock says the lease is over"
    );
}

/// Attempt timeouts are kept within bounds: one too long for a gRPC
/// deadline ("no timeout") still makes calls, and a zero one does not spin.
#[tokio::test]
async fn absurd_attempt_timeouts_are_bounded() {
    let server = Server::start().await;
    let client = quick(1)
        .attempt_timeout(Duration::MAX)
        .wait_attempt_timeout(Duration::MAX)
        .endpoint(&server.addr)
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
        .acquire("x", AcquireOptions::forever())
        .await
        .unwrap();
    let client = quick(1)
        .attempt_timeout(Duration::ZERO)
        .endpoint(&server.addr)
        .build()
        .unwrap();
    client.init().await.unwrap();
}

/// A release of a guard's grant or a close through the client (any clone)
/// tells the guard at once, not at its next renewal; other guards stay.
#[tokio::test]
async fn a_release_or_close_through_the_client_loses_the_guard_at_once() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    let a = client.lock("a", AcquireOptions::forever()).await.unwrap();
    let b = client.lock("b", AcquireOptions::forever()).await.unwrap();
    assert!(!a.is_lease_lost() && !b.is_lease_lost());
    client.clone().release(a.grant()).await.unwrap();
    assert!(*a.lease_lost().borrow(), "released through the client");
    assert!(!b.is_lease_lost(), "another grant's guard is untouched");
    client.close().await.unwrap();
    assert!(*b.lease_lost().borrow(), "closed");
    drop(a);
    drop(b);
    assert_eq!(
        client.guards().len(),
        0,
        "dropped guards leave the registry"
    );
}

/// A close while a `lock` was still acquiring loses the guard it returns:
/// the close may have ended that grant or its wait on the server. (Whichever
/// way the close and the acquire's return interleave, the guard is lost.)
#[tokio::test]
async fn a_close_during_an_acquire_loses_the_guard_it_returns() {
    let server = Server::start().await;
    server.script().hang_acquires = 1;
    let client = quick(1)
        .endpoint(&server.addr)
        .wait_attempt_timeout(Duration::from_millis(200))
        .attempt_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let locking = tokio::spawn({
        let client = client.clone();
        async move { client.lock("x", AcquireOptions::forever()).await }
    });
    server.wait_for_calls("acquire", 1).await;
    client.close().await.unwrap();
    let guard = locking.await.unwrap().unwrap();
    assert!(*guard.lease_lost().borrow(), "closed while acquiring");
    // A lock taken after the close is not touched by it.
    let after = client.lock("y", AcquireOptions::forever()).await.unwrap();
    assert!(!after.is_lease_lost());
}

/// A waiting acquire whose request id the server has forgotten, after this
/// client closed its session, ends SessionClosed rather than queueing again
/// under a new id: what the server forgot may be that the close cancelled
/// the wait, and a new id would queue after the close.
#[tokio::test]
async fn an_expired_wait_after_a_close_ends_session_closed() {
    let server = Server::start().await;
    server.script().hang_acquires = 1;
    let client = quick(1)
        .endpoint(&server.addr)
        .wait_attempt_timeout(Duration::from_secs(1))
        .attempt_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let acquiring = tokio::spawn({
        let client = client.clone();
        async move { client.acquire("x", AcquireOptions::forever()).await }
    });
    server.wait_for_calls("acquire", 1).await;
    // The re-attach after the cut-off finds its id forgotten.
    server.script().expire_next = 1;
    client.close().await.unwrap();
    let acquired = acquiring.await.unwrap();
    assert!(
        matches!(acquired, Err(Error::SessionClosed)),
        "{acquired:?}"
    );
    assert_eq!(server.calls("acquire").len(), 2, "not queued again");
}

/// A REQUEST_EXPIRED answer (the server forgot the id's answer): a hello or
/// an acquire, which may be repeated, goes again under a new id; a release,
/// which may not, ends as Unavailable (outcome unknown) without a retry.
#[tokio::test]
async fn an_expired_id_is_renumbered_only_where_a_repeat_is_harmless() {
    let server = Server::start().await;
    let client = quick(1).endpoint(&server.addr).build().unwrap();
    server.script().expire_next = 1;
    client.init().await.unwrap();
    let inits = server.calls("init");
    assert_eq!(inits.len(), 2);
    assert_ne!(inits[0].request_id, inits[1].request_id, "a new id");

    server.script().expire_next = 2;
    let grant = client
        .acquire("x", AcquireOptions::forever())
        .await
        .unwrap();
    let acquires = server.calls("acquire");
    assert_eq!(acquires.len(), 3, "{acquires:?}");
    assert_ne!(acquires[0].request_id, acquires[1].request_id);
    assert_ne!(acquires[1].request_id, acquires[2].request_id);

    // The server that answered keeps the retry: a second server in the
    // list is not tried.
    let other = Server::start().await;
    let both = quick(2)
        .endpoints([server.addr.clone(), other.addr.clone()])
        .build()
        .unwrap();
    server.script().expire_next = 1;
    both.init().await.unwrap();
    server.script().expire_next = 1;
    let _ = both.acquire("y", AcquireOptions::forever()).await.unwrap();
    assert_eq!(server.calls("init").len(), 4);
    assert_eq!(server.calls("acquire").len(), 5);
    assert!(other.calls("init").is_empty() && other.calls("acquire").is_empty());

    server.script().expire_next = 1;
    let released = client.release(&grant).await;
    assert!(
        matches!(&released, Err(Error::Unavailable(m)) if m == "forgotten"),
        "{released:?}"
    );
    assert_eq!(server.calls("release").len(), 1, "not sent again");
}
