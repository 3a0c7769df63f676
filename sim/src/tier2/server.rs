//! The server host: the production shell on turmoil.
//!
//! Each boot (first start, `bounce`, restart after a power loss) runs
//! [`dlm::server::recover`] over the host's simulated disk with a token seed
//! from the simulation's RNG, starts a [`Node`] with its writer as a task,
//! and serves [`GrpcService`] with tonic on turmoil TCP (or, over QUIC,
//! dlm's QUIC transport on turmoil UDP; see `quic`) until the node fails
//! (a power cut makes the disk refuse; the driver then cuts the power). The
//! core's outputs are observed as they are made and fed to the history.

use std::sync::Arc;

use dlm::core::records::Change;
use dlm::core::types::Reply;
use dlm::core::{Output, Plants};
use dlm::server::{recover, Clock, Node, ServerConfig, WriterMode};
use dlm::transport::grpc::GrpcService;

use super::net::Incoming;
use super::storage::{self, TurmoilDir};
use super::{now_ms, quic, Shared, Transport};
use crate::Plant;

/// Data files in `/data`, the log and snapshots in `/data/state`.
const DATA_DIR: &str = "/data";
const STATE_DIR: &str = "/data/state";

/// The server's configuration: short leases, frequent snapshots.
fn config() -> ServerConfig {
    let mut config = ServerConfig::new(DATA_DIR);
    config.lease_ms = 1_000;
    config.snapshot_every = 25;
    // Reads wait for shares of a budget smaller than most files: a share
    // that a reply cut off by a fault kept would hold up the checker's reads.
    config.max_read_reply_bytes = 512;
    // Steps whose record passes a few hundred bytes are logged as runs of
    // their changes, which a torn write may cut between.
    config.split_record_bytes = 64;
    // Two blocks of zeros ahead: every few snapshots' logs grow past it.
    config.log_prealloc = 8192;
    config
}

fn plants(plant: Option<Plant>) -> Plants {
    let mut plants = Plants::default();
    match plant {
        Some(Plant::DedupOff) => plants.dedup_off = true,
        Some(Plant::FloorsOff) => plants.floors_off = true,
        Some(Plant::LifoGrants) => plants.lifo_grants = true,
        Some(Plant::StaleAppends) => plants.stale_appends = true,
        Some(Plant::NoRearm) => plants.no_rearm = true,
        Some(Plant::LateGrants) => plants.late_grants = true,
        // Planted in the disk: fsyncs of the log do nothing.
        Some(Plant::ReplyBeforeFsync) | None => {}
    }
    plants
}

