//! The client commands of the `dlm` binary: `acquire`, `release`, `renew`,
//! `append`, `cat`, `status` and `hold`.
//!
//! Each command is one process: it builds a [`Client`], does one thing, and
//! turns the outcome into an exit code, with a one-line reason on stderr when
//! it fails. A grant outlives the `acquire` process through a grant file
//! (see `state.rs`), so that `acquire`, `append` and `release` can run as
//! separate processes with the same client id, as the original service's
//! scripts do. Protocol, retries and renewals belong to [`dlm::client`].
//!
//! This file: the clap definitions, exit statuses and the simple commands.
//! `cli/state.rs`: the grant files. `cli/hold.rs`: `dlm hold` and its child
//! process. `cli/table.rs`: the `dlm status` table.

mod hold;
mod state;
mod table;

use std::ffi::OsString;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use dlm::client::{AcquireOptions, Client, Error, Tls, Transport};
use state::SavedGrant;

/// Exit status: the command did what it was asked.
pub const EXIT_OK: i32 = 0;
/// Exit status: any other failure (bad request, server error, local files).
pub const EXIT_FAILED: i32 = 1;
/// Exit status: the lock is busy (held, or the wait ended).
pub const EXIT_BUSY: i32 = 3;
/// Exit status: the grant is gone (lease ran out, token stale, not held,
/// another client's, session closed).
pub const EXIT_LOST: i32 = 4;
/// Exit status: no server answered in time; the outcome is unknown.
pub const EXIT_UNAVAILABLE: i32 = 5;

const EXIT_CODES: &str = "\
Exit status: 0 done; 1 failed (bad request, server error, local files); \
2 usage; 3 lock busy (held, or the wait ended); 4 grant gone (lease ran out, \
token stale, not held); 5 no server answered (outcome unknown).";

const STATE_HELP: &str = "\
Grants are kept between processes in one file per client id and lock, \
client-<ID>.lock-<NAME>.grant, in the state directory: --state-dir, else \
$DLM_STATE_DIR, else $XDG_STATE_HOME/dlm, else ~/.local/state/dlm.";

/// The client commands; flattened into the binary's top-level commands.
#[derive(Subcommand, Debug)]
pub enum ClientCommand {
    /// Acquire a lock (waiting for it by default) and keep the grant in a
    /// grant file for append, renew and release. Prints the fencing number.
    #[command(after_help = format!("{STATE_HELP}\n\n{EXIT_CODES}"))]
    Acquire(AcquireArgs),
    /// Release a lock held under the grant file (or --token); the appends
    /// made under it become visible in the files.
    #[command(after_help = format!("{STATE_HELP}\n\n{EXIT_CODES}"))]
    Release(ReleaseArgs),
    /// Renew the lease of a lock held under the grant file (or --token).
    #[command(after_help = format!("{STATE_HELP}\n\n{EXIT_CODES}"))]
    Renew(RenewArgs),
    /// Append CONTENT to FILE (file_0 … file_99) under the default lock's
    /// grant; visible once the lock is released.
    #[command(after_help = format!("{STATE_HELP}\n\n{EXIT_CODES}"))]
    Append(AppendArgs),
    /// Print the committed content of FILE, raw, to stdout.
    #[command(after_help = EXIT_CODES)]
    Cat(CatArgs),
    /// Show every held or awaited lock and the last fencing number.
    #[command(after_help = EXIT_CODES)]
    Status(StatusArgs),
    /// Run a command while holding a lock: acquire it (waiting), run CMD with
    /// DLM_LOCK, DLM_TOKEN and DLM_FENCING_TOKEN set while the lease is
    /// renewed, release when CMD exits, and exit with CMD's status.
    #[command(after_help = format!(
        "CMD also gets DLM_SERVER, DLM_CLIENT_ID and the transport flags (DLM_TRANSPORT, \
         DLM_TLS, DLM_CA, DLM_CERT, DLM_KEY), so `dlm append FILE CONTENT` \
         inside it appends under the held default lock. A `dlm hold` inside CMD \
         takes a client id of its own unless given --client-id (not the inherited \
         one, whose grants it would be handed); of the lock CMD already holds \
         (DLM_LOCK), it runs its command under that grant. If the lease is lost, \
         CMD is killed and dlm exits with 4. A Ctrl-C reaches CMD; dlm waits for it. \
         SIGTERM and SIGHUP are passed on to CMD, and dlm waits for it; before CMD \
         runs they stop dlm (exit 128 + the signal).\n\n{EXIT_CODES}"
    ))]
    Hold(HoldArgs),
}

