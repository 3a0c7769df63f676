//! Helpers for the black-box tests: real `dlm server` processes on loopback,
//! over each transport.
//!
//! A [`ServerProcess`] is always killed when dropped, so no test leaves a
//! server behind. It binds `127.0.0.1:0` on first start and learns its ports
//! from the lines the server prints; restarts reuse those ports so that
//! clients holding the addresses reconnect. [`Wire`] names a transport, and
//! [`over_every_wire!`] runs one scenario `async fn name(wire: Wire)` once
//! per transport, as the tests `name::grpc`, `name::grpc_tls` and
//! `name::quic`. The servers log at `warn`, or as `DLM_TEST_SERVER_LOG`
//! says (a `RUST_LOG` filter).

#![allow(dead_code, unused_macros, clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use dlm::client::{Client, ClientBuilder, Tls, Transport};

/// Path of the `dlm` binary built for these tests.
pub fn dlm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dlm")
}

/// A transport the suite runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// gRPC in plain text (the server's default).
    Grpc,
    /// gRPC over TLS (`--tls`), with the server's development CA.
    GrpcTls,
    /// QUIC (`--listen-quic`), with the server's development CA.
    Quic,
}

impl Wire {
    /// Whether the wire uses TLS.
    pub fn is_tls(self) -> bool {
        self != Wire::Grpc
    }
}

/// Runs each scenario `async fn name(wire: Wire)` over every wire, as the
/// tests `name::grpc`, `name::grpc_tls` and `name::quic`. An optional test
/// attribute (e.g. `#[tokio::test(flavor = "multi_thread")]`) comes first;
/// `sync:` first runs plain `fn name(wire: Wire)` scenarios as `#[test]`s.
macro_rules! over_every_wire {
    (@one #[$test:meta] $name:ident) => {
        mod $name {
            #[$test]
            async fn grpc() {
                super::$name(crate::common::Wire::Grpc).await
            }
            #[$test]
            async fn grpc_tls() {
                super::$name(crate::common::Wire::GrpcTls).await
            }
            #[$test]
            async fn quic() {
                super::$name(crate::common::Wire::Quic).await
            }
        }
    };
    (@one_sync $name:ident) => {
        mod $name {
            #[test]
            fn grpc() {
                super::$name(crate::common::Wire::Grpc)
            }
            #[test]
            fn grpc_tls() {
                super::$name(crate::common::Wire::GrpcTls)
            }
            #[test]
            fn quic() {
                super::$name(crate::common::Wire::Quic)
            }
        }
    };
    (sync: $($name:ident),+ $(,)?) => {
        $(over_every_wire!(@one_sync $name);)+
    };
    (#[$test:meta] $($name:ident),+ $(,)?) => {
        $(over_every_wire!(@one #[$test] $name);)+
    };
    ($($name:ident),+ $(,)?) => {
        over_every_wire!(#[tokio::test] $($name),+);
    };
}

/// Like [`over_every_wire!`], over the wires that use TLS only.
macro_rules! over_tls_wires {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn grpc_tls() {
                super::$name(crate::common::Wire::GrpcTls).await
            }
            #[tokio::test]
            async fn quic() {
                super::$name(crate::common::Wire::Quic).await
            }
        }
    )+};
}

/// A `dlm server` child process with its data directory.
pub struct ServerProcess {
    child: Option<Child>,
    /// What clients of this server speak.
    wire: Wire,
    data_dir: PathBuf,
    /// The gRPC address ("127.0.0.1:0" before the first start).
    addr: String,
    /// The QUIC address, when the wire is QUIC.
    quic_addr: Option<String>,
    /// The development CA the server printed, when it uses TLS.
    ca: Option<PathBuf>,
    extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// The prefix of the line naming the QUIC address.
const QUIC_LINE: &str = "dlm: serving QUIC on ";
/// The prefix of the line naming the development CA.
const CA_LINE: &str = "dlm: CA for clients (--ca): ";

impl ServerProcess {
    /// Starts a plain-text gRPC server on a fresh temporary data directory.
    pub fn start(extra: &[&str]) -> ServerProcess {
        ServerProcess::start_over(Wire::Grpc, extra)
    }

