//! Crash loop: several clients run critical sections on the default lock
//! while the server is killed with SIGKILL at random moments and restarted.
//! At the end every acknowledged release's appends are in the files exactly
//! once, nothing from a grant that was not released is, an unacknowledged
//! release is all-or-nothing, and the fencing numbers the clients saw
//! strictly increase across the whole run. It runs over every transport.

// Only the core is barred from spawning tasks (clippy.toml); tests may.
#![allow(clippy::disallowed_methods)]

#[macro_use]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{ServerProcess, Wire};
use dlm::client::{AcquireOptions, Client, Error};

const CLIENTS: i32 = 4;
const KILLS: usize = 22;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The release was acknowledged: the appends must be there once.
    Committed,
    /// The server said the grant was gone: the appends must not be there.
    NotCommitted,
    /// No answer: all of them or none.
    Unknown,
}

/// A grant as its client saw it.
#[derive(Debug, Clone, Copy)]
struct SeenGrant {
    client: i32,
    fence: u64,
    /// The client's previous grant was released for sure; a grant it only
    /// abandoned (append failed, release unknown) is still its own, and
    /// acquiring again gives that same grant back (same token and fence).
    previous_released: bool,
}

#[derive(Debug)]
struct GrantRecord {
    markers: Vec<(String, String)>,
    outcome: Outcome,
}

struct Shared {
    stop: AtomicBool,
    /// Acknowledged releases so far, and a wake-up for each: the fault
    /// injector waits for one between two kills, so progress does not
    /// depend on how fast the machine restarts the server.
    commits: AtomicUsize,
    progress: tokio::sync::Notify,
    /// Grants in the order they were acknowledged.
    fences: Mutex<Vec<SeenGrant>>,
    grants: Mutex<Vec<GrantRecord>>,
}

async fn run_client(client: Client, shared: Arc<Shared>) {
    let id = client.client_id();
    let mut n = 0;
    let mut previous_released = true;
    while !shared.stop.load(Ordering::SeqCst) {
        n += 1;
        let grant = match client.acquire("", AcquireOptions::default()).await {
            Ok(grant) => grant,
            Err(e) => panic!("client {id}: acquire failed: {e}"),
        };
        shared.fences.lock().unwrap().push(SeenGrant {
            client: id,
            fence: grant.fence,
            previous_released,
        });
        let mut markers = Vec::new();
        let mut appended_all = true;
        for k in 0..2 {
            let file = format!("file_{}", (id as usize + n + k) % 5);
            let marker = format!("<{id}.{n}.{k}@{}>", grant.fence);
            match client.append(&grant, &file, marker.clone()).await {
                Ok(()) => markers.push((file, marker)),
                Err(e) => {
                    // Ambiguous or refused: abandon the grant (never released).
                    markers.push((file, marker));
                    appended_all = false;
                    eprintln!("client {id}: append failed: {e}");
                    break;
                }
            }
        }
        let outcome = if appended_all {
            match client.release(&grant).await {
                Ok(()) => {
                    shared.commits.fetch_add(1, Ordering::SeqCst);
                    shared.progress.notify_waiters();
                    Outcome::Committed
                }
                Err(Error::LeaseLost | Error::NotHeld) => Outcome::NotCommitted,
                Err(e) => {
                    eprintln!("client {id}: release unknown: {e}");
                    Outcome::Unknown
                }
            }
        } else {
            Outcome::NotCommitted
        };
        previous_released = outcome != Outcome::Unknown && appended_all;
        shared
            .grants
            .lock()
            .unwrap()
            .push(GrantRecord { markers, outcome });
    }
}