/// Where the servers are and who the client is.
#[derive(Args, Clone, Debug)]
pub struct ConnectArgs {
    /// Server address HOST:PORT; repeat it or separate with commas to give
    /// failover servers, tried in order.
    #[arg(
        long = "server",
        value_name = "ADDR",
        env = "DLM_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:50051"
    )]
    servers: Vec<String>,
    /// Client id to act as; processes with the same id share its grants
    /// (an acquire by the holder's id gets the holder's grant) [default: 1;
    /// `dlm hold`: an id of its own, so that two holds exclude each other]
    #[arg(long, value_name = "N", env = "DLM_CLIENT_ID")]
    client_id: Option<i32>,
    /// Give up after this long without an answer from any server
    /// (an acquire keeps trying for its whole wait).
    #[arg(
        long,
        value_name = "MS",
        env = "DLM_RETRY_BUDGET_MS",
        default_value_t = 60_000
    )]
    retry_budget_ms: u64,
    /// How to reach the servers: gRPC (--server is the --listen address) or
    /// QUIC (--server is the --listen-quic address; needs --ca).
    #[arg(
        long,
        value_enum,
        value_name = "TRANSPORT",
        env = "DLM_TRANSPORT",
        default_value = "grpc"
    )]
    transport: TransportArg,
    /// Speak gRPC over TLS (to a server started with --tls; needs --ca).
    #[arg(long, env = "DLM_TLS")]
    tls: bool,
    /// CA certificate (PEM) that signed the servers' certificates; a
    /// development server prints its path (DATA/state/tls/ca.pem).
    #[arg(long, value_name = "FILE", env = "DLM_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM), for a server started with --client-ca.
    #[arg(long, value_name = "FILE", env = "DLM_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", env = "DLM_KEY", requires = "cert")]
    key: Option<PathBuf>,
}

/// The values of `--transport`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    /// gRPC, plain text unless --tls.
    Grpc,
    /// QUIC (always TLS).
    Quic,
}

impl ConnectArgs {
    /// The transport the flags ask for, with its TLS settings read.
    fn transport(&self) -> Result<Transport, Failure> {
        let tls = || -> Result<Tls, Failure> {
            let Some(ca) = &self.ca else {
                return Err(Failure::local(
                    "TLS needs --ca FILE: the CA certificate that signed the server's \
                     (a development server prints its path)",
                ));
            };
            let tls = Tls::from_ca_file(ca).map_err(|e| Failure::client(&e, ""))?;
            match (&self.cert, &self.key) {
                (Some(cert), Some(key)) => tls
                    .identity_files(cert, key)
                    .map_err(|e| Failure::client(&e, "")),
                _ => Ok(tls),
            }
        };
        Ok(match (self.transport, self.tls) {
            (TransportArg::Grpc, false) => Transport::Grpc,
            (TransportArg::Grpc, true) => Transport::GrpcTls(tls()?),
            (TransportArg::Quic, _) => Transport::Quic(tls()?),
        })
    }

    /// The client id given, or 1.
    fn client_id(&self) -> i32 {
        self.client_id.unwrap_or(1)
    }

    /// Gives the client an id of its own unless one was given: a random
    /// one in 2..=i32::MAX (not 1, every other command's default).
    fn with_own_client_id(mut self) -> ConnectArgs {
        if self.client_id.is_none() {
            let [a, b, c, d, ..] = *uuid::Uuid::new_v4().as_bytes();
            let n = u32::from_le_bytes([a, b, c, d]) % (i32::MAX as u32 - 1);
            self.client_id = Some(n as i32 + 2);
        }
        self
    }

    /// The flags as environment variables, for a child process that runs
    /// `dlm` commands against the same servers (`dlm hold`).
    fn env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut env = vec![
            ("DLM_SERVER", self.servers.join(",").into()),
            ("DLM_CLIENT_ID", self.client_id().to_string().into()),
            (
                "DLM_TRANSPORT",
                match self.transport {
                    TransportArg::Grpc => "grpc",
                    TransportArg::Quic => "quic",
                }
                .into(),
            ),
        ];
        if self.tls {
            env.push(("DLM_TLS", "true".into()));
        }
        for (name, path) in [
            ("DLM_CA", &self.ca),
            ("DLM_CERT", &self.cert),
            ("DLM_KEY", &self.key),
        ] {
            if let Some(path) = path {
                env.push((name, path.clone().into_os_string()));
            }
        }
        env
    }
}

