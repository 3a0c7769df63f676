//! What a server serves on: binding the gRPC and QUIC sockets its flags name
//! and readying their TLS material, before anything is served.
//!
//! Owns: turning `--listen`, `--listen-quic`, `--tls`, `--cert`/`--key` and
//! `--client-ca` into a [`Bound`], and the lines `dlm server` prints about
//! it. Without `--cert`/`--key`, the development CA under
//! `DATA/state/tls/` is made on first start ([`DevCerts`]); the secret of
//! QUIC's stateless resets is kept there too, so that it outlives restarts. Must not: serve
//! (see [`super::serve_bound`]) or know wire formats.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;

use super::{ServerConfig, ServerError, STATE_DIR};
use crate::transport::tls::{self, DevCerts, ServerTls, TLS_DIR};
use crate::transport::{grpc, quic};

/// File in the TLS directory holding the secret of QUIC's stateless resets.
const QUIC_RESET_SECRET: &str = "quic-reset.key";

/// `DATA/state/tls`: the development certificates and the QUIC secret.
fn tls_dir(config: &ServerConfig) -> PathBuf {
    config.data_dir.join(STATE_DIR).join(TLS_DIR)
}

/// The sockets and TLS material of a server that is about to serve.
pub struct Bound {
    /// gRPC's listener (always served).
    pub grpc: TcpListener,
    /// TLS for gRPC (`--tls`); `None` serves plain text.
    pub grpc_tls: Option<ServerTls>,
    /// What gRPC accepts from a peer, and how it watches quiet ones.
    pub grpc_limits: grpc::Limits,
    /// The QUIC endpoint (`--listen-quic`), configured with its TLS. A
    /// caller may build one over any [`quinn::AsyncUdpSocket`] instead.
    pub quic: Option<quinn::Endpoint>,
    /// What QUIC accepts from a peer.
    pub quic_limits: quic::server::Limits,
    /// The development CA's certificate, when the server uses one: what
    /// clients pass as `--ca`.
    pub dev_ca: Option<PathBuf>,
    /// The client CA, when client certificates are required.
    pub client_ca: Option<PathBuf>,
}

impl Bound {
    /// A plain-text gRPC server on `grpc` and nothing else.
    pub fn grpc_only(grpc: TcpListener, config: &ServerConfig) -> Bound {
        let grpc_limits = grpc::Limits {
            max_connections: config.max_connections,
            keepalive: config.keepalive(),
            min_request_rate: config.min_request_rate,
            ..grpc::Limits::for_max_append(config.max_append_bytes)
        };
        let quic_limits = quic::server::Limits {
            max_connections: config.max_connections,
            min_request_rate: config.min_request_rate,
            ..quic::server::Limits::for_max_append(config.max_append_bytes)
        };
        Bound {
            grpc,
            grpc_tls: None,
            grpc_limits,
            quic: None,
            quic_limits,
            dev_ca: None,
            client_ca: None,
        }
    }