    /// Starts a server that serves `wire` (and plain or TLS gRPC, which every
    /// server serves), with `extra` flags.
    pub fn start_over(wire: Wire, extra: &[&str]) -> ServerProcess {
        let tmp = tempfile::tempdir().expect("temp dir");
        let extra = extra.iter().map(|s| s.to_string()).collect();
        ServerProcess::launch(wire, tmp, extra)
    }

    /// Starts a server over `wire` with its data under `tmp`/data.
    fn launch(wire: Wire, tmp: tempfile::TempDir, extra: Vec<String>) -> ServerProcess {
        let mut server = ServerProcess {
            child: None,
            wire,
            data_dir: tmp.path().join("data"),
            addr: "127.0.0.1:0".to_owned(),
            quic_addr: (wire == Wire::Quic).then(|| "127.0.0.1:0".to_owned()),
            ca: None,
            extra,
            _tmp: Some(tmp),
        };
        server.spawn().expect("server starts");
        server
    }

    /// Starts a server over `wire` (with gRPC over TLS as well) that requires
    /// client certificates signed by its development CA
    /// (`--client-ca DATA/state/tls/ca.pem`).
    pub fn start_requiring_client_certs(wire: Wire) -> ServerProcess {
        assert!(wire.is_tls(), "client certificates need TLS");
        let tmp = tempfile::tempdir().expect("temp dir");
        let ca = tmp
            .path()
            .join("data/state/tls/ca.pem")
            .display()
            .to_string();
        let mut extra = vec!["--client-ca".to_owned(), ca];
        if wire == Wire::Quic {
            extra.push("--tls".to_owned());
        }
        ServerProcess::launch(wire, tmp, extra)
    }

