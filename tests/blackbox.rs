//! Black-box tests: real `dlm server` processes on loopback, driven through
//! the client library and the CLI. Every scenario runs over every transport
//! (gRPC, gRPC over TLS, QUIC; see `over_every_wire!` at the bottom). Nothing
//! here sleeps to wait for an event; tests wait on the event itself (a
//! reply, or the server's status showing a waiter).

// Only the core is barred from spawning tasks (clippy.toml); tests may.
#![allow(clippy::disallowed_methods)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{dlm_bin, Relay, ServerProcess, Wire};
use dlm::client::{AcquireOptions, Client, Error};

fn client(server: &ServerProcess, id: i32) -> Client {
    server.client(id)
}

async fn read(client: &Client, file: &str) -> String {
    String::from_utf8(client.read(file).await.expect("read")).expect("utf8")
}

/// Waits until `lock` shows `n` waiters in the server's status.
async fn until_waiters(client: &Client, lock: &str, n: usize) {
    loop {
        let status = client.status().await.expect("status");
        let waiting = status
            .locks
            .iter()
            .find(|l| l.name == lock)
            .map_or(0, |l| l.waiters.iter().filter(|w| !w.detached).count());
        if waiting >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
}

async fn acquire_two_appends_release_reads_aa(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    c1.init().await.unwrap();
    let grant = c1.acquire("", AcquireOptions::default()).await.unwrap();
    c1.append(&grant, "file_0", "A").await.unwrap();
    c1.append(&grant, "file_0", "A").await.unwrap();
    assert_eq!(
        read(&c1, "file_0").await,
        "",
        "staged appends are invisible before release"
    );
    c1.release(&grant).await.unwrap();
    assert_eq!(read(&c1, "file_0").await, "AA");
    assert_eq!(server.file("file_0"), "AA");
}

async fn kill9_with_the_lock_free_keeps_contents(wire: Wire) {
    let mut server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    let grant = c1.acquire("", AcquireOptions::default()).await.unwrap();
    c1.append(&grant, "file_0", "AA").await.unwrap();
    c1.release(&grant).await.unwrap();
    server.restart();
    assert_eq!(read(&c1, "file_0").await, "AA");
    let grant2 = c1.acquire("", AcquireOptions::default()).await.unwrap();
    assert!(
        grant2.fence > grant.fence,
        "fencing numbers survive the restart"
    );
    c1.append(&grant2, "file_0", "1").await.unwrap();
    c1.release(&grant2).await.unwrap();
    assert_eq!(read(&c1, "file_0").await, "AA1");
}

async fn kill9_with_the_lock_held_keeps_the_grant_and_its_staged_append(wire: Wire) {
    let mut server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    let c2 = client(&server, 2);
    let grant = c1.acquire("", AcquireOptions::default()).await.unwrap();
    c1.append(&grant, "file_3", "X").await.unwrap();
    server.restart();

    // The holder's token still works after the restart.
    c1.renew(&grant, None).await.unwrap();
    c1.append(&grant, "file_3", "Y").await.unwrap();
    // A second client finds it held, then waits until the release.
    assert!(matches!(
        c2.acquire("", AcquireOptions::try_once()).await,
        Err(Error::LockHeld)
    ));
    let waiter = tokio::spawn({
        let c2 = c2.clone();
        async move { c2.acquire("", AcquireOptions::default()).await }
    });
    until_waiters(&c1, "", 1).await;
    assert!(!waiter.is_finished());
    assert_eq!(read(&c1, "file_3").await, "");
    c1.release(&grant).await.unwrap();
    let grant2 = waiter.await.unwrap().unwrap();
    assert!(grant2.fence > grant.fence);
    assert_eq!(
        read(&c2, "file_3").await,
        "XY",
        "the staged append survived the crash, once"
    );
}

async fn sigterm_with_a_waiter_queued_stops_at_once_and_keeps_the_grant(wire: Wire) {
    let mut server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    // The waiter waits on one call, as the original clients do (the
    // library would otherwise give an attempt up after 10 s, which ends a
    // drain that waits for it).
    let c2 = server
        .client_builder(2)
        .wait_attempt_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let lease = AcquireOptions::default().lease(Duration::from_secs(600));
    let grant = c1.acquire("x", lease).await.unwrap();
    let waiter = tokio::spawn({
        let c2 = c2.clone();
        async move { c2.acquire("x", AcquireOptions::default()).await }
    });
    until_waiters(&c1, "x", 1).await;
    server.signal(libc::SIGTERM);
    // Bounded polling for the exit, not a synchronisation sleep; the
    // runtime keeps serving the clients' side of the connections meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.exited().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server still drains 20 s after SIGTERM with a waiter queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    waiter.abort();
    server.try_restart().expect("server restarts");
    // The holder's grant survived the graceful stop, as it survives a crash.
    let c1 = client(&server, 1);
    c1.renew(&grant, None).await.unwrap();
    c1.release(&grant).await.unwrap();
}

async fn six_clients_queued_on_one_lock_are_granted_in_order(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let holder = client(&server, 100);
    let first = holder
        .acquire("q", AcquireOptions::default())
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for id in 1..=6 {
        let c = client(&server, id);
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let grant = c.acquire("q", AcquireOptions::default()).await.unwrap();
            tx.send((id, grant.fence)).unwrap();
            c.release(&grant).await.unwrap();
        }));
        // Enqueue strictly one after another: wait until the server shows it.
        until_waiters(&holder, "q", id as usize).await;
    }
    holder.release(&first).await.unwrap();
    let mut order = Vec::new();
    let mut fences = vec![first.fence];
    for _ in 0..6 {
        let (id, fence) = rx.recv().await.unwrap();
        order.push(id);
        fences.push(fence);
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(order, vec![1, 2, 3, 4, 5, 6]);
    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
}