    /// Binds what `config` names and readies TLS when `--tls` or
    /// `--listen-quic` needs it (making the development CA if there are no
    /// `--cert`/`--key`). Must run inside a Tokio runtime.
    ///
    /// # Errors
    /// [`ServerError::Listen`] when an address cannot be bound;
    /// [`ServerError::Tls`] or [`ServerError::Config`] when the certificates
    /// cannot be made, read or used together.
    pub async fn bind(config: &ServerConfig) -> Result<Bound, ServerError> {
        Bound::check(config)?;
        let mut config = config.clone();
        let (quic_by_transport, wants_tls) = tls_needs(&config);
        let (grpc, quic_socket) = if quic_by_transport {
            let (grpc, socket, addr) = bind_shared_port(config.listen, bind_tcp)?;
            config.listen_quic = Some(addr);
            (grpc, Some(socket))
        } else {
            let grpc = TcpListener::bind(config.listen)
                .await
                .map_err(|source| listen_error(config.listen, source))?;
            let socket = match config.listen_quic {
                Some(addr) => Some(
                    std::net::UdpSocket::bind(addr).map_err(|source| listen_error(addr, source))?,
                ),
                None => None,
            };
            (grpc, socket)
        };
        let config = &config;
        let mut bound = Bound::grpc_only(grpc, config);
        bound.grpc_limits.max_connections = fit_descriptors(bound.grpc_limits.max_connections);
        if !wants_tls {
            return Ok(bound);
        }
        let (tls, dev_ca) = server_tls(config)?;
        if let (Some(socket), Some(addr)) = (quic_socket, config.listen_quic) {
            let secret = tls::secret(&tls_dir(config).join(QUIC_RESET_SECRET))?;
            let endpoint = quic::server_endpoint(
                socket,
                quic::endpoint_config(&secret),
                quic::server_config(&tls, config.keepalive())?,
            )
            .map_err(|e| listen_error(addr, e))?;
            bound.quic = Some(endpoint);
        }
        bound.grpc_tls = config.tls.then_some(tls);
        bound.dev_ca = dev_ca;
        bound.client_ca = config.client_ca.clone();
        Ok(bound)
    }

    /// Refuses flags that cannot work together, touching nothing: `dlm
    /// server` checks them before it takes (and perhaps creates) the data
    /// directory. [`Bound::bind`] checks them again.
    ///
    /// # Errors
    /// [`ServerError::Config`] naming the flags.
    pub fn check(config: &ServerConfig) -> Result<(), ServerError> {
        check_limits(config)?;
        let (_, wants_tls) = tls_needs(config);
        if config.client_ca.is_some() && !config.tls {
            return Err(ServerError::Config(
                "--client-ca needs --tls: plain-text gRPC would admit clients without certificates"
                    .into(),
            ));
        }
        if !wants_tls && (config.cert.is_some() || config.key.is_some()) {
            return Err(ServerError::Config(
                "--cert/--key are used by --tls and --listen-quic; neither is given".into(),
            ));
        }
        Ok(())
    }

    /// The gRPC address.
    ///
    /// # Errors
    /// When the socket has no address.
    pub fn grpc_addr(&self) -> io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The QUIC address, when QUIC is served.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// The lines `dlm server` prints once it serves. The first is always
    /// `dlm: serving gRPC on ADDR, data in DIR`; scripts and tests read the
    /// addresses and the CA path from these lines.
    pub fn banner(&self, data_dir: &Path) -> String {
        let grpc = self.grpc_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut lines = vec![format!(
            "dlm: serving gRPC on {grpc}, data in {}",
            data_dir.display()
        )];
        if let Some(quic) = self.quic_addr() {
            lines.push(format!("dlm: serving QUIC on {quic}"));
        }
        if self.grpc_tls.is_some() {
            lines.push("dlm: gRPC requires TLS".to_owned());
        }
        if let Some(ca) = &self.dev_ca {
            lines.push(format!("dlm: CA for clients (--ca): {}", ca.display()));
        }
        if let Some(ca) = &self.client_ca {
            lines.push(format!(
                "dlm: client certificates required (--client-ca {})",
                ca.display()
            ));
        }
        lines.join("\n") + "\n"
    }
}

/// File descriptors kept for the log, snapshots, data files and listeners.
#[cfg(unix)]
const RESERVED_DESCRIPTORS: libc::rlim_t = 256;