    /// Spawns the process; returns its stderr if it exits before serving.
    fn spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new(dlm_bin());
        command
            .arg("server")
            .arg("--listen")
            .arg(&self.addr)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if self.wire == Wire::GrpcTls && !self.extra.iter().any(|a| a == "--tls") {
            command.arg("--tls");
        }
        if !self.extra.iter().any(|a| a == "--log-prealloc") {
            // 1 MiB of zeros ahead of the log, not 64: tests start many servers.
            command.arg("--log-prealloc").arg("1MiB");
        }
        if self.quic_addr.is_some() {
            // QUIC on the --listen address (UDP), chosen by the server's flag.
            command.arg("--transport").arg("quic");
        }
        let mut child = command
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("DLM_TEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        let Some(addr) = line
            .strip_prefix("dlm: serving gRPC on ")
            .and_then(|rest| rest.split(',').next())
        else {
            let status = child.wait().map_err(|e| e.to_string())?;
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            return Err(format!("server exited ({status}): {err}"));
        };
        self.addr = addr.trim().to_owned();
        // The lines after the first one, as far as this wire needs them.
        let uses_dev_ca = self.wire.is_tls() && !self.extra.iter().any(|a| a == "--cert");
        if self.quic_addr.is_some() {
            self.quic_addr = Some(read_line_after(&mut stdout, QUIC_LINE)?);
        }
        if uses_dev_ca {
            self.ca = Some(PathBuf::from(read_line_after(&mut stdout, CA_LINE)?));
        }
        // Keep both pipes drained so the server never blocks on a full pipe
        // (and never writes to a closed one).
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[server] {line}");
                }
            });
        }
        std::thread::spawn(move || drain(stdout));
        self.child = Some(child);
        Ok(())
    }

    /// The wire clients of this server speak.
    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// The gRPC address, "127.0.0.1:PORT".
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// "http://127.0.0.1:PORT" (gRPC).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address clients of the server's wire use: QUIC's for QUIC, else
    /// gRPC's.
    pub fn client_addr(&self) -> &str {
        self.quic_addr.as_deref().unwrap_or(&self.addr)
    }

    /// The development CA's certificate, when the server uses TLS.
    pub fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// The TLS settings that trust the server's development CA.
    pub fn tls(&self) -> Tls {
        Tls::from_ca_file(self.ca().expect("the server uses TLS")).expect("CA readable")
    }

    /// The transport for a client of this server, with `tls` if it uses TLS.
    pub fn transport_with(&self, tls: Tls) -> Transport {
        match self.wire {
            Wire::Grpc => Transport::Grpc,
            Wire::GrpcTls => Transport::GrpcTls(tls),
            Wire::Quic => Transport::Quic(tls),
        }
    }

    /// The transport for a client of this server.
    pub fn transport(&self) -> Transport {
        match self.wire {
            Wire::Grpc => Transport::Grpc,
            _ => self.transport_with(self.tls()),
        }
    }

    /// A client builder for this server and its wire, with short backoffs.
    pub fn client_builder(&self, id: i32) -> ClientBuilder {
        Client::builder(id)
            .endpoint(self.client_addr())
            .transport(self.transport())
            .backoff(Duration::from_millis(5), Duration::from_millis(100))
    }

    /// A client for this server and its wire.
    pub fn client(&self, id: i32) -> Client {
        self.client_builder(id).build().expect("client")
    }

    /// The flags that point a `dlm` client command at this server over its
    /// wire: `--server ADDR`, and `--transport quic`, `--tls`, `--ca FILE`.
    pub fn cli_flags(&self) -> Vec<String> {
        let mut flags = vec!["--server".to_owned(), self.client_addr().to_owned()];
        match self.wire {
            Wire::Grpc => {}
            Wire::GrpcTls => flags.push("--tls".to_owned()),
            Wire::Quic => flags.extend(["--transport".to_owned(), "quic".to_owned()]),
        }
        if let Some(ca) = self.ca() {
            flags.extend(["--ca".to_owned(), ca.display().to_string()]);
        }
        flags
    }

    /// A `dlm` client command: the subcommand `args[0]`, this server's flags,
    /// then the rest of `args`; grant files in `state_dir`.
    pub fn cli(&self, state_dir: &Path, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(dlm_bin());
        command
            .arg(args[0])
            .args(self.cli_flags())
            .args(&args[1..])
            .env("DLM_STATE_DIR", state_dir)
            .env_remove("DLM_SERVER")
            .env_remove("DLM_TRANSPORT")
            .env_remove("DLM_TLS")
            .env_remove("DLM_CA")
            .env_remove("DLM_CERT")
            .env_remove("DLM_KEY")
            .env_remove("DLM_CLIENT_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// The data directory (file_0 … file_99, state/).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Content of a data file as the disk has it.
    pub fn file(&self, name: &str) -> String {
        String::from_utf8_lossy(&std::fs::read(self.data_dir.join(name)).unwrap_or_default())
            .into_owned()
    }

    /// Names of the files in the log directory (`data/state`).
    #[allow(dead_code)]
    pub fn state_files(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir.join("state"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sends `signal` to the server process (SIGSTOP freezes it: a server
    /// that answers nothing; SIGCONT thaws it).
    pub fn signal(&self, signal: i32) {
        send_signal(self.child.as_ref().expect("the server runs"), signal);
    }

    /// The server's exit status if it has exited by itself (it is then
    /// gone), `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.try_restart().expect("server restarts");
    }

    /// Starts again; the error is the server's stderr when it refuses to start.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill9();
        let mut last = String::new();
        // The port may take a moment to be free again after SIGKILL.
        for _ in 0..50 {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if e.contains("cannot listen") => {
                    last = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

/// Reads lines until one starts with `prefix`; returns the rest of it.
fn read_line_after(stdout: &mut BufReader<ChildStdout>, prefix: &str) -> Result<String, String> {
    loop {
        let mut line = String::new();
        match stdout.read_line(&mut line) {
            Ok(0) => return Err(format!("the server printed no line {prefix:?}")),
            Ok(_) => {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok(rest.trim_end().to_owned());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Forwards the rest of the server's stdout to the test's stderr.
fn drain(stdout: BufReader<ChildStdout>) {
    for line in stdout.lines().map_while(Result::ok) {
        eprintln!("[server stdout] {line}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends `signal` to `child`, which must not have been waited for yet.
pub fn send_signal(child: &Child, signal: i32) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: plain integers; a child not yet waited for is not reaped, so
    // the pid is still its own.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
}

/// A relay between one client and a server that can fall silent: after
/// [`Relay::cut`] it forwards nothing in either direction and closes
/// nothing, which is how a client whose host lost power, or that a
/// partition cut off, looks to the server: a connection that just goes
/// quiet, with no FIN, reset or QUIC close. TCP for the gRPC wires, UDP for
/// QUIC. Its tasks end when it is dropped.
pub struct Relay {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// TCP connections made to the server for clients so far.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// A relay on 127.0.0.1 to `server` (the address the wire's clients use).
    pub async fn start(wire: Wire, server: &str) -> Relay {
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server: std::net::SocketAddr = server.parse().expect("server address");
        let (addr, task) = match wire {
            Wire::Quic => {
                let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                back.connect(server).await.unwrap();
                let addr = front.local_addr().unwrap();
                (addr, tokio::spawn(relay_udp(front, back, cut.clone())))
            }
            Wire::Grpc | Wire::GrpcTls => {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let relay = relay_tcp(listener, server, cut.clone(), accepted.clone());
                (addr, tokio::spawn(relay))
            }
        };
        Relay {
            addr: addr.to_string(),
            cut,
            accepted,
            task,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// TCP connections made to the server for clients (counted once the
    /// server's side has accepted them into its backlog).
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on nothing passes, and every socket stays open.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn is_cut(cut: &std::sync::atomic::AtomicBool) -> bool {
    cut.load(std::sync::atomic::Ordering::SeqCst)
}

async fn relay_udp(
    front: tokio::net::UdpSocket,
    back: tokio::net::UdpSocket,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut client = None;
    let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        tokio::select! {
            Ok((n, from)) = front.recv_from(&mut up) => {
                client = Some(from);
                if !is_cut(&cut) {
                    let _ = back.send(&up[..n]).await;
                }
            }
            Ok(n) = back.recv(&mut down) => {
                if let (Some(to), false) = (client, is_cut(&cut)) {
                    let _ = front.send_to(&down[..n], to).await;
                }
            }
        }
    }
}

async fn relay_tcp(
    listener: tokio::net::TcpListener,
    server: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut pipes = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Ok((front, _)) = listener.accept() => {
                let cut = cut.clone();
                let accepted = accepted.clone();
                pipes.spawn(async move {
                    if is_cut(&cut) {
                        // Held open, never answered.
                        std::future::pending::<()>().await;
                    }
                    let Ok(back) = tokio::net::TcpStream::connect(server).await else { return };
                    accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (front_read, front_write) = front.into_split();
                    let (back_read, back_write) = back.into_split();
                    tokio::join!(
                        pipe(front_read, back_write, cut.clone()),
                        pipe(back_read, front_write, cut),
                    );
                });
            }
            Some(_) = pipes.join_next(), if !pipes.is_empty() => {}
        }
    }
}

/// Copies `from` to `to` until either ends; once cut, reads and drops
/// everything and never closes `to`.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 65536];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        if is_cut(&cut) {
            // Whatever happens on this side, the other sees nothing.
            if n == 0 {
                std::future::pending::<()>().await;
            }
            continue;
        }
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