async fn crash_loop_keeps_every_acknowledged_release_exactly_once(wire: Wire) {
    // Frequent snapshots (written on a thread of their own while the log
    // goes on in the next generation), so that kills land mid-snapshot too.
    let mut server =
        ServerProcess::start_over(wire, &["--lease-ms", "5000", "--snapshot-every", "32"]);
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        commits: AtomicUsize::new(0),
        progress: tokio::sync::Notify::new(),
        fences: Mutex::new(Vec::new()),
        grants: Mutex::new(Vec::new()),
    });
    let clients: Vec<_> = (1..=CLIENTS)
        .map(|id| tokio::spawn(run_client(server.client(id), shared.clone())))
        .collect();

    // Fault injection: kill at pseudo-random moments (a fixed LCG, so the
    // schedule of delays is the same every run), each after at least one
    // release was acknowledged since the previous kill (a slow machine gets
    // the same number of commits to check, later).
    let mut lcg: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..KILLS {
        let before = shared.commits.load(Ordering::SeqCst);
        lcg = lcg
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = 10 + (lcg >> 33) % 90;
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        loop {
            let notified = shared.progress.notified();
            if shared.commits.load(Ordering::SeqCst) > before {
                break;
            }
            tokio::time::timeout(std::time::Duration::from_secs(60), notified)
                .await
                .expect("a release is acknowledged between two kills");
        }
        tokio::task::block_in_place(|| server.restart());
    }
    shared.stop.store(true, Ordering::SeqCst);
    for client in clients {
        tokio::time::timeout(std::time::Duration::from_secs(120), client)
            .await
            .expect("clients finish after the kills stop")
            .expect("client task");
    }

    let files: Vec<String> = (0..5).map(|i| server.file(&format!("file_{i}"))).collect();
    let count = |marker: &str| {
        files
            .iter()
            .map(|f| f.matches(marker).count())
            .sum::<usize>()
    };
    let grants = shared.grants.lock().unwrap();
    let mut committed = 0;
    let mut all_markers = 0;
    for grant in grants.iter() {
        let seen: Vec<usize> = grant.markers.iter().map(|(_, m)| count(m)).collect();
        all_markers += seen.iter().sum::<usize>();
        match grant.outcome {
            Outcome::Committed => {
                committed += 1;
                assert!(
                    seen.iter().all(|&c| c == 1),
                    "acknowledged release not exactly once: {grant:?} {seen:?}"
                );
            }
            Outcome::NotCommitted => {
                assert!(
                    seen.iter().all(|&c| c == 0),
                    "unreleased grant visible: {grant:?} {seen:?}"
                )
            }
            Outcome::Unknown => assert!(
                seen.iter().all(|&c| c == 0) || seen.iter().all(|&c| c == 1),
                "unacknowledged release not all-or-nothing: {grant:?} {seen:?}"
            ),
        }
    }
    // Nothing in the files that no grant wrote.
    let total_markers: usize = files.iter().map(|f| f.matches('<').count()).sum();
    assert_eq!(
        total_markers, all_markers,
        "unknown bytes in the files: {files:?}"
    );
    // Within each file, commits appear in fencing order.
    for file in &files {
        let fences: Vec<u64> = file
            .split('>')
            .filter_map(|m| m.split('@').nth(1))
            .map(|f| f.parse().unwrap())
            .collect();
        assert!(fences.windows(2).all(|w| w[0] <= w[1]), "{fences:?}");
    }
    // Fencing numbers only go up; the one repeat allowed is a client
    // acquiring again while its abandoned grant is still its own.
    let fences = shared.fences.lock().unwrap();
    for w in fences.windows(2) {
        let (a, b) = (w[0], w[1]);
        let own_grant_again = b.fence == a.fence && b.client == a.client && !b.previous_released;
        assert!(
            b.fence > a.fence || own_grant_again,
            "fencing numbers went backwards or repeated: {a:?} then {b:?} in {fences:?}"
        );
    }
    assert!(
        committed >= 10,
        "too little progress to mean anything: {committed} commits"
    );
    // Snapshots were taken (and survived the kills): the newest snapshot's
    // generation is past the first.
    let state = server.state_files();
    let generation = state
        .iter()
        .filter_map(|n| n.strip_prefix("snap-")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(generation > 0, "no snapshot was taken: {state:?}");
    eprintln!(
        "crash loop over {wire:?}: {KILLS} kills, {} grants, {committed} committed, snapshot generation {generation}",
        grants.len()
    );
}

over_every_wire!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    crash_loop_keeps_every_acknowledged_release_exactly_once
);