async fn a_client_that_stops_renewing_loses_the_lock_to_the_next_waiter(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    let c2 = client(&server, 2);
    let grant = c1
        .acquire(
            "",
            AcquireOptions::default().lease(Duration::from_millis(1500)),
        )
        .await
        .unwrap();
    c1.append(&grant, "file_5", "lost").await.unwrap();
    // c1 now stalls (renews nothing); c2 waits and gets the lock when the lease runs out.
    let grant2 = c2.acquire("", AcquireOptions::default()).await.unwrap();
    assert!(grant2.fence > grant.fence);
    let append = c1.append(&grant, "file_5", "late").await;
    assert!(matches!(append, Err(Error::LeaseLost)), "{append:?}");
    let release = c1.release(&grant).await;
    assert!(matches!(release, Err(Error::LeaseLost)), "{release:?}");
    let renew = c1.renew(&grant, None).await;
    assert!(matches!(renew, Err(Error::LeaseLost)), "{renew:?}");
    c2.append(&grant2, "file_5", "B").await.unwrap();
    c2.release(&grant2).await.unwrap();
    assert_eq!(
        read(&c2, "file_5").await,
        "B",
        "the run-out grant's append was dropped"
    );
}

async fn a_guard_keeps_its_lease_alive_and_releases(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    let c2 = client(&server, 2);
    let guard = c1
        .lock(
            "g",
            AcquireOptions::default().lease(Duration::from_millis(1000)),
        )
        .await
        .unwrap();
    // Renewals keep it: a bounded wait of several leases times out.
    let waited = c2
        .acquire("g", AcquireOptions::wait_for(Duration::from_millis(2000)))
        .await;
    assert!(matches!(waited, Err(Error::WaitTimedOut)), "{waited:?}");
    assert!(!guard.is_lease_lost());
    let fence = guard.fence();
    guard.release().await.unwrap();
    let grant = c2.acquire("g", AcquireOptions::try_once()).await.unwrap();
    assert!(grant.fence > fence);
}

