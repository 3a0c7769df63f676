#![allow(clippy::disallowed_methods)]
//! `cargo bench --bench core [-- VARIANT…]`: the sans-IO `dlm::core::Core`
//! alone, driven in a tight loop on one thread — no network, no disk, no
//! clock reads inside the core: the ceiling of the state machine.
//!
//! A lock operation is one `Core::handle` call (an acquire or a release);
//! the driver builds the request the way a transport would (lock name and
//! request id are fresh `String`s) and drops the outputs, except the token
//! it needs for the release. Variants:
//!
//! - `uncontended-ids`: 10,000 clients, each on its own lock, with request ids
//!   (what the client library sends, so every answer is remembered for dedup);
//! - `uncontended-noids`: the same without request ids (no dedup records);
//! - `contended-ids`: 64 clients queued on one lock; every release hands the
//!   lock to the next waiter and the releaser queues again;
//! - `uncontended-ids+encode`: like the first, plus encoding every record the
//!   way the writer does (postcard + CRC32C frame), still no I/O.
//!
//! `DLM_BENCH_SECS` (default 3) and `DLM_BENCH_WARMUP_SECS` (default 1) set
//! the time per variant; free words filter the variants by substring.
//! `DLM_BENCH_OPS` stops each variant after that many lock operations in
//! all, warm-up included: a fixed amount of work, for counting instructions
//! under `valgrind --tool=callgrind` (e.g. `DLM_BENCH_OPS=400000
//! DLM_BENCH_WARMUP_SECS=0 DLM_BENCH_SECS=600`).

#[allow(dead_code)]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dlm::core::time::Time;
use dlm::core::types::{CallId, Reply, Request};
use dlm::core::{Core, CoreConfig, Input, Output};

use common::settings::Settings;
use common::{load_average, Machine};

/// The system allocator, counting allocations (and reallocations): the
/// bench reports heap allocations per lock operation, the driver's own
/// request building (two `String`s per op) included.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most lock operations per variant (the time bound comes first), unless
/// `DLM_BENCH_OPS` says otherwise.
const MAX_OPS: u64 = 2_000_000_000;

fn max_ops() -> u64 {
    std::env::var("DLM_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(MAX_OPS)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    UncontendedIds,
    UncontendedNoIds,
    ContendedIds,
    UncontendedIdsEncode,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::UncontendedIds,
        Variant::UncontendedNoIds,
        Variant::ContendedIds,
        Variant::UncontendedIdsEncode,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::UncontendedIds => "uncontended-ids",
            Variant::UncontendedNoIds => "uncontended-noids",
            Variant::ContendedIds => "contended-ids",
            Variant::UncontendedIdsEncode => "uncontended-ids+encode",
        }
    }
}

/// Feeds the core and keeps the time moving: one virtual millisecond per
/// thousand operations, so leases and timers behave as in a busy server.
struct Driver {
    core: Core,
    max_ops: u64,
    next_call: u64,
    ops: u64,
    request_ids: bool,
    next_request: u64,
    records: u64,
    /// Encode records like the writer (postcard + frame) into this buffer.
    encode: Option<Vec<u8>>,
    encoded_bytes: u64,
}

impl Driver {
    fn new(request_ids: bool, encode: bool) -> Driver {
        Driver {
            core: Core::new(CoreConfig::default(), [7; 32]),
            max_ops: max_ops(),
            next_call: 0,
            ops: 0,
            request_ids,
            next_request: 0,
            records: 0,
            encode: encode.then(|| Vec::with_capacity(2 << 20)),
            encoded_bytes: 0,
        }
    }