/// Which lock.
#[derive(Args, Clone, Debug)]
pub struct LockArg {
    /// Lock name [default: the default lock (empty name), which guards the files]
    #[arg(long = "lock", value_name = "NAME")]
    lock: Option<String>,
}

/// Where grant files are kept.
#[derive(Args, Clone, Debug)]
pub struct StateArgs {
    /// Directory of the grant files [default: $XDG_STATE_HOME/dlm, else ~/.local/state/dlm]
    #[arg(long, value_name = "DIR", env = "DLM_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

/// Arguments of `dlm acquire`.
#[derive(Args, Debug)]
pub struct AcquireArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    lock: LockArg,
    #[command(flatten)]
    state: StateArgs,
    /// Wait at most this long for the lock; 0 tries once [default: forever]
    #[arg(long, value_name = "MS")]
    wait_ms: Option<u64>,
    /// Lease to ask for [default: the server's]
    #[arg(long, value_name = "MS")]
    lease_ms: Option<u64>,
}

/// Arguments of `dlm release`.
#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    lock: LockArg,
    #[command(flatten)]
    state: StateArgs,
    /// Release under this token instead of the grant file's.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
}

/// Arguments of `dlm renew`.
#[derive(Args, Debug)]
pub struct RenewArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    lock: LockArg,
    #[command(flatten)]
    state: StateArgs,
    /// Renew under this token instead of the grant file's.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// New lease length [default: the grant's own]
    #[arg(long, value_name = "MS")]
    lease_ms: Option<u64>,
}

/// Arguments of `dlm append`.
#[derive(Args, Debug)]
pub struct AppendArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    state: StateArgs,
    /// Append under this token of the default lock instead of the grant
    /// file's. Inside `dlm hold` of the default lock, the held token
    /// ($DLM_TOKEN) is used by default.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// The file: file_0 … file_99.
    file: String,
    /// The bytes to append.
    content: String,
}

/// Arguments of `dlm cat`.
#[derive(Args, Debug)]
pub struct CatArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The file: file_0 … file_99.
    file: String,
}

/// Arguments of `dlm status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Arguments of `dlm hold`.
#[derive(Args, Debug)]
pub struct HoldArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    lock: LockArg,
    /// Wait at most this long for the lock; 0 tries once [default: forever]
    #[arg(long, value_name = "MS")]
    wait_ms: Option<u64>,
    /// Lease to ask for (renewed every third of it) [default: the server's]
    #[arg(long, value_name = "MS")]
    lease_ms: Option<u64>,
    /// The command to run and its arguments (after `--`).
    #[arg(
        value_name = "CMD",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

/// Runs a client command; returns the process exit status.
pub async fn run(command: ClientCommand) -> i32 {
    // Quiet by default: a failure is reported in one line below. RUST_LOG
    // shows the library's retries and renewals.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
    let result = match command {
        ClientCommand::Acquire(args) => acquire(args).await.map(|()| EXIT_OK),
        ClientCommand::Release(args) => release(args).await.map(|()| EXIT_OK),
        ClientCommand::Renew(args) => renew(args).await.map(|()| EXIT_OK),
        ClientCommand::Append(args) => append(args).await.map(|()| EXIT_OK),
        ClientCommand::Cat(args) => cat(args).await.map(|()| EXIT_OK),
        ClientCommand::Status(args) => status(args).await.map(|()| EXIT_OK),
        // Reports its own failures.
        ClientCommand::Hold(args) => Ok(hold::hold(args).await),
    };
    let code = match result {
        Ok(code) => code,
        Err(failure) => {
            say(format_args!("dlm: {}", failure.message));
            failure.code
        }
    };
    // The process exits next: let the servers know its connections are done.
    let clients = std::mem::take(&mut *OPENED.lock().unwrap_or_else(|e| e.into_inner()));
    for client in clients {
        client.close_connections().await;
    }
    code
}

