//! The lock services under test, each started as its own process on
//! loopback with a temporary data directory on the normal disk, and one
//! connection per client behind a common acquire / release interface.
//!
//! - **dlm**: the release binary (`dlm server`), fsync on (always); raw
//!   generated gRPC client, a request id per call (as the client library does).
//! - **dlm-quic**: the same server with `--transport quic`, reached over QUIC
//!   (one QUIC connection per client, one stream per call, TLS 1.3 with the
//!   server's development CA) through `dlm::transport::quic::QuicConnector`.
//! - **etcd**: the v3 lock API (`v3lockpb.Lock/Lock`, `Unlock`) with one lease
//!   per client, kept alive over a `LeaseKeepAlive` stream; raw gRPC with
//!   hand-declared messages (the `etcd-client` crate needs a system `protoc`
//!   to build, which dlm does not require).
//! - **Redis**: `SET key token NX PX 30000`, retried after a 1 ms sleep while
//!   the key is taken; release by a Lua compare-and-delete (`EVALSHA`).
//!   `redis-aof` runs with `appendonly yes, appendfsync always`, `redis-mem`
//!   with no persistence at all.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::time::Instant;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use dlm::proto::call_request::Call;
use dlm::proto::call_response::Reply;
use dlm::proto::lock_service_client::LockServiceClient;
use dlm::proto::{CallRequest, ClientInitArgs, FileArgs, LockArgs, LockResponse, StatusArgs};
use dlm::transport::quic::client::QuicConnector;

use super::procs::{self, ChildGuard};

/// Lease every bench grant asks for.
pub const LEASE_MS: u64 = 30_000;

/// A lock service under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    Dlm,
    /// A second dlm build (`DLM_BENCH_COMPARE_BIN`), benched next to the
    /// first in the same run; absent unless that variable is set.
    DlmB,
    /// dlm over QUIC.
    DlmQuic,
    /// The second build over QUIC.
    DlmBQuic,
    Etcd,
    RedisAof,
    RedisMem,
}

impl System {
    /// Every system, in table order.
    pub const ALL: [System; 7] = [
        System::Dlm,
        System::DlmB,
        System::DlmQuic,
        System::DlmBQuic,
        System::Etcd,
        System::RedisAof,
        System::RedisMem,
    ];

    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            System::Dlm => "dlm",
            System::DlmB => "dlm-b",
            System::DlmQuic => "dlm-quic",
            System::DlmBQuic => "dlm-b-quic",
            System::Etcd => "etcd",
            System::RedisAof => "redis-aof",
            System::RedisMem => "redis-mem",
        }
    }

    /// Its wire protocol.
    pub fn transport(self) -> &'static str {
        match self {
            System::Dlm | System::DlmB | System::Etcd => "grpc",
            System::DlmQuic | System::DlmBQuic => "quic",
            System::RedisAof | System::RedisMem => "resp",
        }
    }

    /// What durability it gives.
    pub fn durability(self) -> &'static str {
        match self {
            System::Dlm | System::DlmB | System::DlmQuic | System::DlmBQuic => {
                "fdatasync per group commit"
            }
            System::Etcd => "raft WAL fsync (default)",
            System::RedisAof => "appendfsync always",
            System::RedisMem => "none",
        }
    }

    /// dlm itself (either build).
    pub fn is_dlm(self) -> bool {
        matches!(
            self,
            System::Dlm | System::DlmB | System::DlmQuic | System::DlmBQuic
        )
    }

    /// The second build (`DLM_BENCH_COMPARE_BIN`), over either transport.
    pub fn is_compare_build(self) -> bool {
        matches!(self, System::DlmB | System::DlmBQuic)
    }

    /// dlm over QUIC (either build).
    pub fn is_dlm_quic(self) -> bool {
        matches!(self, System::DlmQuic | System::DlmBQuic)
    }

    fn program(self) -> Option<PathBuf> {
        match self {
            System::Dlm | System::DlmQuic => Some(dlm_binary()),
            System::DlmB | System::DlmBQuic => std::env::var_os("DLM_BENCH_COMPARE_BIN")
                .filter(|bin| !bin.is_empty())
                .map(PathBuf::from),
            System::Etcd => procs::which("etcd"),
            System::RedisAof | System::RedisMem => procs::which("redis-server"),
        }
    }
}

