//! Who is admitted over TLS (gRPC with `--tls`, and QUIC): a client must
//! trust the server's CA, and with `--client-ca` the server must trust the
//! client's certificate. Each scenario runs over both TLS transports.

// Only the core is barred from spawning tasks (clippy.toml); tests may.
#![allow(clippy::disallowed_methods)]

#[macro_use]
mod common;

use std::time::Duration;

use common::{dlm_bin, ServerProcess, Wire};
use dlm::client::{AcquireOptions, Client, Error, Tls};
use dlm::transport::tls::DevCerts;

/// A client of `server` over its wire with `tls`; it gives up quickly, so a
/// failure that were (wrongly) retried would show as `Unavailable`.
fn client_with(server: &ServerProcess, id: i32, tls: Tls) -> Client {
    server
        .client_builder(id)
        .transport(server.transport_with(tls))
        .retry_budget(Duration::from_millis(300))
        .build()
        .expect("client")
}

/// Another development CA, with a client certificate of its own.
fn stranger_ca() -> (tempfile::TempDir, DevCerts) {
    let dir = tempfile::tempdir().unwrap();
    let certs = DevCerts::ensure(dir.path(), &[]).unwrap();
    (dir, certs)
}

async fn a_client_with_the_wrong_ca_is_refused(wire: Wire) {
    let server = ServerProcess::start_over(wire, &[]);
    let (_dir, other) = stranger_ca();
    let stranger = client_with(&server, 1, Tls::from_ca_file(&other.ca_cert).unwrap());
    let refused = stranger.init().await;
    assert!(matches!(refused, Err(Error::Tls(_))), "{refused:?}");

    // The CLI says so in one line and exits 1.
    let ca = other.ca_cert.display().to_string();
    let mut flags = vec!["status", "--server", server.client_addr()];
    match wire {
        Wire::Quic => flags.extend(["--transport", "quic"]),
        _ => flags.push("--tls"),
    }
    flags.extend(["--ca", ca.as_str()]);
    let out = tokio::process::Command::new(dlm_bin())
        .args(&flags)
        .env_remove("DLM_SERVER")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS handshake failed"), "{stderr}");

    // The server is fine, and a client with the right CA is served.
    server.client(2).init().await.unwrap();
}

async fn with_a_client_ca_only_clients_with_a_certificate_it_signed_are_admitted(wire: Wire) {
    let server = ServerProcess::start_requiring_client_certs(wire);
    let dev = DevCerts::in_dir(server.data_dir().join("state").join("tls"));

    let without = client_with(&server, 1, server.tls());
    // With TLS 1.3 the server judges the client certificate after the
    // client's side of the handshake is done, so the refusal reaches the
    // client as a TLS error or, when its probe does not finish within the
    // short retry budget on a loaded machine, as a connection that never
    // serves. Either way nothing is served.
    let refused = without.init().await;
    assert!(
        matches!(refused, Err(Error::Tls(_) | Error::Unavailable(_))),
        "no certificate: {refused:?}"
    );

    let (_dir, other) = stranger_ca();
    let foreign = server
        .tls()
        .identity_files(&other.client_cert, &other.client_key)
        .unwrap();
    let refused = client_with(&server, 2, foreign).init().await;
    assert!(
        matches!(refused, Err(Error::Tls(_) | Error::Unavailable(_))),
        "another CA's certificate: {refused:?}"
    );

    // Plain-text gRPC is not a way around it: the server serves gRPC over
    // TLS only.
    let plain = Client::builder(3)
        .endpoint(server.addr())
        .retry_budget(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(plain.init().await.is_err());

    let admitted = server
        .tls()
        .identity_files(&dev.client_cert, &dev.client_key)
        .unwrap();
    let client = client_with(&server, 4, admitted);
    client.init().await.unwrap();
    let grant = client
        .acquire("", AcquireOptions::try_once())
        .await
        .unwrap();
    client.append(&grant, "file_0", "mTLS").await.unwrap();
    client.release(&grant).await.unwrap();
    assert_eq!(server.file("file_0"), "mTLS");
}

over_tls_wires!(
    a_client_with_the_wrong_ca_is_refused,
    with_a_client_ca_only_clients_with_a_certificate_it_signed_are_admitted,
);

#[test]
fn a_client_ca_without_tls_for_grpc_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(dlm_bin())
        .args(["server", "--listen", "127.0.0.1:0"])
        .args(["--listen-quic", "127.0.0.1:0"])
        .args(["--client-ca", "ca.pem", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--client-ca needs --tls"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing is served");
}