async fn bad_input_gets_a_clear_error_and_changes_nothing(wire: Wire) {
    let server = ServerProcess::start_over(wire, &["--max-append-bytes", "1024"]);
    let c1 = client(&server, 1);
    let c2 = client(&server, 2);
    let grant = c1.acquire("", AcquireOptions::default()).await.unwrap();
    let long = "f".repeat(5000);
    for name in [
        "../x",
        "/etc/passwd",
        "file_100",
        "file_0/../../x",
        "",
        long.as_str(),
    ] {
        let r = c1.append(&grant, name, "X").await;
        assert!(matches!(r, Err(Error::BadRequest(_))), "{name:?}: {r:?}");
        let r = c1.read(name).await;
        assert!(
            matches!(r, Err(Error::BadRequest(_))),
            "read {name:?}: {r:?}"
        );
    }
    let r = c1.append(&grant, "file_1", vec![b'x'; 2000]).await;
    assert!(matches!(r, Err(Error::BadRequest(_))), "oversize: {r:?}");
    // Past the transport's own limit (gRPC: 4 MiB here, refused before the
    // message is buffered whole; QUIC: the append limit plus the envelope).
    let r = c1.append(&grant, "file_1", vec![b'x'; 5 << 20]).await;
    let transport_said = match wire {
        Wire::Grpc | Wire::GrpcTls => "decoded message length too large",
        Wire::Quic => "larger than the server accepts",
    };
    assert!(
        matches!(&r, Err(Error::BadRequest(m)) if m.contains(transport_said)),
        "5 MiB: {r:?}"
    );
    let r = c1.append_token("garbage", "file_1", "X").await;
    assert!(matches!(r, Err(Error::LeaseLost)), "garbage token: {r:?}");
    let r = c2.release_token("", "garbage").await;
    assert!(
        matches!(r, Err(Error::LeaseLost)),
        "release with a garbage token: {r:?}"
    );
    let r = c2.release_token("never-held", "x").await;
    assert!(
        matches!(r, Err(Error::NotHeld)),
        "release without holding: {r:?}"
    );
    let r = c2.release_token("", &grant.token).await;
    assert!(
        matches!(r, Err(Error::PermissionDenied)),
        "another client's token: {r:?}"
    );
    for lease in [Duration::ZERO, Duration::from_secs(10 * 3600)] {
        let r = c2
            .acquire("other", AcquireOptions::default().lease(lease))
            .await;
        assert!(
            matches!(r, Err(Error::BadRequest(_))),
            "lease {lease:?}: {r:?}"
        );
    }
    let r = c2
        .acquire(
            "other",
            AcquireOptions::wait_for(Duration::from_secs(400 * 24 * 3600)),
        )
        .await;
    assert!(matches!(r, Err(Error::BadRequest(_))), "absurd wait: {r:?}");
    // Nothing changed: the lock is still c1's, nothing staged or written.
    let status = c1.status().await.unwrap();
    let default = status.locks.iter().find(|l| l.name.is_empty()).unwrap();
    assert_eq!(default.holder, Some(1));
    assert_eq!(default.staged_appends, 0);
    assert!(status.locks.iter().all(|l| l.name != "other"));
    c1.release(&grant).await.unwrap();
    for i in 0..100 {
        assert_eq!(server.file(&format!("file_{i}")), "");
    }
    let entries: Vec<String> = std::fs::read_dir(server.data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries.len(),
        101,
        "only file_0..99 and state/: {entries:?}"
    );
}

/// The newest log segment that holds records (a server also keeps the next
/// generation's segment zero-filled ahead).
fn data_log(server: &ServerProcess) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(server.data_dir().join("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("log-"))
        .filter(|p| !dlm::log::frame::all_zero(&std::fs::read(p).unwrap()))
        .collect();
    logs.sort();
    logs.pop().expect("a log segment with records")
}

async fn a_corrupt_record_in_the_middle_stops_the_start_naming_file_and_offset(wire: Wire) {
    let mut server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    for _ in 0..3 {
        let grant = c1.acquire("", AcquireOptions::default()).await.unwrap();
        c1.append(&grant, "file_0", "A").await.unwrap();
        c1.release(&grant).await.unwrap();
    }
    server.kill9();
    let log = data_log(&server);
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[12] ^= 0xff; // inside the first record's payload
    std::fs::write(&log, &bytes).unwrap();
    let err = server.try_restart().expect_err("must refuse to start");
    assert!(err.contains(&log.display().to_string()), "{err}");
    assert!(err.contains("offset 0"), "{err}");
}

async fn a_torn_last_record_is_dropped_and_nothing_acknowledged_is_lost(wire: Wire) {
    let mut server = ServerProcess::start_over(wire, &[]);
    let c1 = client(&server, 1);
    let grant = c1.acquire("", AcquireOptions::default()).await.unwrap();
    c1.append(&grant, "file_0", "A").await.unwrap();
    c1.release(&grant).await.unwrap();
    let held = c1.acquire("", AcquireOptions::default()).await.unwrap();
    c1.append(&held, "file_0", "B").await.unwrap();
    server.kill9();
    // A write the crash cut short: a header promising 100 bytes, 10 present,
    // right after the last good record (zeros of the preallocated log follow).
    let log = data_log(&server);
    let mut bytes = std::fs::read(&log).unwrap();
    let end = dlm::log::frame::scan(&bytes).valid_len as usize;
    assert!(
        dlm::log::frame::all_zero(&bytes[end..]),
        "only zeros after the data"
    );
    let mut torn = 100u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xAB; 14]);
    if bytes.len() < end + torn.len() {
        bytes.resize(end + torn.len(), 0);
    }
    bytes[end..end + torn.len()].copy_from_slice(&torn);
    std::fs::write(&log, &bytes).unwrap();
    server
        .try_restart()
        .expect("starts after dropping the torn record");
    assert_eq!(read(&c1, "file_0").await, "A");
    c1.append(&held, "file_0", "C").await.unwrap();
    c1.release(&held).await.unwrap();
    assert_eq!(read(&c1, "file_0").await, "ABC");
}

