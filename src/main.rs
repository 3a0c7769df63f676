//! `dlm`: the server and the client commands. Thin: parse flags, set up
//! tracing, bind, hand over to the library.

mod cli;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use dlm::server::ServerConfig;

/// mimalloc rather than glibc's malloc: the server allocates and frees
/// small blocks on several threads for every call (see `Cargo.toml`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// dlm — a distributed lock manager: named locks under leases, FIFO waiters,
/// fencing numbers, and atomic critical sections over file_0 … file_99.
#[derive(Parser)]
#[command(name = "dlm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the lock server: gRPC (plain text, or TLS with --tls) and, with
    /// --listen-quic, QUIC.
    Server(ServerConfig),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dlm: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Command::Server(config) => serve(config).await,
            Command::Client(command) => cli::run(command).await,
        }
    });
    std::process::exit(code);
}

async fn serve(config: ServerConfig) -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Flags first, touching nothing; then the directory: a server refused
    // because another one runs on it must write nothing there (binding
    // makes the development certificates).
    if let Err(e) = dlm::server::Bound::check(&config) {
        eprintln!("dlm: {e}");
        return 1;
    }
    let directories = match dlm::server::Directories::lock(&config) {
        Ok(directories) => directories,
        Err(e) => {
            eprintln!("dlm: cannot start: {e}");
            return 1;
        }
    };
    let bound = match dlm::server::Bound::bind(&config).await {
        Ok(bound) => bound,
        Err(e) => {
            eprintln!("dlm: {e}");
            return 1;
        }
    };
    let node = match dlm::server::Node::start_in(&config, directories) {
        Ok((node, report)) => {
            tracing::info!(
                records = report.records_replayed,
                torn_bytes = report.torn_bytes,
                grants = report.grants,
                "recovered"
            );
            node
        }
        Err(e) => {
            eprintln!("dlm: cannot start: {e}");
            return 1;
        }
    };
    // Printed once recovery is done, all at once. Tests and scripts read the
    // first line (`dlm: serving gRPC on ADDR, data in DIR`) to learn the port
    // when --listen used port 0, and the lines after it for QUIC and the CA.
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        let _ = stdout
            .write_all(bound.banner(&config.data_dir).as_bytes())
            .and_then(|()| stdout.flush());
    }
    match dlm::server::serve_bound(bound, node, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("stopped");
            0
        }
        Err(e) => {
            eprintln!("dlm: {e}");
            1
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