    /// One `Core::handle`; returns the outputs and the call id used.
    fn call(&mut self, request: Request) -> (CallId, Vec<Output>) {
        let id = CallId(self.next_call);
        self.next_call += 1;
        let request_id = if self.request_ids {
            // The client library's form, UUID#SEQ: each answer evicted
            // from the dedup table raises its (client, prefix) floor.
            self.next_request += 1;
            request_id(self.next_request)
        } else {
            String::new()
        };
        let now = Time::from_millis(self.ops / 1000);
        self.ops += 1;
        let outputs = self.core.handle(
            now,
            Input::Call {
                id,
                request_id,
                request,
            },
        );
        for output in &outputs {
            if let Output::Persist(record) = output {
                self.records += 1;
                if let Some(buf) = &mut self.encode {
                    let payload = postcard::to_allocvec(record).unwrap_or_default();
                    dlm::log::frame::encode(&payload, 0, buf);
                    if buf.len() > (1 << 20) {
                        self.encoded_bytes += buf.len() as u64;
                        buf.clear();
                    }
                }
            }
        }
        (id, outputs)
    }
}

/// `PREFIX#n`, built the way a transport hands an id over: one allocation
/// and a copy, no formatting machinery (`format!` cost the driver ~480
/// instructions per call, 8 % of the loop, which is not the core's work).
fn request_id(n: u64) -> String {
    const PREFIX: &str = "6f1c2e0a-5d3b-4f7e-9a2b-1c3d4e5f6a7b#";
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut id = String::with_capacity(PREFIX.len() + digits.len() - at);
    id.push_str(PREFIX);
    id.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
    id
}

fn granted_token(outputs: &[Output], call: CallId) -> Option<String> {
    outputs.iter().find_map(|o| match o {
        Output::Reply {
            call: c,
            reply: Reply::Granted(info),
        } if *c == call => Some(info.token.to_string()),
        _ => None,
    })
}

/// Acquire + release cycles, client `i` on lock `i`, round robin.
fn uncontended(driver: &mut Driver, until: Instant) {
    const LOCKS: usize = 10_000;
    let names: Vec<String> = (0..LOCKS).map(|i| format!("lock-{i}")).collect();
    let mut i = 0usize;
    while driver.ops < driver.max_ops {
        // Check the clock every 1024 cycles only.
        if i.is_multiple_of(1024) && Instant::now() >= until {
            break;
        }
        let k = i % LOCKS;
        let client = k as i32;
        let (call, outputs) = driver.call(Request::Acquire {
            client,
            lock: names[k].as_str().into(),
            wait: None,
            lease: None,
        });
        let token = granted_token(&outputs, call).expect("an uncontended acquire is granted");
        let (_, outputs) = driver.call(Request::Release {
            client,
            lock: names[k].as_str().into(),
            token,
        });
        assert!(
            matches!(
                outputs.last(),
                Some(Output::Reply {
                    reply: Reply::Done,
                    ..
                })
            ),
            "release refused"
        );
        i += 1;
    }
}

/// `WAITERS` clients on one lock: the holder releases (the core grants the
/// next waiter in the same step) and queues again.
fn contended(driver: &mut Driver, lock: &str, until: Instant) {
    const WAITERS: i32 = 64;
    let lock = lock.to_owned();
    let (call, outputs) = driver.call(Request::Acquire {
        client: 0,
        lock: lock.as_str().into(),
        wait: None,
        lease: None,
    });
    let mut holder = (0, granted_token(&outputs, call).expect("first acquire"));
    let mut queue: VecDeque<(i32, CallId)> = VecDeque::new();
    for client in 1..WAITERS {
        let (call, outputs) = driver.call(Request::Acquire {
            client,
            lock: lock.as_str().into(),
            wait: None,
            lease: None,
        });
        assert!(
            granted_token(&outputs, call).is_none(),
            "queued, not granted"
        );
        queue.push_back((client, call));
    }
    let mut i = 0u64;
    while driver.ops < driver.max_ops {
        if i.is_multiple_of(1024) && Instant::now() >= until {
            break;
        }
        let (client, token) = holder;
        let (_, outputs) = driver.call(Request::Release {
            client,
            lock: lock.as_str().into(),
            token,
        });
        let (next, next_call) = queue.pop_front().expect("a waiter");
        let token = granted_token(&outputs, next_call).expect("the next waiter is granted");
        holder = (next, token);
        let (call, outputs) = driver.call(Request::Acquire {
            client,
            lock: lock.as_str().into(),
            wait: None,
            lease: None,
        });
        assert!(
            granted_token(&outputs, call).is_none(),
            "queued, not granted"
        );
        queue.push_back((client, call));
        i += 1;
    }
}