/// Runs a `dlm` client command to completion; returns its stdout, failing
/// the test with its stderr if it fails.
async fn run(server: &ServerProcess, state: &std::path::Path, args: &[&str]) -> String {
    let out = server.cli(state, args).output().await.expect("dlm runs");
    assert!(
        out.status.success(),
        "dlm {args:?} over {:?}: {}\n{}",
        server.wire(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// The fencing number in `acquired lock "NAME" fence N`.
fn fence_of(line: &str) -> u64 {
    line.trim()
        .rsplit_once("fence ")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("no fence in {line:?}"))
}

/// The README's three-terminal walkthrough, command by command, with the
/// transport flags of the wire (`--transport quic --ca PATH` for QUIC).
async fn the_readme_walkthrough_works_from_the_cli(wire: Wire) {
    let server = ServerProcess::start_over(wire, &["--lease-ms", "30000"]);
    let state = tempfile::tempdir().unwrap();
    let state = state.path();
    let acquired = run(&server, state, &["acquire", "--client-id", "1"]).await;
    assert_eq!(acquired.trim(), r#"acquired lock "" fence 1"#);
    run(
        &server,
        state,
        &["append", "--client-id", "1", "file_0", "A"],
    )
    .await;
    run(
        &server,
        state,
        &["append", "--client-id", "1", "file_0", "A"],
    )
    .await;
    assert_eq!(run(&server, state, &["cat", "file_0"]).await, "");

    let waiter = server
        .cli(state, &["acquire", "--client-id", "2"])
        .spawn()
        .unwrap();
    until_waiters(&client(&server, 99), "", 1).await;
    let status = run(&server, state, &["status"]).await;
    let row: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with(r#""""#))
        .unwrap_or_else(|| panic!("no default lock in {status}"))
        .split_whitespace()
        .collect();
    assert_eq!((row[1], row[2], row[5]), ("1", "1", "2"), "{status}");

    let released = run(&server, state, &["release", "--client-id", "1"]).await;
    assert_eq!(released.trim(), r#"released lock """#);
    let waited = waiter.wait_with_output().await.unwrap();
    assert!(waited.status.success(), "{waited:?}");
    assert_eq!(
        String::from_utf8_lossy(&waited.stdout).trim(),
        r#"acquired lock "" fence 2"#
    );
    assert_eq!(run(&server, state, &["cat", "file_0"]).await, "AA");
    run(&server, state, &["release", "--client-id", "2"]).await;

    let held = run(
        &server,
        state,
        &[
            "hold",
            "--client-id",
            "3",
            "--lock",
            "deploy",
            "--",
            "sh",
            "-c",
            r#"echo "fence $DLM_FENCING_TOKEN""#,
        ],
    )
    .await;
    assert!(fence_of(&held) > 2, "fencing numbers only go up: {held}");
    // `dlm hold` hands its transport flags to the command, so a `dlm append`
    // inside it reaches the same server the same way.
    run(
        &server,
        state,
        &[
            "hold",
            "--client-id",
            "3",
            "--",
            dlm_bin(),
            "append",
            "file_0",
            "B",
        ],
    )
    .await;
    assert_eq!(run(&server, state, &["cat", "file_0"]).await, "AAB");
}

/// A client process is killed with SIGKILL while it holds one lock and waits
/// for another: the server stays up, other clients carry on, and what the
/// killed client held (or was granted after it died) is freed by its lease.
async fn a_client_killed_in_the_middle_of_an_acquire_loses_its_locks_by_their_leases(wire: Wire) {
    let server = ServerProcess::start_over(wire, &["--lease-ms", "500"]);
    let state = tempfile::tempdir().unwrap();
    let c1 = client(&server, 1);
    let c2 = client(&server, 2);
    let held = run(
        &server,
        state.path(),
        &["acquire", "--client-id", "9", "--lock", "a"],
    )
    .await;
    let killed_fence = fence_of(&held);
    // c1 holds "b" on a long lease, so that it is still c1's to release
    // however long the wait for "a" below takes on a loaded machine.
    let long = AcquireOptions::default().lease(Duration::from_secs(60));
    let b = c1.acquire("b", long).await.unwrap();
    let mut killed = server
        .cli(
            state.path(),
            &["acquire", "--client-id", "9", "--lock", "b"],
        )
        .spawn()
        .unwrap();
    until_waiters(&c1, "b", 1).await;
    killed.kill().await.unwrap();

    // Other clients are unaffected: c2 gets "a" once the killed client's
    // lease runs out, and "b" after c1's release (and after whatever grant
    // the killed waiter got meanwhile ran out).
    let a = c2.acquire("a", long).await.unwrap();
    assert!(a.fence > killed_fence, "{} <= {killed_fence}", a.fence);
    c1.release(&b).await.unwrap();
    let b2 = c2.acquire("b", long).await.unwrap();
    assert!(b2.fence > b.fence);
    let status = c1.status().await.unwrap();
    for name in ["a", "b"] {
        let lock = status.locks.iter().find(|l| l.name == name).unwrap();
        assert_eq!(lock.holder, Some(2), "{name}: {status:?}");
    }
    c2.release(&a).await.unwrap();
    c2.release(&b2).await.unwrap();
}

/// A waiting client falls silent (its host lost power; a partition): no
/// FIN, no reset, no QUIC close. The server's keepalive notices within
/// `--keepalive-ms` + `--keepalive-timeout-ms` and cuts its call off, so the
/// waiter is detached (its place kept for a retry) instead of waiting on a
/// dead connection, to be granted a lock nobody would use or release.
async fn a_waiter_whose_client_falls_silent_is_cut_off_by_keepalive(wire: Wire) {
    // A short interval and a longer timeout: the silent client is found
    // within ~1.2 s, and the ones that answer have a second to do so.
    let server = ServerProcess::start_over(
        wire,
        &["--keepalive-ms", "200", "--keepalive-timeout-ms", "1000"],
    );
    let holder = client(&server, 1);
    let long = AcquireOptions::default().lease(Duration::from_secs(600));
    let grant = holder.acquire("x", long).await.unwrap();
    let relay = Relay::start(wire, server.client_addr()).await;
    // One call that waits as long as it takes: only the server can end it.
    let silent = Client::builder(2)
        .endpoint(relay.addr())
        .transport(server.transport())
        .wait_attempt_timeout(Duration::from_secs(3600))
        .build()
        .unwrap();
    let waiter = tokio::spawn(async move { silent.acquire("x", AcquireOptions::default()).await });
    until_waiters(&holder, "x", 1).await;
    relay.cut();
    // Bounded polling for the event, not a synchronisation sleep. The
    // bound is well under the defaults' 30 s, so flags that were ignored
    // would fail here.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = holder.status().await.expect("status");
        let lock = status.locks.iter().find(|l| l.name == "x").expect("x");
        if lock.waiters.iter().all(|w| w.detached) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the silent client's waiter is still attached 15 s after it fell silent: {lock:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waiter.abort();
    holder.release(&grant).await.unwrap();
}

/// `--max-connections 1`: a second client's connection is refused (gRPC
/// closes it on accept, QUIC refuses the handshake) while the first is
/// served, and is served once the first has gone.
async fn connections_past_max_connections_are_refused_until_one_closes(wire: Wire) {
    let server = ServerProcess::start_over(wire, &["--max-connections", "1"]);
    let first = client(&server, 1);
    first
        .status()
        .await
        .expect("the first connection is served");
    let second = server
        .client_builder(2)
        .retry_budget(Duration::from_millis(300))
        .build()
        .unwrap();
    let refused = second.status().await;
    assert!(
        refused.is_err(),
        "a second connection was served past --max-connections 1"
    );
    first
        .status()
        .await
        .expect("the first connection is still served");
    drop(first);
    // Bounded polling for the slot to come free, not a synchronisation sleep.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while let Err(e) = second.status().await {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot is still taken 30 s after the first client went: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--max-inflight-request-bytes 8MiB`: sixteen 1 MiB appends sent at once
/// do not all fit (appends may fill 6 MiB of it); the server refuses the
/// rest `RESOURCE_EXHAUSTED`, the client retries them with backoff, and
/// every append lands exactly once. (How many are refused depends on how
/// the transport interleaves the uploads, so it is not asserted; the
/// server's warning shows refusals on every wire, and the transport tests
/// show a refusal deterministically.)
async fn appends_past_the_request_budget_land_once_through_retries(wire: Wire) {
    let server = ServerProcess::start_over(wire, &["--max-inflight-request-bytes", "8MiB"]);
    let c1 = client(&server, 1);
    let grant = c1.acquire("", AcquireOptions::default()).await.unwrap();
    let appends = (0..16u8).map(|i| {
        let (c1, grant) = (&c1, &grant);
        async move {
            let content = vec![b'a' + i; 1 << 20];
            c1.append(grant, &format!("file_{i}"), content).await
        }
    });
    for (i, appended) in futures_util::future::join_all(appends)
        .await
        .into_iter()
        .enumerate()
    {
        appended.unwrap_or_else(|e| panic!("append {i}: {e}"));
    }
    c1.release(&grant).await.unwrap();
    for i in 0..16u8 {
        let file = server.file(&format!("file_{i}"));
        assert_eq!(file.len(), 1 << 20, "file_{i}");
        assert!(file.bytes().all(|b| b == b'a' + i), "file_{i}");
    }
}

/// Whether the server closes `conn` within `bound`: whatever it sends first
/// (its HTTP/2 settings) is read and dropped, and the end is EOF or a reset.
async fn closed_within(conn: &mut (impl tokio::io::AsyncRead + Unpin), bound: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let closed = async {
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(bound, closed).await.is_ok()
}

/// A connection that never sends its HTTP/2 preface (in plain text no byte
/// at all; over TLS, nothing after the handshake) is closed once it is overdue (`--keepalive-ms` +
/// `--keepalive-timeout-ms`), so idle sockets cannot hold the connection
/// slots for ever; a client that set its connection up is served, and may
/// then stay idle, as with the original Go server.
async fn a_connection_never_set_up_is_closed(wire: Wire) {
    let server = ServerProcess::start_over(
        wire,
        &["--keepalive-ms", "100", "--keepalive-timeout-ms", "2000"],
    );
    let c1 = client(&server, 1);
    c1.status().await.expect("a client that calls is served");
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    // Over TLS the handshake is done, and then nothing: the HTTP/2 preface
    // never comes.
    let mut idle: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match wire {
        Wire::GrpcTls => {
            let ca = std::fs::read(server.ca().unwrap()).unwrap();
            let config = dlm::transport::tls::client_rustls_config(&ca, None, &[b"h2"]).unwrap();
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            Box::new(connector.connect(name, tcp).await.expect("TLS handshake"))
        }
        _ => Box::new(tcp),
    };
    // The bound is under the defaults' 30 s.
    let closed = closed_within(&mut idle, Duration::from_secs(15)).await;
    assert!(
        closed,
        "a connection that never set up is still open 15 s later"
    );
    c1.status()
        .await
        .expect("clients that call are still served");
}

/// A client that sets its connection up and then makes no call (a Go
/// client dialled with `WithBlock` at start-up) keeps it past the set-up
/// deadline, as with the original Go server: only connections that never
/// send the HTTP/2 preface are closed.
async fn a_set_up_connection_may_stay_idle_past_the_deadline(wire: Wire) {
    let server = ServerProcess::start_over(
        wire,
        &["--keepalive-ms", "100", "--keepalive-timeout-ms", "2000"],
    );
    let relay = Relay::start(wire, server.addr()).await;
    let mut endpoint = tonic::transport::Endpoint::from_shared(match wire {
        Wire::GrpcTls => format!("https://{}", relay.addr()),
        _ => format!("http://{}", relay.addr()),
    })
    .unwrap();
    if wire == Wire::GrpcTls {
        let ca = std::fs::read(server.ca().unwrap()).unwrap();
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("127.0.0.1");
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    // Connected and set up (TLS, preface, settings), and no call.
    let channel = endpoint.connect().await.expect("connects");
    // The relay's connection to the server exists before the one below, so
    // the server accepts it first.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while relay.connections() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never connected"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A connection accepted after it that never sets up is closed once its
    // deadline has passed, so the idle one's deadline has passed too.
    let mut never = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let closed = closed_within(&mut never, Duration::from_secs(15)).await;
    assert!(closed, "the never-set-up connection is still open");
    let mut grpc = dlm::proto::lock_service_client::LockServiceClient::new(channel);
    grpc.lock_status(dlm::proto::StatusArgs {})
        .await
        .expect("the idle connection still serves");
    assert_eq!(
        relay.connections(),
        1,
        "the server closed the idle, set-up connection (the client had to reconnect)"
    );
}

mod a_set_up_connection_may_stay_idle_past_the_deadline {
    #[tokio::test]
    async fn grpc() {
        super::a_set_up_connection_may_stay_idle_past_the_deadline(crate::common::Wire::Grpc).await
    }
    #[tokio::test]
    async fn grpc_tls() {
        super::a_set_up_connection_may_stay_idle_past_the_deadline(crate::common::Wire::GrpcTls)
            .await
    }
}

mod a_connection_never_set_up_is_closed {
    #[tokio::test]
    async fn grpc() {
        super::a_connection_never_set_up_is_closed(crate::common::Wire::Grpc).await
    }
    #[tokio::test]
    async fn grpc_tls() {
        super::a_connection_never_set_up_is_closed(crate::common::Wire::GrpcTls).await
    }
}

over_every_wire!(
    acquire_two_appends_release_reads_aa,
    connections_past_max_connections_are_refused_until_one_closes,
    appends_past_the_request_budget_land_once_through_retries,
    a_waiter_whose_client_falls_silent_is_cut_off_by_keepalive,
    kill9_with_the_lock_free_keeps_contents,
    kill9_with_the_lock_held_keeps_the_grant_and_its_staged_append,
    sigterm_with_a_waiter_queued_stops_at_once_and_keeps_the_grant,
    six_clients_queued_on_one_lock_are_granted_in_order,
    a_client_that_stops_renewing_loses_the_lock_to_the_next_waiter,
    a_guard_keeps_its_lease_alive_and_releases,
    bad_input_gets_a_clear_error_and_changes_nothing,
    a_corrupt_record_in_the_middle_stops_the_start_naming_file_and_offset,
    a_torn_last_record_is_dropped_and_nothing_acknowledged_is_lost,
    the_readme_walkthrough_works_from_the_cli,
    a_client_killed_in_the_middle_of_an_acquire_loses_its_locks_by_their_leases,
);

/// A server refused because another one runs on its directory writes
/// nothing there: not even the development certificates `--tls` would make
/// (which another start could then mistake for the running server's).
#[test]
fn a_server_refused_for_a_locked_directory_leaves_it_untouched() {
    let server = ServerProcess::start(&[]);
    let tls_dir = server.data_dir().join("state/tls");
    assert!(!tls_dir.exists(), "a plain-text server made certificates");
    let refused = std::process::Command::new(dlm_bin())
        .args(["server", "--listen", "127.0.0.1:0", "--tls", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the second server started");
    assert!(
        stderr.contains("in use by another dlm server"),
        "stderr: {stderr}"
    );
    assert!(
        !tls_dir.exists(),
        "the refused server wrote certificates into the running server's directory"
    );
}

/// Flags that cannot work are refused before the data directory is
/// touched: nothing is created for a server that never starts.
#[test]
fn bad_server_flags_create_no_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for flags in [
        &["--max-connections", "0"][..],
        &["--keepalive-ms", "0"][..],
        &["--client-ca", "ca.pem"][..],
    ] {
        let out = std::process::Command::new(dlm_bin())
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(flags)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flags:?} started a server");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("invalid configuration"),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!data.exists(), "{flags:?} created the data directory");
    }
}