/// The clients this process made ([`connect`]), whose connections are
/// closed before it exits.
static OPENED: std::sync::Mutex<Vec<Client>> = std::sync::Mutex::new(Vec::new());

/// Why a command failed: the line for stderr and the exit status.
#[derive(Debug)]
struct Failure {
    message: String,
    code: i32,
}

impl Failure {
    /// A failure that is not the server's answer.
    fn local(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: EXIT_FAILED,
        }
    }

    /// A client error about `lock`, in words and as an exit status.
    fn client(error: &Error, lock: &str) -> Failure {
        let (message, code) = match error {
            Error::LockHeld => (
                format!("lock {lock:?} is held by another client"),
                EXIT_BUSY,
            ),
            Error::WaitTimedOut => (
                format!("lock {lock:?} was not granted before the wait ended"),
                EXIT_BUSY,
            ),
            Error::LeaseLost => (
                format!(
                    "the grant of lock {lock:?} is gone: its token is stale or its lease ran out"
                ),
                EXIT_LOST,
            ),
            Error::NotHeld => (format!("lock {lock:?} is not held"), EXIT_LOST),
            Error::PermissionDenied => (
                format!("lock {lock:?} is held under another client id"),
                EXIT_LOST,
            ),
            Error::SessionClosed => ("the client's session was closed".to_owned(), EXIT_LOST),
            Error::BadRequest(m) => (format!("bad request: {m}"), EXIT_FAILED),
            Error::Unavailable(m) => (format!("no server answered: {m}"), EXIT_UNAVAILABLE),
            Error::Tls(m) => (format!("TLS handshake failed: {m}"), EXIT_FAILED),
            Error::Server(m) => (format!("server error: {m}"), EXIT_FAILED),
        };
        Failure { message, code }
    }
}

/// A client for `connect`, after saying hello if `hello`.
async fn connect(connect: &ConnectArgs, hello: bool) -> Result<Client, Failure> {
    let client = Client::builder(connect.client_id())
        .endpoints(
            connect
                .servers
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty()),
        )
        .retry_budget(Duration::from_millis(connect.retry_budget_ms))
        .transport(connect.transport()?)
        .build()
        .map_err(|e| Failure::client(&e, ""))?;
    OPENED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(client.clone());
    if hello {
        client.init().await.map_err(|e| Failure::client(&e, ""))?;
    }
    Ok(client)
}

fn options(wait_ms: Option<u64>, lease_ms: Option<u64>) -> AcquireOptions {
    AcquireOptions {
        wait: wait_ms.map(Duration::from_millis),
        lease: lease_ms.map(Duration::from_millis),
    }
}

fn state_dir(state: &StateArgs) -> Result<PathBuf, Failure> {
    state::state_dir(state.state_dir.as_deref())
        .map_err(|e| Failure::local(format!("no state directory: {e}")))
}

/// The grant of `lock` for `client_id` kept in `dir`.
fn saved_grant(dir: &Path, client_id: i32, lock: &str) -> Result<SavedGrant, Failure> {
    match state::load(dir, client_id, lock) {
        Ok(Some(grant)) => Ok(grant),
        Ok(None) => Err(Failure::local(format!(
            "client {client_id} has no grant of lock {lock:?} in {} (run `dlm acquire` first, or pass --token)",
            dir.display()
        ))),
        Err(e) => Err(Failure::local(format!("cannot read the grant file: {e}"))),
    }
}

async fn acquire(args: AcquireArgs) -> Result<(), Failure> {
    let lock = args.lock.lock.unwrap_or_default();
    let dir = state_dir(&args.state)?;
    // Before the lock is taken: a grant that cannot be kept stays held
    // until its lease runs out.
    state::check_writable(&dir).map_err(|e| {
        Failure::local(format!(
            "cannot keep grants in {}: {e}; nothing acquired",
            dir.display()
        ))
    })?;
    let client = connect(&args.connect, true).await?;
    let grant = client
        .acquire(&lock, options(args.wait_ms, args.lease_ms))
        .await
        .map_err(|e| Failure::client(&e, &lock))?;
    let saved = SavedGrant {
        client_id: client.client_id(),
        lock: lock.clone(),
        token: grant.token.clone(),
        fence: grant.fence,
        lease: grant.lease,
    };
    if let Err(e) = state::save(&dir, &saved) {
        // Not given back: an acquire by a client id that already holds the
        // lock gets that grant (another process's, when they share the id),
        // and releasing it would end that holding and commit its appends.
        // Its lease ends it, or a release with the token.
        return Err(Failure::local(format!(
            "cannot keep the grant in {}: {e}; lock {lock:?} stays held (fence {}) until its \
             lease runs out or `dlm release --token {}`",
            dir.display(),
            grant.fence,
            grant.token
        )));
    }
    tell(format_args!("acquired lock {lock:?} fence {}", grant.fence));
    Ok(())
}