/// The gRPC connection cap that the process's descriptor limit allows:
/// raises the soft `RLIMIT_NOFILE` towards the hard one first (as Go's
/// runtime does at start), then lowers the cap, with a warning, if the
/// limit is still short. Past the limit, accepting a connection would not
/// fail: opening the next log segment would, and stop the server.
#[cfg(unix)]
fn fit_descriptors(max_connections: usize) -> usize {
    let wanted = libc::rlim_t::try_from(max_connections)
        .unwrap_or(libc::rlim_t::MAX)
        .saturating_add(RESERVED_DESCRIPTORS);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return max_connections;
    }
    if limit.rlim_cur < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted.min(limit.rlim_max),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct it is given and nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    if limit.rlim_cur >= wanted {
        return max_connections;
    }
    let fits = limit.rlim_cur.saturating_sub(RESERVED_DESCRIPTORS).max(1);
    tracing::warn!(
        max_connections,
        descriptor_limit = limit.rlim_cur,
        serving = fits,
        "the open-file limit (ulimit -n) is below --max-connections plus {RESERVED_DESCRIPTORS}; \
         serving fewer gRPC connections"
    );
    usize::try_from(fits).unwrap_or(max_connections)
}

#[cfg(not(unix))]
fn fit_descriptors(max_connections: usize) -> usize {
    max_connections
}

/// Whether QUIC is served on the gRPC address (`--transport quic` without
/// `--listen-quic`), and whether anything needs TLS.
fn tls_needs(config: &ServerConfig) -> (bool, bool) {
    let quic_by_transport =
        config.transport == super::ServerTransport::Quic && config.listen_quic.is_none();
    let wants_tls = config.tls || config.listen_quic.is_some() || quic_by_transport;
    (quic_by_transport, wants_tls)
}

/// The largest `--max-append-bytes`. An append's log record must stay well
/// under the longest record recovery reads
/// ([`crate::log::frame::MAX_PAYLOAD`], 256 MiB): a longer one would be
/// written and acknowledged, and the next start would refuse the log as
/// damaged. (A read refuses any file over 64 MiB − 64 bytes, however many
/// appends made it: an append near this size fills a file no read returns.)
pub const MOST_APPEND_BYTES: usize = 64 << 20;

/// Refuses limits (connections, append and read-reply sizes) and keepalive
/// times that cannot work.
fn check_limits(config: &ServerConfig) -> Result<(), ServerError> {
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;
    /// Far past what one process's descriptors allow, and what tokio's
    /// semaphores can count.
    const MOST_CONNECTIONS: usize = 1 << 20;
    if config.max_connections == 0 || config.max_connections > MOST_CONNECTIONS {
        return Err(ServerError::Config(format!(
            "--max-connections must be between 1 and {MOST_CONNECTIONS}, got {}",
            config.max_connections
        )));
    }
    super::check_storage_limits(config)?;
    let most_reply_bytes = super::engine::MOST_READ_REPLY_BYTES;
    if config.max_read_reply_bytes == 0 || config.max_read_reply_bytes > most_reply_bytes {
        return Err(ServerError::Config(format!(
            "--max-read-reply-bytes must be between 1 and {most_reply_bytes}, got {}",
            config.max_read_reply_bytes
        )));
    }
    // The largest request must fit in what appends may fill, or it would
    // always be refused. (A gRPC message's prefix is 5 bytes; a QUIC
    // frame's at most 10.)
    let max_append = config.max_append_bytes;
    let largest = (crate::transport::grpc::Limits::for_max_append(max_append).max_request_bytes
        as u64)
        .saturating_add(5)
        .max(
            (crate::transport::quic::server::Limits::for_max_append(max_append).max_request_bytes
                as u64)
                .saturating_add(10),
        );
    let budget = config.max_inflight_request_bytes;
    if crate::transport::budget::RequestBudget::large_part(budget) < largest {
        return Err(ServerError::Config(format!(
            "--max-inflight-request-bytes must be at least 4/3 of the largest request \
             ({largest} bytes with --max-append-bytes {max_append}), got {budget}"
        )));
    }
    for (flag, ms) in [
        ("--keepalive-ms", config.keepalive_ms),
        ("--keepalive-timeout-ms", config.keepalive_timeout_ms),
    ] {
        if ms == 0 || ms > DAY_MS {
            return Err(ServerError::Config(format!(
                "{flag} must be between 1 and {DAY_MS} (a day), got {ms}"
            )));
        }
    }
    Ok(())
}