/// One boot of the server, until the host is crashed or bounced.
pub(crate) async fn run(shared: Arc<Shared>) -> turmoil::Result {
    let (torn, lost) = storage::boot(&shared);
    let (seed, plant, incarnation, transport, dedup_capacity) = shared.with(|s| {
        s.server_incarnation += 1;
        s.faults.torn_writes += torn;
        if torn + lost > 0 {
            s.faults.crash_unsynced_lost += 1;
        }
        (
            s.server_rng.seed32(),
            s.plant,
            s.server_incarnation,
            s.transport,
            s.dedup_capacity,
        )
    });
    let mut config = config();
    config.dedup_capacity = dedup_capacity;
    config.max_detached_waiters = crate::rng::max_detached_waiters(dedup_capacity);
    let clock = Clock::start();
    let dirs = TurmoilDir::open(DATA_DIR, shared.clone())
        .and_then(|data| Ok((data, TurmoilDir::open(STATE_DIR, shared.clone())?)));
    shared.with(|s| s.disk.recovering = true);
    let recovered = dirs
        .map_err(dlm::server::ServerError::from)
        .and_then(|(data, state)| {
            recover(
                &config,
                Box::new(data),
                Box::new(state),
                seed,
                clock.now(),
                plants(plant),
            )
        });
    shared.with(|s| s.disk.recovering = false);
    let mut recovered = match recovered {
        Ok(recovered) => recovered,
        Err(e) => {
            let now = now_ms();
            shared.with(|s| {
                // A power cut aimed at the fsync that recovery makes is a
                // crash during recovery, not a failure to recover.
                if s.disk.fired.is_none() {
                    s.problems.push(format!(
                        "recovery failed at {now} (boot {incarnation}): {e}"
                    ));
                }
                s.log(|| format!("server boot {incarnation}: recovery stopped: {e}"));
            });
            std::future::pending::<()>().await;
            return Ok(());
        }
    };
    let grants = recovered.core.snapshot().grants;
    let report = recovered.report.clone();
    shared.with(|s| {
        s.history.on_recover(now_ms(), &grants);
        s.log(|| {
            format!(
                "server boot {incarnation}: {} records replayed, {} torn bytes cut, {} grants kept ({torn} unsynced writes torn, {lost} lost)",
                report.records_replayed, report.torn_bytes, report.grants
            )
        });
    });
    let observer = shared.clone();
    recovered.observer = Some(Box::new(move |_core_time, output: &Output| {
        let now = now_ms();
        observer.with(|s| {
            match output {
                Output::Persist(record) => {
                    for change in &record.changes {
                        s.history.on_change(now, change);
                        // The answer to a call with a request id, such as the
                        // renew that confirms a grant that came late.
                        if let Change::Answered(answer) = change {
                            s.client_answers.insert(answer.client, now);
                        }
                    }
                }
                Output::Trace(trace) => s.history.on_trace(now, trace),
                Output::Reply {
                    reply: Reply::Granted(grant),
                    ..
                } => {
                    s.grant_answers
                        .insert((grant.lock.to_string(), grant.fence.0), now);
                }
                Output::Write(_) | Output::Reply { .. } => {}
            }
            s.trace.log(now, format!("server {}", describe(output)));
        });
    }));
    let mut node = Node::start(&config, recovered, clock, WriterMode::Task);
    if transport == Transport::Quic {
        let failed = node.failed();
        let boot = shared.with(|s| s.server_rng.next_u64());
        let served = quic::serve(
            &shared,
            node.handle(),
            failed,
            boot,
            config.max_append_bytes,
        )
        .await;
        if let Err(e) = &served {
            shared.with(|s| s.problems.push(format!("the server cannot listen: {e}")));
        }
        let stopped = node.shutdown().await;
        shared
            .with(|s| s.log(|| format!("server stopped: served {served:?}, storage {stopped:?}")));
        std::future::pending::<()>().await;
        return Ok(());
    }
    let incoming = match Incoming::bind("server", shared.clone()).await {
        Ok(incoming) => incoming,
        Err(e) => {
            shared.with(|s| s.problems.push(format!("the server cannot listen: {e}")));
            std::future::pending::<()>().await;
            return Ok(());
        }
    };
    let failed = node.failed();
    // As the production server: its request limit and keepalive pings.
    let limits = dlm::transport::grpc::Limits::for_max_append(config.max_append_bytes);
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(limits.keepalive.interval))
        .http2_keepalive_timeout(Some(limits.keepalive.timeout))
        .add_service(GrpcService::new(node.handle()).into_server(&limits))
        .serve_with_incoming_shutdown(incoming, failed)
        .await;
    let stopped = node.shutdown().await;
    shared.with(|s| s.log(|| format!("server stopped: served {served:?}, storage {stopped:?}")));
    // Down until the driver cuts the power or restarts the process.
    std::future::pending::<()>().await;
    Ok(())
}

/// One output of the core, for the trace.
fn describe(output: &Output) -> String {
    match output {
        Output::Persist(record) => format!("persist {:?}", record.changes),
        Output::Write(write) => format!(
            "write file_{} at {} ({} bytes)",
            write.file.get(),
            write.offset,
            write.data.len()
        ),
        Output::Reply { call, reply } => format!("reply #{} {reply:?}", call.0),
        Output::Trace(trace) => format!("{trace:?}"),
    }
}