fn run(variant: Variant, warmup: Duration, measure: Duration) -> serde_json::Value {
    let mut driver = match variant {
        Variant::UncontendedIds | Variant::ContendedIds => Driver::new(true, false),
        Variant::UncontendedNoIds => Driver::new(false, false),
        Variant::UncontendedIdsEncode => Driver::new(true, true),
    };
    let body = |driver: &mut Driver, lock: &str, until| match variant {
        Variant::ContendedIds => contended(driver, lock, until),
        _ => uncontended(driver, until),
    };
    body(&mut driver, "hot-warmup", Instant::now() + warmup);
    // Measure on the warmed core, whose dedup table is already full (at its
    // capacity) as in a long-running server.
    let (ops0, records0, bytes0) = (driver.ops, driver.records, driver.encoded_bytes);
    let allocations0 = ALLOCATIONS.load(Ordering::Relaxed);
    let start = Instant::now();
    body(&mut driver, "hot", start + measure);
    let secs = start.elapsed().as_secs_f64();
    let ops = driver.ops - ops0;
    let records = driver.records - records0;
    let bytes = driver.encoded_bytes - bytes0;
    let allocations_per_op =
        (ALLOCATIONS.load(Ordering::Relaxed) - allocations0) as f64 / ops.max(1) as f64;
    let ops_per_sec = ops as f64 / secs;
    println!(
        "| {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {} |",
        variant.name(),
        ops_per_sec,
        ops_per_sec / 2.0,
        1e9 / ops_per_sec,
        allocations_per_op,
        records as f64 / secs,
        if bytes > 0 {
            format!("{:.1}", bytes as f64 / secs / 1e6)
        } else {
            "–".to_owned()
        }
    );
    serde_json::json!({
        "variant": variant.name(),
        "secs": secs,
        "ops": ops,
        "ops_per_sec": ops_per_sec,
        "cycles_per_sec": ops_per_sec / 2.0,
        "ns_per_op": 1e9 / ops_per_sec,
        "allocations_per_op": allocations_per_op,
        "records_per_sec": records as f64 / secs,
        "encoded_mb_per_sec": bytes as f64 / secs / 1e6,
    })
}

fn main() {
    let settings = Settings::from_env_and_args();
    let machine = Machine::describe();
    println!("dlm core bench — {}", machine.line());
    println!(
        "one thread; {} s per variant after {} s warm-up; a lock operation = one Core::handle (acquire or release)",
        settings.secs, settings.warmup_secs
    );
    println!();
    println!(
        "| variant | lock ops/s | cycles/s | ns/op | allocations/op | records/s | encoded MB/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut results = Vec::new();
    for variant in Variant::ALL {
        // A word naming a variant exactly selects it alone; other words
        // select every variant whose name contains them.
        let exact = |w: &String| Variant::ALL.iter().any(|v| v.name() == w);
        let wanted = settings.unknown.is_empty()
            || settings
                .unknown
                .iter()
                .any(|w| variant.name() == w || (!exact(w) && variant.name().contains(w.as_str())));
        if wanted {
            results.push(run(variant, settings.warmup(), settings.measure()));
        }
    }
    println!();
    if let Some(ops) = results
        .iter()
        .find(|r| r["variant"] == "uncontended-ids")
        .and_then(|r| r["ops_per_sec"].as_f64())
    {
        println!(
            "target core alone ≥ 1,000,000 lock ops/s on one core: {ops:.0} (uncontended-ids): {}",
            if ops >= 1e6 { "MET" } else { "NOT MET" }
        );
    }
    println!("load at end: {}", load_average());
    let json = serde_json::json!({
        "bench": "core",
        "unix_time": common::report::unix_time(),
        "machine": machine,
        "settings": settings,
        "load_at_end": load_average(),
        "variants": results,
    });
    match common::report::write_json("core", &json) {
        Ok(path) => println!("results: {}", path.display()),
        Err(e) => println!("could not write results: {e}"),
    }
}