fn listen_error(addr: SocketAddr, source: io::Error) -> ServerError {
    ServerError::Listen { addr, source }
}

/// The server's TLS material, and the development CA's path when that is
/// what it uses.
fn server_tls(config: &ServerConfig) -> Result<(ServerTls, Option<PathBuf>), ServerError> {
    let client_ca = config.client_ca.as_deref();
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => Ok((ServerTls::load(cert, key, client_ca)?, None)),
        (None, None) => {
            let names: Vec<String> = [Some(config.listen), config.listen_quic]
                .into_iter()
                .flatten()
                .map(|addr| addr.ip())
                .filter(|ip| !ip.is_unspecified())
                .map(|ip| ip.to_string())
                .collect();
            let certs = DevCerts::ensure(&tls_dir(config), &names)?;
            let tls = ServerTls::load(&certs.server_cert, &certs.server_key, client_ca)?;
            Ok((tls, Some(certs.ca_cert)))
        }
        _ => Err(ServerError::Config("--cert and --key go together".into())),
    }
}

/// Binds gRPC (TCP) and QUIC (UDP) on one port of `listen`. For port 0 the
/// port TCP gets may be taken on UDP by another socket (a client's ephemeral
/// port): then another port is tried, a few times (the TCP ports tried are
/// held until the end, so that none comes back). TCP is bound by the
/// `bind_tcp` given: the function [`bind_tcp`] in production; a test's
/// forces the UDP port to be taken.
fn bind_shared_port(
    listen: SocketAddr,
    mut bind_tcp: impl FnMut(SocketAddr) -> io::Result<TcpListener>,
) -> Result<(TcpListener, std::net::UdpSocket, SocketAddr), ServerError> {
    const TRIES: usize = 16;
    let mut taken = Vec::new();
    loop {
        let grpc = bind_tcp(listen).map_err(|source| listen_error(listen, source))?;
        let addr = grpc.local_addr().map_err(|e| listen_error(listen, e))?;
        match std::net::UdpSocket::bind(addr) {
            Ok(socket) => return Ok((grpc, socket, addr)),
            Err(e)
                if listen.port() == 0
                    && e.kind() == io::ErrorKind::AddrInUse
                    && taken.len() + 1 < TRIES =>
            {
                taken.push(grpc);
            }
            Err(source) => return Err(listen_error(addr, source)),
        }
    }
}