async fn release(args: ReleaseArgs) -> Result<(), Failure> {
    let lock = args.lock.lock.unwrap_or_default();
    let dir = state_dir(&args.state)?;
    let client_id = args.connect.client_id();
    let token = match args.token {
        Some(token) => token,
        None => saved_grant(&dir, client_id, &lock)?.token,
    };
    let client = connect(&args.connect, true).await?;
    let result = client.release_token(&lock, &token).await;
    if matches!(&result, Ok(()) | Err(Error::LeaseLost | Error::NotHeld)) {
        forget(&dir, client_id, &lock, &token);
    }
    result.map_err(|e| Failure::client(&e, &lock))?;
    tell(format_args!("released lock {lock:?}"));
    Ok(())
}

/// Removes the grant file of `lock` if it holds `token` (the grant is over).
fn forget(dir: &Path, client_id: i32, lock: &str, token: &str) {
    if let Err(e) = state::replace_if(dir, client_id, lock, token, None) {
        say(format_args!(
            "dlm: warning: cannot remove the stale grant file: {e}"
        ));
    }
}

async fn renew(args: RenewArgs) -> Result<(), Failure> {
    let lock = args.lock.lock.unwrap_or_default();
    let dir = state_dir(&args.state)?;
    let client_id = args.connect.client_id();
    let saved = match args.token {
        Some(_) => None,
        None => Some(saved_grant(&dir, client_id, &lock)?),
    };
    let token = args
        .token
        .or_else(|| saved.as_ref().map(|s| s.token.clone()))
        .unwrap_or_default();
    let client = connect(&args.connect, true).await?;
    let result = client
        .renew_token(&lock, &token, args.lease_ms.map(Duration::from_millis))
        .await;
    let lease = match result {
        Ok(lease) => lease,
        Err(error) => {
            if matches!(error, Error::LeaseLost | Error::NotHeld) {
                forget(&dir, client_id, &lock, &token);
            }
            return Err(Failure::client(&error, &lock));
        }
    };
    if let Some(saved) = saved {
        // Only if the file still holds the grant renewed: a release and a
        // new acquire by other processes meanwhile must not see it come back.
        let updated = SavedGrant { lease, ..saved };
        if let Err(e) = state::replace_if(&dir, client_id, &lock, &token, Some(&updated)) {
            say(format_args!(
                "dlm: warning: cannot update the grant file: {e}"
            ));
        }
    }
    tell(format_args!(
        "renewed lock {lock:?} lease {} ms",
        lease.as_millis()
    ));
    Ok(())
}

async fn append(args: AppendArgs) -> Result<(), Failure> {
    let token = match args.token.or_else(held_default_token) {
        Some(token) => token,
        None => {
            let dir = state_dir(&args.state)?;
            saved_grant(&dir, args.connect.client_id(), "")?.token
        }
    };
    let client = connect(&args.connect, true).await?;
    client
        .append_token(&token, &args.file, args.content.into_bytes())
        .await
        .map_err(|e| Failure::client(&e, ""))
}

/// The token of the default lock when running inside `dlm hold` of it.
fn held_default_token() -> Option<String> {
    let lock = std::env::var_os("DLM_LOCK")?;
    let token = std::env::var("DLM_TOKEN").ok()?;
    (lock.is_empty() && !token.is_empty()).then_some(token)
}

async fn cat(args: CatArgs) -> Result<(), Failure> {
    let client = connect(&args.connect, false).await?;
    let content = client
        .read(&args.file)
        .await
        .map_err(|e| Failure::client(&e, ""))?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&content)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::local(format!("cannot write to stdout: {e}")))
}

async fn status(args: StatusArgs) -> Result<(), Failure> {
    let client = connect(&args.connect, false).await?;
    let report = client.status().await.map_err(|e| Failure::client(&e, ""))?;
    tell_raw(&table::status_table(&report));
    Ok(())
}

