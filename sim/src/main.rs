//! `dlm-sim`: runs sweeps of simulated seeds and replays one with a trace.
//!
//! ```text
//! cargo run --release -p dlm-sim -- --tier 1 --seeds 100000 [--from S] [--plant NAME] [--threads N]
//! cargo run --release -p dlm-sim -- --tier 1 --seed S --trace     # replay one seed, full trace
//! cargo run --release -p dlm-sim -- --tier 2 --seeds 1000          # real code on turmoil
//! cargo run --release -p dlm-sim -- --tier 2 --transport quic --seeds 500   # … over QUIC
//! cargo run --release -p dlm-sim -- --list-plants
//! ```
//!
//! The last line of a sweep is `N passed, M failed`; the exit code is non-zero
//! if any seed failed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use dlm_sim::tier2::Transport;
use dlm_sim::{tier1, tier2, Faults, Plant, RunResult};

struct Args {
    tier: u8,
    seeds: u64,
    from: u64,
    plant: Option<Plant>,
    trace: bool,
    threads: usize,
    /// Tier 2 only: how the hosts talk.
    transport: Transport,
}

fn usage() -> ! {
    eprintln!(
        "usage: dlm-sim [--tier 1|2] [--transport grpc|quic] [--seeds N] [--from S] [--seed S --trace] [--plant NAME] [--threads N] | --list-plants"
    );
    std::process::exit(2);
}

fn parse() -> Args {
    let mut args = Args {
        tier: 1,
        seeds: 1000,
        from: 0,
        plant: None,
        trace: false,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        transport: Transport::Grpc,
    };
    let mut transport_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--tier" => args.tier = value().parse().unwrap_or_else(|_| usage()),
            "--seeds" => args.seeds = value().parse().unwrap_or_else(|_| usage()),
            "--from" => args.from = value().parse().unwrap_or_else(|_| usage()),
            "--seed" => {
                args.from = value().parse().unwrap_or_else(|_| usage());
                args.seeds = 1;
            }
            "--trace" => args.trace = true,
            "--threads" => args.threads = value().parse().unwrap_or_else(|_| usage()),
            "--plant" => {
                let name = value();
                args.plant = Some(Plant::by_name(&name).unwrap_or_else(|| {
                    eprintln!("unknown plant {name:?}; see --list-plants");
                    std::process::exit(2)
                }))
            }
            "--transport" => {
                let name = value();
                args.transport = Transport::by_name(&name).unwrap_or_else(|| {
                    eprintln!("unknown transport {name:?}: grpc or quic");
                    std::process::exit(2)
                });
                transport_given = true;
            }
            "--list-plants" => {
                for (name, plant) in Plant::ALL {
                    println!("{name:20} {plant:?}");
                }
                std::process::exit(0);
            }
            _ => usage(),
        }
    }
    if !(1..=2).contains(&args.tier) {
        eprintln!("there is no tier {}", args.tier);
        std::process::exit(2);
    }
    if args.tier == 1 && transport_given {
        eprintln!(
            "tier 1 has no transport (its network carries messages); --transport is for tier 2"
        );
        std::process::exit(2);
    }
    if args.tier == 1 && args.plant == Some(Plant::LateGrants) {
        eprintln!(
            "late-grants is planted in the server's engine, which tier 1 models rather than runs: use --tier 2"
        );
        std::process::exit(2);
    }
    args
}

fn run_one(args: &Args, seed: u64) -> RunResult {
    match args.tier {
        1 => tier1::run_seed(seed, args.plant, args.trace),
        _ => tier2::run_seed_over(args.transport, seed, args.plant, args.trace),
    }
}

fn main() {
    let args = parse();
    // Wall-clock time for the seeds/s figure only; no simulated path reads it.
    #[allow(clippy::disallowed_methods)]
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let totals = Mutex::new((Faults::default(), 0u64, Vec::<RunResult>::new()));
    std::thread::scope(|scope| {
        for _ in 0..args.threads.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.seeds {
                    return;
                }
                let result = run_one(&args, args.from + i);
                let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
                totals.0.add(&result.faults);
                if result.violations.is_empty() {
                    totals.1 += 1;
                } else {
                    totals.2.push(result);
                }
            });
        }
    });
    let (faults, passed, mut failed) = totals.into_inner().unwrap_or_else(|e| e.into_inner());
    failed.sort_by_key(|r| r.seed);
    let elapsed = started.elapsed().as_secs_f64();
    // The flags that replay a seed besides --tier and --seed.
    let transport = match args.transport {
        Transport::Quic => " --transport quic",
        Transport::Grpc => "",
    };
    let plant = args
        .plant
        .map(|p| format!("{transport} --plant {}", p.name()))
        .unwrap_or_else(|| transport.to_owned());
    if args.trace && args.seeds == 1 {
        let result = run_one(&args, args.from);
        for line in &result.trace {
            println!("{line}");
        }
        println!("schedule hash {:016x}", result.hash);
        for v in &result.violations {
            println!("VIOLATION: {v}");
        }
    }
    for result in &failed {
        println!(
            "FAILED seed {} (tier {}{plant}): {} — replay: cargo run --release -p dlm-sim -- --tier {} --seed {}{plant} --trace",
            result.seed,
            args.tier,
            result.violations[0],
            args.tier,
            result.seed
        );
    }
    println!("{}", faults.report());
    println!(
        "tier {}{}: {} seeds in {elapsed:.1} s ({:.0} seeds/s, {} threads)",
        args.tier,
        if args.tier == 2 {
            format!(" over {}", args.transport.name())
        } else {
            String::new()
        },
        args.seeds,
        args.seeds as f64 / elapsed.max(1e-9),
        args.threads
    );
    println!("{} passed, {} failed", passed, failed.len());
    if !failed.is_empty() {
        std::process::exit(1);
    }
}