/// A listening TCP socket on `addr`, as `TcpListener::bind` makes one
/// (`SO_REUSEADDR`, a backlog of 1,024), without its name lookup.
fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Port 0: the port TCP got is held on UDP by another socket, so the
    /// bind tries another (forced here: the first TCP bind is steered to a
    /// port whose UDP side the test holds). A port given explicitly fails
    /// at once instead.
    #[tokio::test]
    async fn a_port_taken_on_udp_is_passed_over_for_port_zero_only() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        // A port the test holds on both sides: its TCP listener is what the
        // first bind returns.
        let (first, held) = loop {
            let tcp = bind_tcp(any).unwrap();
            if let Ok(udp) = std::net::UdpSocket::bind(tcp.local_addr().unwrap()) {
                break (tcp, udp);
            }
        };
        let taken = held.local_addr().unwrap();
        let mut first = Some(first);
        let mut binds = 0;
        let (grpc, udp, addr) = bind_shared_port(any, |addr| {
            binds += 1;
            first.take().map_or_else(|| bind_tcp(addr), Ok)
        })
        .expect("another port");
        // (More than two only if the kernel's next port is taken on UDP too.)
        assert!(binds >= 2, "another try");
        assert_ne!(addr.port(), taken.port());
        assert_eq!(grpc.local_addr().unwrap(), addr);
        assert_eq!(udp.local_addr().unwrap(), addr);
        drop((grpc, udp));

        let mut binds = 0;
        let refused = bind_shared_port(taken, |addr| {
            binds += 1;
            bind_tcp(addr)
        });
        assert!(
            matches!(&refused, Err(e) if e.to_string().contains(&taken.to_string())),
            "{:?}",
            refused.map(|(_, _, addr)| addr)
        );
        assert_eq!(binds, 1, "no retry on an explicit port");
    }

    #[test]
    fn connection_limits_and_keepalive_times_that_cannot_work_are_refused() {
        let good = ServerConfig::new("unused");
        assert!(check_limits(&good).is_ok());
        let mut none = good.clone();
        none.max_connections = 0;
        let mut countless = good.clone();
        countless.max_connections = 3_000_000_000_000_000_000;
        let mut zero = good.clone();
        zero.keepalive_ms = 0;
        let mut huge = good.clone();
        huge.keepalive_timeout_ms = u64::MAX;
        let mut no_appends = good.clone();
        no_appends.max_append_bytes = 0;
        let mut unrecoverable = good.clone();
        unrecoverable.max_append_bytes = MOST_APPEND_BYTES + 1;
        let mut no_reads = good.clone();
        no_reads.max_read_reply_bytes = 0;
        let mut uncountable = good.clone();
        uncountable.max_read_reply_bytes = 4 << 30;
        let mut overflowing = good.clone();
        overflowing.log_prealloc = u64::MAX;
        let mut no_room = good.clone();
        no_room.max_inflight_request_bytes = 4 << 20;
        let mut no_room_for_large = good.clone();
        no_room_for_large.max_append_bytes = MOST_APPEND_BYTES;
        no_room_for_large.max_inflight_request_bytes = 80 << 20;
        for bad in [
            none,
            countless,
            zero,
            huge,
            no_appends,
            unrecoverable,
            no_reads,
            uncountable,
            overflowing,
            no_room,
            no_room_for_large,
        ] {
            assert!(
                matches!(check_limits(&bad), Err(ServerError::Config(_))),
                "{bad:?}"
            );
        }
    }

    /// The log record of the largest append the flag allows, with the
    /// longest names a request can carry, is a record recovery reads.
    #[test]
    fn the_largest_append_makes_a_record_recovery_reads() {
        use crate::core::records::{AnswerSnapshot, Change, Record};
        use crate::core::types::{Reply, RequestKind};
        let mut config = ServerConfig::new("unused");
        config.max_append_bytes = MOST_APPEND_BYTES;
        assert!(check_limits(&config).is_ok());
        let request_bytes =
            crate::transport::grpc::Limits::for_max_append(MOST_APPEND_BYTES).max_request_bytes;
        let record = Record {
            changes: vec![
                Change::Staged {
                    fence: crate::core::types::Fence(u64::MAX),
                    file: crate::core::staging::FileIndex::parse("file_99").unwrap(),
                    content: bytes::Bytes::from(vec![0xff; MOST_APPEND_BYTES]),
                },
                Change::Answered(std::sync::Arc::new(AnswerSnapshot {
                    client: i32::MIN,
                    request_id: "r".repeat(request_bytes - MOST_APPEND_BYTES).into(),
                    kind: RequestKind::Append,
                    reply: Reply::Done,
                })),
            ],
        };
        let payload = postcard::to_allocvec(&record).unwrap();
        assert!(payload.len() < crate::log::frame::MAX_PAYLOAD);
    }

    #[test]
    fn the_request_limit_follows_the_largest_append() {
        use crate::transport::grpc::Limits;
        assert_eq!(Limits::for_max_append(1 << 20).max_request_bytes, 4 << 20);
        let big = Limits::for_max_append(MOST_APPEND_BYTES).max_request_bytes;
        assert!(big > 64 << 20 && big < 65 << 20, "{big}");
        assert_eq!(
            Limits::for_max_append(usize::MAX).max_request_bytes,
            usize::MAX
        );
    }
}
