//! What a client speaks: [`Transport`] and its [`Tls`] settings.
//!
//! Only configuration, checked when the client is built; the wire itself is
//! [`super::conn`]'s.

use std::fmt;
use std::path::Path;

use super::Error;

/// How a client reaches its servers. Every transport carries the same calls
/// with the same meaning; retries, request ids and failover do not depend on
/// it.
///
/// ```no_run
/// # async fn example() -> Result<(), dlm::client::Error> {
/// use dlm::client::{Client, Tls, Transport};
///
/// // The CA a development server printed, and its --listen-quic address.
/// let tls = Tls::from_ca_file("data/state/tls/ca.pem")?;
/// let client = Client::builder(1)
///     .endpoint("127.0.0.1:50052")
///     .transport(Transport::Quic(tls))
///     .build()?;
/// client.init().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub enum Transport {
    /// gRPC in plain text (the default, and the original service's).
    #[default]
    Grpc,
    /// gRPC over TLS (a server started with `--tls`).
    GrpcTls(Tls),
    /// QUIC, always over TLS 1.3 (a server started with `--listen-quic`);
    /// the addresses are the servers' QUIC addresses.
    Quic(Tls),
}

impl Transport {
    /// The TLS settings, if the transport uses TLS.
    pub fn tls(&self) -> Option<&Tls> {
        match self {
            Transport::Grpc => None,
            Transport::GrpcTls(tls) | Transport::Quic(tls) => Some(tls),
        }
    }
}

/// TLS settings of a client: the CA that must have signed the server's
/// certificate, and optionally the client's own certificate (for a server
/// started with `--client-ca`).
#[derive(Clone)]
pub struct Tls {
    /// CA certificate(s), PEM.
    pub(crate) ca_pem: Vec<u8>,
    /// The client's certificate chain and private key, PEM.
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the server's certificate must carry; default: the host of
    /// each server address.
    pub(crate) server_name: Option<String>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("Tls")
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Reads a file for the TLS settings, naming it in the error.
fn read(what: &str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::BadRequest(format!("cannot read the {what} {}: {e}", path.display())))
}

impl Tls {
    /// Trusts the CA certificate(s) in `pem`.
    pub fn from_ca_pem(pem: impl Into<Vec<u8>>) -> Tls {
        Tls {
            ca_pem: pem.into(),
            identity: None,
            server_name: None,
        }
    }

    /// Trusts the CA certificate(s) in the PEM file at `path` (a dev server
    /// prints the path of its CA, `DATA/state/tls/ca.pem`).
    ///
    /// # Errors
    /// [`Error::BadRequest`] when the file cannot be read.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Tls, Error> {
        Ok(Tls::from_ca_pem(read("CA file", path.as_ref())?))
    }

    /// Presents the certificate chain `cert` with private key `key` (PEM).
    #[must_use]
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Tls {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Presents the certificate and key in these PEM files.
    ///
    /// # Errors
    /// [`Error::BadRequest`] when a file cannot be read.
    pub fn identity_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Tls, Error> {
        let cert = read("certificate file", cert.as_ref())?;
        let key = read("key file", key.as_ref())?;
        Ok(self.identity_pem(cert, key))
    }

    /// Expects the servers' certificates to carry `name` rather than the
    /// host of their addresses.
    #[must_use]
    pub fn server_name(mut self, name: impl Into<String>) -> Tls {
        self.server_name = Some(name.into());
        self
    }

    /// The identity as borrowed PEM buffers.
    pub(crate) fn identity(&self) -> Option<(&[u8], &[u8])> {
        self.identity
            .as_ref()
            .map(|(cert, key)| (cert.as_slice(), key.as_slice()))
    }
}
