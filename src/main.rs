//! `dlm`: the server and the client commands. Thin: parse flags, set up
//! tracing, bind, hand over to the library.

mod cli;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use dlm::server::ServerConfig;

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
    /// Run the lock server (gRPC).
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
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("dlm: cannot listen on {}: {e}", config.listen);
            return 1;
        }
    };
    let node = match dlm::server::Node::start_fs(&config) {
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
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // Printed once recovery is done. Tests and scripts read this line to learn
    // the port when --listen used port 0.
    println!(
        "dlm: serving gRPC on {addr}, data in {}",
        config.data_dir.display()
    );
    match dlm::server::serve(listener, node, shutdown_signal()).await {
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