/// Writes one line to stderr, ignoring failure: a closed stderr (a hung-up
/// terminal, a closed pipe) must not turn a finished command into a panic
/// (`eprintln!` panics on a write error).
pub(crate) fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Writes one line to stdout, ignoring failure (see [`say`]): the command
/// has done its work, and its exit code says so.
fn tell(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Writes `text` to stdout as it is, ignoring failure (see [`tell`]).
fn tell_raw(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// The shape of the binary's top level, with a stand-in server command.
    #[derive(Parser, Debug)]
    #[command(name = "dlm", about)]
    struct Top {
        #[command(subcommand)]
        command: TopCommand,
    }

    // A stand-in for the binary's top level, built once per test.
    #[allow(clippy::large_enum_variant)]
    #[derive(Subcommand, Debug)]
    enum TopCommand {
        Server,
        #[command(flatten)]
        Client(ClientCommand),
    }

    fn parse(args: &[&str]) -> ClientCommand {
        match Top::try_parse_from(std::iter::once("dlm").chain(args.iter().copied())) {
            Ok(Top {
                command: TopCommand::Client(command),
            }) => command,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn the_commands_fit_under_the_binarys_top_level() {
        let top = Top::command();
        top.clone().debug_assert();
        // Flattening must not replace the binary's own description.
        let about = top.get_about().map(ToString::to_string);
        let long_about = top.get_long_about().map(ToString::to_string);
        assert_eq!(about.as_deref(), Some(env!("CARGO_PKG_DESCRIPTION")));
        assert!(
            !format!("{long_about:?}").contains("flattened"),
            "{long_about:?}"
        );
    }

    #[test]
    fn servers_may_be_repeated_or_comma_separated() {
        let ClientCommand::Status(args) =
            parse(&["status", "--server", "a:1,b:2", "--server", "c:3"])
        else {
            panic!()
        };
        assert_eq!(args.connect.servers, ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn acquire_defaults_to_the_default_lock_and_waiting_forever() {
        let ClientCommand::Acquire(args) = parse(&["acquire"]) else {
            panic!()
        };
        assert_eq!(args.lock.lock, None);
        assert_eq!(args.wait_ms, None);
        let ClientCommand::Acquire(args) = parse(&[
            "acquire",
            "--lock",
            "x",
            "--wait-ms",
            "0",
            "--lease-ms",
            "500",
            "--client-id",
            "7",
        ]) else {
            panic!()
        };
        assert_eq!(args.lock.lock.as_deref(), Some("x"));
        assert_eq!(args.connect.client_id, Some(7));
        assert_eq!(
            options(args.wait_ms, args.lease_ms),
            AcquireOptions::try_once().lease(Duration::from_millis(500))
        );
    }

    #[test]
    fn hold_takes_the_command_after_dashes_with_its_own_flags() {
        let ClientCommand::Hold(args) = parse(&["hold", "--lock", "x", "--", "sh", "-c", "exit 3"])
        else {
            panic!()
        };
        assert_eq!(args.command, ["sh", "-c", "exit 3"]);
        let ClientCommand::Hold(args) = parse(&["hold", "ls", "-l"]) else {
            panic!()
        };
        assert_eq!(args.command, ["ls", "-l"]);
        assert!(Top::try_parse_from(["dlm", "hold"]).is_err());
    }

    #[test]
    fn append_takes_file_and_content() {
        let ClientCommand::Append(args) = parse(&["append", "file_3", "hello world"]) else {
            panic!()
        };
        assert_eq!(
            (args.file.as_str(), args.content.as_str()),
            ("file_3", "hello world")
        );
    }

    #[test]
    fn errors_read_as_one_line_with_their_exit_status() {
        let busy = Failure::client(&Error::LockHeld, "x");
        assert_eq!(busy.message, r#"lock "x" is held by another client"#);
        assert_eq!(busy.code, EXIT_BUSY);
        assert_eq!(Failure::client(&Error::LeaseLost, "").code, EXIT_LOST);
        assert_eq!(
            Failure::client(&Error::Unavailable("x".into()), "").code,
            EXIT_UNAVAILABLE
        );
        assert_eq!(
            Failure::client(&Error::BadRequest("x".into()), "").code,
            EXIT_FAILED
        );
    }
}