/// The `dlm` binary to bench: `DLM_BENCH_DLM_BIN` when set (to compare
/// another build in the same run), else the one cargo built with the bench.
pub fn dlm_binary() -> PathBuf {
    std::env::var_os("DLM_BENCH_DLM_BIN")
        .filter(|bin| !bin.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_dlm")))
}

/// A started server.
pub struct Server {
    pub system: System,
    pub port: u16,
    pub version: String,
    guard: ChildGuard,
    /// Its data directory (removed when the server is dropped).
    dir: tempfile::TempDir,
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// True while it runs.
    pub fn alive(&mut self) -> bool {
        self.guard.alive()
    }

    /// Where its data lives.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// dlm's development CA (PEM), made by the server on its first start.
    pub fn dev_ca(&self) -> PathBuf {
        self.dir.path().join("data/state/tls/ca.pem")
    }

    /// Starts `system`; `Ok(None)` with a reason when it is not installed.
    ///
    /// # Errors
    /// When it is installed but does not come up.
    pub async fn start(system: System) -> Result<std::result::Result<Server, String>> {
        let Some(program) = system.program().filter(|p| p.is_file()) else {
            return Ok(Err(format!(
                "{} skipped: not installed (run `bash benches/install-peers.sh`)",
                system.name()
            )));
        };
        let dir = super::temp_dir(&format!("{}-", system.name()));
        let log = dir.path().join("server.log");
        let version = version_of(system, &program);
        let server = match system {
            System::Dlm | System::DlmB | System::DlmQuic | System::DlmBQuic => {
                let mut command = Command::new(&program);
                command
                    .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
                    .arg(dir.path().join("data"))
                    .env("RUST_LOG", "warn");
                if system.is_dlm_quic() {
                    // QUIC on the --listen port (UDP), with the development CA.
                    command.args(["--transport", "quic"]);
                }
                if let Ok(extra) = std::env::var("DLM_BENCH_SERVER_ARGS") {
                    command.args(extra.split_whitespace());
                }
                let mut guard = procs::spawn(system.name(), command, &log, true)?;
                let line = procs::wait_for_line(&mut guard, "serving", Duration::from_secs(60))?;
                let port = line
                    .split_whitespace()
                    .find_map(|w| w.trim_end_matches(',').rsplit_once(':')?.1.parse().ok())
                    .with_context(|| format!("no port in {line:?}"))?;
                Server {
                    system,
                    port,
                    version,
                    guard,
                    dir,
                }
            }
            System::Etcd => {
                let port = procs::free_port()?;
                let peer = procs::free_port()?;
                let client_url = format!("http://127.0.0.1:{port}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let mut command = Command::new(&program);
                command
                    .args(["--name", "bench", "--data-dir"])
                    .arg(dir.path().join("etcd"))
                    .args(["--listen-client-urls", &client_url])
                    .args(["--advertise-client-urls", &client_url])
                    .args(["--listen-peer-urls", &peer_url])
                    .args(["--initial-advertise-peer-urls", &peer_url])
                    .args(["--initial-cluster", &format!("bench={peer_url}")])
                    .args(["--initial-cluster-state", "new"])
                    .args(["--logger", "zap", "--log-outputs", "stderr"])
                    .args(["--log-level", "warn"]);
                let guard = procs::spawn("etcd", command, &log, false)?;
                let mut server = Server {
                    system,
                    port,
                    version,
                    guard,
                    dir,
                };
                procs::wait_for_port(port, Duration::from_secs(30))?;
                let give_up = Instant::now() + Duration::from_secs(30);
                loop {
                    match EtcdConn::connect(port).await {
                        Ok(conn) => {
                            conn.close().await;
                            break;
                        }
                        Err(e) if Instant::now() > give_up || !server.alive() => {
                            bail!("etcd did not become ready: {e:#}")
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                server
            }
            System::RedisAof | System::RedisMem => {
                let port = procs::free_port()?;
                let mut command = Command::new(&program);
                command
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .arg("--dir")
                    .arg(dir.path())
                    .args(["--save", "", "--daemonize", "no", "--logfile", ""])
                    .args(["--protected-mode", "yes"]);
                if system == System::RedisAof {
                    command.args(["--appendonly", "yes", "--appendfsync", "always"]);
                } else {
                    command.args(["--appendonly", "no"]);
                }
                let guard = procs::spawn(system.name(), command, &log, false)?;
                procs::wait_for_port(port, Duration::from_secs(30))?;
                let mut conn = RedisConn::connect(port, "ping").await?;
                let pong: String = redis::cmd("PING").query_async(&mut conn.conn).await?;
                if pong != "PONG" {
                    bail!("redis answered {pong:?} to PING");
                }
                Server {
                    system,
                    port,
                    version,
                    guard,
                    dir,
                }
            }
        };
        Ok(Ok(server))
    }
}

fn version_of(system: System, program: &std::path::Path) -> String {
    if system.is_dlm() {
        return format!("dlm {} ({})", env!("CARGO_PKG_VERSION"), program.display());
    }
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

/// A lock held by a client.
#[derive(Debug, Clone, Default)]
pub struct Held {
    pub lock: String,
    /// dlm's token or Redis's random value.
    pub token: String,
    /// etcd's lock key (the lease-owned key the lock API created).
    pub key: Vec<u8>,
    /// dlm's fencing number.
    pub fence: u64,
}

/// One client's connection to a system.
pub enum Conn {
    Dlm(DlmConn),
    DlmQuic(QuicConn),
    Etcd(EtcdConn),
    Redis(RedisConn),
}

impl Conn {
    /// Opens a new connection as client `client`; `tag` makes request ids
    /// unique across the rows of one run.
    ///
    /// # Errors
    /// When the server can not be reached.
    pub async fn connect(server: &Server, client: i32, tag: &str) -> Result<Conn> {
        Ok(match server.system {
            System::Dlm | System::DlmB => {
                Conn::Dlm(DlmConn::connect(server.port, client, tag).await?)
            }
            System::DlmQuic | System::DlmBQuic => {
                Conn::DlmQuic(QuicConn::connect(server.port, &server.dev_ca(), client, tag).await?)
            }
            System::Etcd => Conn::Etcd(EtcdConn::connect(server.port).await?),
            System::RedisAof | System::RedisMem => {
                Conn::Redis(RedisConn::connect(server.port, &format!("{tag}-{client}")).await?)
            }
        })
    }

    /// Acquires `lock`, waiting (server-side, or for Redis by retrying) at most
    /// until `give_up`.
    ///
    /// # Errors
    /// A refusal, a transport error or `give_up` passing.
    pub async fn acquire(&mut self, lock: &str, give_up: Instant) -> Result<Held> {
        let wait = give_up.saturating_duration_since(Instant::now());
        match self {
            Conn::Dlm(c) => tokio::time::timeout(wait, c.acquire(lock))
                .await
                .map_err(|_| anyhow!("dlm acquire timed out"))?,
            Conn::DlmQuic(c) => tokio::time::timeout(wait, c.acquire(lock))
                .await
                .map_err(|_| anyhow!("dlm acquire timed out"))?,
            Conn::Etcd(c) => tokio::time::timeout(wait, c.acquire(lock))
                .await
                .map_err(|_| anyhow!("etcd lock timed out"))?,
            Conn::Redis(c) => c.acquire(lock, give_up).await,
        }
    }

    /// Releases a held lock.
    ///
    /// # Errors
    /// A refusal or a transport error.
    pub async fn release(&mut self, held: Held) -> Result<()> {
        match self {
            Conn::Dlm(c) => c.release(held).await,
            Conn::DlmQuic(c) => c.release(held).await,
            Conn::Etcd(c) => c.release(held).await,
            Conn::Redis(c) => c.release(held).await,
        }
    }

    /// Appends under a held default lock (dlm only).
    ///
    /// # Errors
    /// A refusal, a transport error, or a system without appends.
    pub async fn append(&mut self, held: &Held, file: &str, content: Vec<u8>) -> Result<()> {
        match self {
            Conn::Dlm(c) => c.append(held, file, content).await,
            Conn::DlmQuic(c) => c.append(held, file, content).await,
            _ => bail!("only dlm has appends under a lock"),
        }
    }

    /// A status call (dlm only): the server's whole request path without a
    /// durable record.
    ///
    /// # Errors
    /// A transport error, or a system without it.
    pub async fn status(&mut self) -> Result<()> {
        match self {
            Conn::Dlm(c) => c.status().await,
            Conn::DlmQuic(c) => c.status().await,
            _ => bail!("only dlm is measured without fsync"),
        }
    }

    /// Ends the session (etcd: revokes the lease; dlm: client close).
    pub async fn close(self) {
        match self {
            Conn::Dlm(c) => c.close().await,
            Conn::DlmQuic(c) => c.close().await,
            Conn::Etcd(c) => c.close().await,
            Conn::Redis(_) => {}
        }
    }
}

async fn channel(port: u16) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// A dlm client on its own connection.
pub struct DlmConn {
    client: LockServiceClient<Channel>,
    id: i32,
    tag: String,
    next_request: u64,
}

impl DlmConn {
    /// Connects and says hello as `id`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn connect(port: u16, id: i32, tag: &str) -> Result<DlmConn> {
        let mut conn = DlmConn {
            client: LockServiceClient::new(channel(port).await?),
            id,
            tag: tag.to_owned(),
            next_request: 0,
        };
        let request_id = conn.request_id();
        let reply = conn
            .client
            .client_init(ClientInitArgs {
                client_id: id,
                request_id,
            })
            .await?
            .into_inner();
        ok_status(reply.status, &reply.error_message)?;
        Ok(conn)
    }

    fn request_id(&mut self) -> String {
        self.next_request += 1;
        format!("{}-{}-{}", self.tag, self.id, self.next_request)
    }

    async fn acquire(&mut self, lock: &str) -> Result<Held> {
        let args = acquire_args(self.id, self.request_id(), lock);
        let reply = self.client.lock_acquire(args).await?.into_inner();
        held_of(lock, reply)
    }

    async fn release(&mut self, held: Held) -> Result<()> {
        let args = release_args(self.id, self.request_id(), held);
        let reply = self.client.lock_release(args).await?.into_inner();
        ok_status(reply.status, &reply.error_message)
    }

    async fn append(&mut self, held: &Held, file: &str, content: Vec<u8>) -> Result<()> {
        let args = append_args(self.id, self.request_id(), held, file, content);
        let reply = self.client.file_append(args).await?.into_inner();
        ok_status(reply.status, &reply.error_message)
    }

    /// One status call: a round trip through gRPC and the engine that needs
    /// no fsync.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn status(&mut self) -> Result<()> {
        let reply = self.client.lock_status(StatusArgs {}).await?.into_inner();
        ok_status(reply.status, &reply.error_message)
    }

    async fn close(mut self) {
        let request_id = self.request_id();
        let _ = self
            .client
            .client_close(ClientInitArgs {
                client_id: self.id,
                request_id,
            })
            .await;
    }
}

/// A dlm client over its own QUIC connection.
pub struct QuicConn {
    connector: QuicConnector,
    id: i32,
    tag: String,
    next_request: u64,
}

impl QuicConn {
    /// Connects (TLS with the server's CA `ca`) and says hello as `id`.
    ///
    /// # Errors
    /// Transport or TLS errors.
    pub async fn connect(port: u16, ca: &std::path::Path, id: i32, tag: &str) -> Result<QuicConn> {
        let ca_pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        let config = dlm::transport::quic::client_config(&ca_pem, None)?;
        let connector = QuicConnector::new(
            &format!("127.0.0.1:{port}"),
            Some("localhost"),
            config,
            None,
        )?;
        let mut conn = QuicConn {
            connector,
            id,
            tag: tag.to_owned(),
            next_request: 0,
        };
        let request_id = conn.request_id();
        let reply = conn
            .call(Call::ClientInit(ClientInitArgs {
                client_id: id,
                request_id,
            }))
            .await?;
        match reply {
            Reply::ClientInit(r) => ok_status(r.status, &r.error_message)?,
            other => bail!("client init answered with {other:?}"),
        }
        Ok(conn)
    }

    fn request_id(&mut self) -> String {
        self.next_request += 1;
        format!("{}-{}-{}", self.tag, self.id, self.next_request)
    }

    async fn call(&self, call: Call) -> Result<Reply> {
        let request = CallRequest {
            call: Some(call),
            timeout_ms: 0,
        };
        let response = self
            .connector
            .call(&request)
            .await
            .map_err(|e| anyhow!("quic call: {e}"))?;
        response.reply.context("an empty QUIC response")
    }

    async fn acquire(&mut self, lock: &str) -> Result<Held> {
        let args = acquire_args(self.id, self.request_id(), lock);
        match self.call(Call::LockAcquire(args)).await? {
            Reply::LockAcquire(reply) => held_of(lock, reply),
            other => bail!("acquire answered with {other:?}"),
        }
    }

    async fn release(&mut self, held: Held) -> Result<()> {
        let args = release_args(self.id, self.request_id(), held);
        match self.call(Call::LockRelease(args)).await? {
            Reply::LockRelease(r) => ok_status(r.status, &r.error_message),
            other => bail!("release answered with {other:?}"),
        }
    }

    async fn append(&mut self, held: &Held, file: &str, content: Vec<u8>) -> Result<()> {
        let args = append_args(self.id, self.request_id(), held, file, content);
        match self.call(Call::FileAppend(args)).await? {
            Reply::FileAppend(r) => ok_status(r.status, &r.error_message),
            other => bail!("append answered with {other:?}"),
        }
    }

    /// One status call over QUIC (no fsync).
    ///
    /// # Errors
    /// Transport errors.
    pub async fn status(&mut self) -> Result<()> {
        match self.call(Call::LockStatus(StatusArgs {})).await? {
            Reply::LockStatus(r) => ok_status(r.status, &r.error_message),
            other => bail!("status answered with {other:?}"),
        }
    }

    async fn close(mut self) {
        let request_id = self.request_id();
        let _ = self
            .call(Call::ClientClose(ClientInitArgs {
                client_id: self.id,
                request_id,
            }))
            .await;
    }
}

/// The arguments of an acquire of `lock` (no wait limit, the bench's lease).
fn acquire_args(client_id: i32, request_id: String, lock: &str) -> LockArgs {
    LockArgs {
        client_id,
        token: String::new(),
        request_id,
        lock_name: lock.to_owned(),
        wait_timeout_ms: None,
        lease_ms: Some(LEASE_MS),
    }
}

/// The arguments of a release of `held`.
fn release_args(client_id: i32, request_id: String, held: Held) -> LockArgs {
    LockArgs {
        client_id,
        token: held.token,
        request_id,
        lock_name: held.lock,
        wait_timeout_ms: None,
        lease_ms: None,
    }
}

/// The arguments of an append under `held`.
fn append_args(
    client_id: i32,
    request_id: String,
    held: &Held,
    file: &str,
    content: Vec<u8>,
) -> FileArgs {
    FileArgs {
        client_id,
        filename: file.to_owned(),
        content,
        token: held.token.clone(),
        request_id,
    }
}

/// The grant an acquire of `lock` answered, or its refusal as an error.
fn held_of(lock: &str, reply: LockResponse) -> Result<Held> {
    ok_status(reply.status, &reply.error_message)?;
    Ok(Held {
        lock: lock.to_owned(),
        token: reply.token,
        key: Vec::new(),
        fence: reply.fencing_token,
    })
}

fn ok_status(status: i32, message: &str) -> Result<()> {
    if status == dlm::proto::Status::Ok as i32 {
        Ok(())
    } else {
        bail!("dlm status {status}: {message}")
    }
}

/// etcd's messages, declared by hand with their field numbers (etcd
/// `api/etcdserverpb/rpc.proto` and `v3lockpb/v3lock.proto`); the response
/// headers are left out (prost skips unknown fields).
pub mod etcdpb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseGrantRequest {
        #[prost(int64, tag = "1")]
        pub ttl: i64,
        #[prost(int64, tag = "2")]
        pub id: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseGrantResponse {
        #[prost(int64, tag = "2")]
        pub id: i64,
        #[prost(int64, tag = "3")]
        pub ttl: i64,
        #[prost(string, tag = "4")]
        pub error: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseRevokeRequest {
        #[prost(int64, tag = "1")]
        pub id: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseRevokeResponse {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseKeepAliveRequest {
        #[prost(int64, tag = "1")]
        pub id: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LeaseKeepAliveResponse {
        #[prost(int64, tag = "2")]
        pub id: i64,
        #[prost(int64, tag = "3")]
        pub ttl: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LockRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub name: Vec<u8>,
        #[prost(int64, tag = "2")]
        pub lease: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct LockResponse {
        #[prost(bytes = "vec", tag = "2")]
        pub key: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UnlockRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UnlockResponse {}
}

type Grpc = tonic::client::Grpc<Channel>;

async fn unary<Req, Resp>(grpc: &mut Grpc, path: &'static str, request: Req) -> Result<Resp>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready()
        .await
        .map_err(|e| anyhow!("etcd channel not ready: {}", e))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let response = grpc
        .unary(
            tonic::Request::new(request),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?;
    Ok(response.into_inner())
}

/// An etcd client on its own connection, with its own lease.
pub struct EtcdConn {
    grpc: Grpc,
    lease: i64,
    keepalive: tokio::task::JoinHandle<()>,
}

/// Lease TTL of an etcd bench client, in seconds (kept alive every third).
const ETCD_TTL_SECS: i64 = 30;

impl EtcdConn {
    /// Connects, grants a lease and starts keeping it alive.
    ///
    /// # Errors
    /// Transport errors or a refused lease.
    pub async fn connect(port: u16) -> Result<EtcdConn> {
        let mut grpc = Grpc::new(channel(port).await?);
        let grant: etcdpb::LeaseGrantResponse = unary(
            &mut grpc,
            "/etcdserverpb.Lease/LeaseGrant",
            etcdpb::LeaseGrantRequest {
                ttl: ETCD_TTL_SECS,
                id: 0,
            },
        )
        .await?;
        if !grant.error.is_empty() || grant.id == 0 {
            bail!("etcd refused a lease: {}", grant.error);
        }
        let keepalive = tokio::spawn(keep_alive(grpc.clone(), grant.id));
        Ok(EtcdConn {
            grpc,
            lease: grant.id,
            keepalive,
        })
    }

    async fn acquire(&mut self, lock: &str) -> Result<Held> {
        let reply: etcdpb::LockResponse = unary(
            &mut self.grpc,
            "/v3lockpb.Lock/Lock",
            etcdpb::LockRequest {
                name: lock.as_bytes().to_vec(),
                lease: self.lease,
            },
        )
        .await?;
        Ok(Held {
            lock: lock.to_owned(),
            key: reply.key,
            ..Held::default()
        })
    }

    async fn release(&mut self, held: Held) -> Result<()> {
        let _: etcdpb::UnlockResponse = unary(
            &mut self.grpc,
            "/v3lockpb.Lock/Unlock",
            etcdpb::UnlockRequest { key: held.key },
        )
        .await?;
        Ok(())
    }

    async fn close(mut self) {
        self.keepalive.abort();
        let _: Result<etcdpb::LeaseRevokeResponse> = unary(
            &mut self.grpc,
            "/etcdserverpb.Lease/LeaseRevoke",
            etcdpb::LeaseRevokeRequest { id: self.lease },
        )
        .await;
    }
}

/// Keeps lease `id` alive over one `LeaseKeepAlive` stream: a ping now and
/// every third of the TTL; ends when aborted, when the stream ends, or after
/// a bounded number of pings.
async fn keep_alive(mut grpc: Grpc, id: i64) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    if tx.send(etcdpb::LeaseKeepAliveRequest { id }).await.is_err() || grpc.ready().await.is_err() {
        return;
    }
    let codec = tonic_prost::ProstCodec::<
        etcdpb::LeaseKeepAliveRequest,
        etcdpb::LeaseKeepAliveResponse,
    >::default();
    let Ok(response) = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            PathAndQuery::from_static("/etcdserverpb.Lease/LeaseKeepAlive"),
            codec,
        )
        .await
    else {
        return;
    };
    let mut inbound = response.into_inner();
    let every = Duration::from_secs((ETCD_TTL_SECS / 3) as u64);
    for _ in 0..100_000 {
        tokio::select! {
            _ = tokio::time::sleep(every) => {
                if tx.send(etcdpb::LeaseKeepAliveRequest { id }).await.is_err() {
                    return;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(_)) => {}
                _ => return,
            },
        }
    }
}

/// A Redis client on its own connection.
pub struct RedisConn {
    pub conn: redis::aio::MultiplexedConnection,
    release: redis::Script,
    /// Makes lock values unique per client.
    prefix: String,
    next_token: u64,
}

/// Compare-and-delete: release only if the value is still ours.
const RELEASE_LUA: &str =
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl RedisConn {
    /// Connects; `prefix` makes this client's lock values unique.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn connect(port: u16, prefix: &str) -> Result<RedisConn> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(RedisConn {
            conn,
            release: redis::Script::new(RELEASE_LUA),
            prefix: prefix.to_owned(),
            next_token: 0,
        })
    }

    async fn acquire(&mut self, lock: &str, give_up: Instant) -> Result<Held> {
        self.next_token += 1;
        let token = format!("{}-{}", self.prefix, self.next_token);
        // Bounded by `give_up` and by a count (a 1 ms sleep per try).
        for _ in 0..10_000_000u64 {
            let set: Option<String> = redis::cmd("SET")
                .arg(lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(LEASE_MS)
                .query_async(&mut self.conn)
                .await?;
            if set.is_some() {
                return Ok(Held {
                    lock: lock.to_owned(),
                    token,
                    ..Held::default()
                });
            }
            if Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        bail!("redis lock {lock:?} not acquired in time")
    }

    async fn release(&mut self, held: Held) -> Result<()> {
        let deleted: i64 = self
            .release
            .key(&held.lock)
            .arg(&held.token)
            .invoke_async(&mut self.conn)
            .await?;
        if deleted != 1 {
            bail!("redis lock {:?} was no longer ours", held.lock);
        }
        Ok(())
    }
}
