//! quinn over turmoil, on its own: a dlm server (the real `recover`, `Node`
//! with its writer as a task, and the QUIC transport's `serve`, on sim's
//! in-memory disk) and clients of the real client library over QUIC, on
//! turmoil's simulated UDP with latency jitter and packet loss, which QUIC
//! repairs. Two runs of a seed must give the same packet schedule and the
//! same history. `DLM_SIM_QUIC_SEEDS=N` runs N seeds in each test.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dlm::client::{AcquireOptions, Client, Transport};
use dlm::core::Plants;
use dlm::server::{recover, Clock, Node, ServerConfig, WriterMode};
use dlm::transport::quic::server::{serve, Limits};
use dlm_sim::disk::SimDisk;
use dlm_sim::quic_turmoil::{PacketLog, PacketSummary, SimQuic, Tap};

const PORT: u16 = 50051;
const CLIENTS: i32 = 3;
const ROUNDS: u32 = 4;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn now_ms() -> u64 {
    turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64)
}

/// What a run did.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    packets: PacketSummary,
    /// Each client's operations as they completed, with simulated times.
    events: Vec<String>,
    /// `file_0` at the end.
    file: Vec<u8>,
}

type Events = Arc<Mutex<Vec<String>>>;

fn note(events: &Events, line: String) {
    events
        .lock()
        .unwrap()
        .push(format!("{:>6} {line}", now_ms()));
}

async fn server(quic: SimQuic, disk: SimDisk, tap: Tap) -> turmoil::Result {
    let config = ServerConfig::new("/data");
    let clock = Clock::start();
    let recovered = recover(
        &config,
        Box::new(disk.dir("data")),
        Box::new(disk.dir("state")),
        [7; 32],
        clock.now(),
        Plants::default(),
    )?;
    let node = Node::start(&config, recovered, clock, WriterMode::Task);
    let endpoint = quic.server_endpoint(PORT, 1, tap).await?;
    let limits = Limits::for_max_append(config.max_append_bytes);
    serve(endpoint, node.handle(), limits, std::future::pending()).await;
    Ok(())
}

async fn client(id: i32, seed: u64, quic: SimQuic, tap: Tap, events: Events) -> turmoil::Result {
    let endpoint = SimQuic::client_endpoint(seed ^ id as u64, tap).await?;
    let client = Client::builder(id)
        .endpoint(format!("{}:{PORT}", turmoil::lookup("server")))
        .transport(Transport::Quic(quic.client_tls()))
        .quic_endpoint(endpoint)
        .seed(seed.wrapping_add(id as u64))
        .attempt_timeout(ms(1_000))
        .wait_attempt_timeout(ms(3_000))
        .retry_budget(ms(60_000))
        .backoff(ms(20), ms(500))
        .build()?;
    client.init().await?;
    for round in 0..ROUNDS {
        let grant = client.acquire("", AcquireOptions::default()).await?;
        note(&events, format!("c{id} acquired fence {}", grant.fence));
        for part in 0..2 {
            let marker = format!("[{id}.{round}.{part}]");
            client.append(&grant, "file_0", marker.into_bytes()).await?;
        }
        client.release(&grant).await?;
        note(&events, format!("c{id} released fence {}", grant.fence));
    }
    Ok(())
}

/// One run of `seed` with turmoil's `fail_rate` on every link.
fn run(seed: u64, fail_rate: f64) -> Run {
    let quic = SimQuic::new(seed, "server");
    let log = Arc::new(PacketLog::default());
    let tap = |host: &str| Tap {
        host: host.into(),
        silent: None,
        log: Some(log.clone()),
    };
    let events: Events = Arc::default();
    let disk = SimDisk::default();
    let mut sim = turmoil::Builder::new()
        .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(600))
        .tick_duration(ms(1))
        .min_message_latency(ms(1))
        .max_message_latency(ms(40))
        .fail_rate(fail_rate)
        .build();
    {
        let (quic, disk, tap) = (quic.clone(), disk.clone(), tap("server"));
        sim.host("server", move || {
            server(quic.clone(), disk.clone(), tap.clone())
        });
    }
    for id in 1..=CLIENTS {
        let future = client(
            id,
            seed,
            quic.clone(),
            tap(&format!("client{id}")),
            events.clone(),
        );
        sim.client(format!("client{id}"), future);
    }
    if let Err(e) = sim.run() {
        panic!("seed {seed}: {e}");
    }
    let events = events.lock().unwrap().clone();
    Run {
        packets: log.summary(),
        events,
        file: disk.read("data", "file_0"),
    }
}

/// Every critical section is in the file whole and once, and fences only
/// go up.
fn check(seed: u64, run: &Run) {
    let text = String::from_utf8(run.file.clone()).unwrap();
    let markers: Vec<&str> = text
        .split_inclusive(']')
        .map(|m| m.trim_start_matches('['))
        .collect();
    assert_eq!(
        markers.len(),
        (CLIENTS as u32 * ROUNDS * 2) as usize,
        "seed {seed}: {text}"
    );
    for pair in markers.chunks(2) {
        let first = pair[0]
            .strip_suffix("0]")
            .expect("a section starts with part 0");
        let second = pair[1].strip_suffix("1]").expect("and ends with part 1");
        assert_eq!(
            first, second,
            "seed {seed}: a torn critical section in {text}"
        );
    }
    let mut fences: Vec<u64> = run
        .events
        .iter()
        .filter_map(|e| e.split("acquired fence ").nth(1))
        .map(|f| f.parse().unwrap())
        .collect();
    let acquired = fences.clone();
    fences.sort_unstable();
    fences.dedup();
    assert_eq!(
        fences, acquired,
        "seed {seed}: fences go up: {:?}",
        run.events
    );
}

/// `DLM_SIM_QUIC_SEEDS` (default `default`) seeds.
fn seeds(default: u64) -> u64 {
    std::env::var("DLM_SIM_QUIC_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn acquire_append_release_over_quic_on_a_lossy_network() {
    let seeds = seeds(8);
    let mut lost = 0;
    for seed in 0..seeds {
        // From 1 % to 8 % of messages break their link, losing what is in
        // flight on it. (Beyond that, QUIC's backed-off probe timeouts stall
        // a client for longer than its 30 s lease now and then.)
        let run = run(seed, 0.01 + 0.01 * (seed % 8) as f64);
        check(seed, &run);
        assert!(run.packets.sent > 100, "seed {seed}: {:?}", run.packets);
        lost += run.packets.sent - run.packets.received;
    }
    assert!(lost > 0, "the network lost nothing: QUIC repaired nothing");
}

#[test]
fn the_same_seed_twice_gives_the_same_packet_schedule_and_history() {
    for seed in 0..seeds(3) {
        let a = run(seed, 0.05);
        let b = run(seed, 0.05);
        assert_eq!(a, b, "seed {seed}");
    }
    assert_ne!(run(1, 0.05).packets.hash, run(2, 0.05).packets.hash);
}
